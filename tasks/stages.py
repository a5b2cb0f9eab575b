"""One Prefect task runs any stage through ``coalora.stages.run_stage`` — the function DVC calls too.

Cache key: the stage key of coalora.stages.core.stage_key (its params sections, the digests of its input
artifacts and of its code), exactly what DVC hashes, so a re-run after a failure skips finished stages and a
changed parameter re-runs exactly the stages that read it. Results are the stages' JSON summaries,
serialised as JSON (never pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from coalora import interrupt
from coalora.errors import UserError
from coalora.params import load_params
from coalora.stages import get_stage, run_stage, stage_key


def stage_cache_key(_context: Any, inputs: dict[str, Any]) -> str:
    """``coalora-<stage>-<stage key>`` for the task's (name, root, profile) inputs."""
    params = load_params(inputs["root"], inputs["profile"])
    stage = get_stage(inputs["name"])
    return f"coalora-{stage.name}-{stage_key(stage, params, Path(inputs['root']))}"


def retry_unless_user_error(_task: Any, _run: Any, state: Any) -> bool:
    """Retry transient failures, never bad input: a wrong parameter fails the same way every time."""
    return not isinstance(state.data, UserError)


@task(
    name="stage",
    task_run_name="{name}",
    cache_key_fn=stage_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_user_error,
)
def stage_task(name: str, root: str, profile: str | None) -> dict:
    """Run stage ``name`` of the project at ``root`` and return its summary."""
    interrupt.check()  # asked to stop between two stages: start no new one
    return run_stage(get_stage(name), load_params(root, profile), root)


def job_context(name: str, root: str):
    """The context a stage's jobs run in: its verified inputs, and its work folder as their output.

    Jobs write into the work folder (kept until the stage succeeds), never into the stage's output folder,
    which only the stage itself creates, atomically.
    """
    from coalora.stages import StageContext
    from coalora.stages.core import input_folders

    stage = get_stage(name)
    work = stage.work_dir(Path(root))
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(root=Path(root), out=work, work=work, inputs=input_folders(stage, Path(root)),
                        progress=False)


def _stage_module(name: str):
    from importlib import import_module

    return import_module(get_stage(name).fn.__module__)


def job_ids(name: str, root: str, profile: str | None) -> list[str]:
    """The ids of stage ``name``'s independent jobs (its module's ``jobs(params, ctx)``)."""
    return list(_stage_module(name).jobs(load_params(root, profile), job_context(name, root)))


@task(name="job", task_run_name="{name}:{job_id}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def job_task(name: str, root: str, profile: str | None, job_id: str) -> dict | None:
    """One job of stage ``name`` (its module's ``run_job``); a job resumes from what it left in the work
    folder, so there is no Prefect cache here: the stage's own cache key covers the whole stage."""
    return _stage_module(name).run_job(load_params(root, profile), job_context(name, root), job_id)


@task(name="track", cache_policy=NO_CACHE)
def track_task(root: str, profile: str | None, outcome: dict) -> dict:
    """Log the pipeline run to MLflow (coalora.track); returns where it is."""
    from coalora.track import log_pipeline

    tracked = log_pipeline(root, profile, outcome)
    return {"run_id": tracked.run_id, "experiment_id": tracked.experiment_id,
            "tracking_uri": tracked.tracking_uri, "url": tracked.url()}
