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
    return run_stage(get_stage(name), load_params(root, profile), root)
