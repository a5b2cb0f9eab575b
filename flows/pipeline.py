"""The pipeline flow: every stage in order, each a cached, retryable task.

Before each task the flow checks that the stage's output folder is intact and built under the current
key; when it is not (deleted, corrupt, produced under other params) the task runs with ``refresh_cache``
so a stale cache record can never stand in for a missing artifact.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from coalora.params import load_params
from coalora.stages import STAGES, fresh_summary, get_stage
from tasks.stages import stage_task


@flow(name="coalora-pipeline", validate_parameters=True)
def pipeline(root: str = ".", profile: str | None = None, stages: list[str] | None = None) -> dict:
    """Run ``stages`` (default: all, in pipeline order) of the project at ``root``.

    Returns ``{"stages": {name: {"state": "Completed"|"Cached", "summary": {...}}}}``.
    """
    params = load_params(root, profile)
    outcome = {}
    for name in stages or list(STAGES):
        intact = fresh_summary(get_stage(name), params, Path(root)) is not None
        state = stage_task.with_options(refresh_cache=not intact)(name, root, profile, return_state=True)
        outcome[name] = {"state": state.name, "summary": state.result()}
    return {"stages": outcome}


def run_pipeline(root: str, profile: str | None = None, stages: list[str] | None = None) -> dict:
    """Run the flow locally; no server needed (Prefect starts a temporary one on a local SQLite file).

    Flow-run heartbeats are off: they cost ~1 s per run and only matter to a remote worker.
    """
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return pipeline(root=root, profile=profile, stages=stages)
