"""The scheduled deployment: the pipeline flow served with a cron (or interval) schedule.

``coalora serve --cron "0 3 * * *"`` registers the deployment ``coalora-pipeline/<name>`` with a Prefect
server and keeps a runner polling it; every scheduled run executes the same flow as ``coalora run``, so a
run whose inputs did not change is all cache hits. Schedules only fire on a real server (``prefect server
start``): Prefect's temporary server registers the deployment but never schedules it, so this module checks
that the API answers before it starts.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from coalora.errors import UserError

DEFAULT_API = "http://127.0.0.1:4200/api"


def check_cron(expression: str) -> str:
    """The cron expression, validated by Prefect's own schedule model; UserError naming --cron otherwise."""
    from prefect.client.schemas.schedules import CronSchedule

    from pydantic import ValidationError

    try:
        CronSchedule(cron=expression)
    except ValidationError as exc:
        reason = "; ".join(e["msg"] for e in exc.errors())
        raise UserError(f"--cron: {expression!r} is not a cron expression (5 fields, e.g. '*/5 * * * *'): "
                        f"{reason}") from None
    return expression


def check_api(url: str, timeout: float = 5.0) -> None:
    """UserError unless a Prefect server answers at ``url`` (``<url>/health``)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            healthy = response.status == 200 and json.loads(response.read() or b"false") is True
    except (urllib.error.URLError, OSError, ValueError):
        healthy = False
    if not healthy:
        raise UserError(f"--api-url: no Prefect server answers at {url}; start one in another terminal with "
                        f"`prefect server start` (it listens on {DEFAULT_API}) or point PREFECT_API_URL at yours")


def deployment(root: str, profile: str | None, name: str, *, cron: str | None = None,
               interval: float | None = None, stages: list[str] | None = None, track: bool = True):
    """The pipeline as a ``RunnerDeployment`` with one schedule.

    The entrypoint is the module path ``flows.pipeline:pipeline`` (not a file path), so the runner can start
    runs from any working directory.
    """
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import pipeline

    return pipeline.to_deployment(
        name=name, cron=cron, interval=interval, entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"root": root, "profile": profile, "stages": stages, "track": track},
        description="coalora pipeline on a schedule (coalora serve)", tags=["coalora"])


def serve(root: str, profile: str | None, name: str, *, cron: str | None = None,
          interval: float | None = None, stages: list[str] | None = None, track: bool = True) -> None:
    """Register the deployment and run its scheduled runs until interrupted (blocks)."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment(root, profile, name, cron=cron, interval=interval, stages=stages, track=track))
