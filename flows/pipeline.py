"""The pipeline flow: every stage in order, each a cached, retryable task, then MLflow tracking.

Before each task the flow checks that the stage's output folder is intact and built under the current
key; when it is not (deleted, corrupt, produced under other params) the task runs with ``refresh_cache``
so a stale cache record can never stand in for a missing artifact. After each stage the flow records it
into dvc.lock and DVC's cache (``coalora.stages.dvclock``), so DVC stays in step with the flow.

Stages are submitted to the flow's task runner (threads by default; ``dask=...`` gives Prefect's
``DaskTaskRunner``). Stages depend on each other, so they run one after another. On Dask, a stage whose
module offers independent jobs (``jobs(params, ctx)`` and ``run_job(params, ctx, job_id)``: the evaluation,
one job per (method, config) row) has them submitted all at once first, so they fan out over the cluster's
workers; the stage task then finds the finished rows in its work folder and only assembles its output.
"""

from __future__ import annotations

import functools
from importlib import import_module
from pathlib import Path

from prefect import flow
from prefect.futures import wait
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from coalora import lock
from coalora.params import load_params
from coalora import stages as registry
from coalora.stages import fresh_summary, get_stage
from coalora.stages.dvclock import Recorder
from tasks.stages import job_ids, job_task, stage_task, track_task

FLOW_NAME = "coalora-pipeline"


def one_run_per_project(fn):
    """Run the flow holding the project's lock (coalora.lock): ``coalora run`` holds it already (the lock is
    re-entrant within a process); a scheduled run (``coalora serve``) takes it here, or fails with a message
    naming the process that holds it."""

    @functools.wraps(fn)  # Prefect reads the flow's parameters from the wrapped signature
    def locked(*args, **kwargs):
        root = kwargs["root"] if "root" in kwargs else (args[0] if args else ".")
        with lock.acquire(root, f"flow {FLOW_NAME}"):
            return fn(*args, **kwargs)

    return locked


@flow(name=FLOW_NAME, validate_parameters=True)
@one_run_per_project
def pipeline(root: str = ".", profile: str | None = None, stages: list[str] | None = None,
             track: bool = False, fan_out_jobs: bool = False) -> dict:
    """Run ``stages`` (default: all, in pipeline order) of the project at ``root``; log to MLflow if ``track``.

    ``fan_out_jobs``: submit the jobs of a stage that has them as separate tasks (on a Dask cluster). Off on
    the default thread pool, where every job at once would hold its own model copy in one process.

    Returns ``{"stages": {name: {"state": "Completed"|"Cached", "summary": {...}}}}`` plus
    ``"mlflow": {"run_id", "experiment_id", "tracking_uri", "url"}`` when tracked.
    """
    params = load_params(root, profile)
    outcome = {}
    with Recorder(root, profile) as dvc_lock:  # each finished stage into dvc.lock and DVC's cache
        # the registry at call time: importing STAGES by name would freeze the stage list of import time
        for name in stages or list(registry.PIPELINE):
            intact = fresh_summary(get_stage(name), params, Path(root)) is not None
            if not intact and fan_out_jobs:
                fan_out(name, root, profile)
            future = stage_task.with_options(refresh_cache=not intact).submit(name, root, profile)
            future.wait()
            state = future.state
            outcome[name] = {"state": state.name, "summary": state.result()}
            dvc_lock.record(name, get_stage(name).deps)
    result = {"stages": outcome}
    if track:
        result["mlflow"] = track_task(root, profile, result)
    return result


def has_jobs(name: str) -> bool:
    """Whether stage ``name``'s module splits its work into independent jobs."""
    module = import_module(get_stage(name).fn.__module__)
    return callable(getattr(module, "jobs", None)) and callable(getattr(module, "run_job", None))


def fan_out(name: str, root: str, profile: str | None) -> int:
    """Submit every job of stage ``name`` at once and wait for all; returns how many ran (0: no jobs).

    A failed job fails the flow here, before the stage task would assemble a partial result.
    """
    if not has_jobs(name):
        return 0
    ids = job_ids(name, root, profile)
    futures = [job_task.submit(name, root, profile, job_id) for job_id in ids]
    wait(futures)
    for future in futures:
        future.result()  # raises the first job failure
    return len(futures)


def task_runner(dask: bool = False, address: str | None = None, workers: int | None = None,
                threads_per_worker: int = 1):
    """None (Prefect's thread pool) or a ``DaskTaskRunner``: on the scheduler at ``address`` when given,
    else on a new ``distributed.LocalCluster`` of ``workers`` processes (default: one per core)."""
    if not dask and not address:
        return None
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    # Loopback only: a local cluster serves this machine, and its scheduler should not listen on the network.
    kwargs = {"threads_per_worker": threads_per_worker, "dashboard_address": None, "host": "127.0.0.1"}
    if workers:
        kwargs["n_workers"] = workers
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def run_pipeline(root: str, profile: str | None = None, stages: list[str] | None = None, *,
                 track: bool = False, dask: bool = False, dask_address: str | None = None,
                 dask_workers: int | None = None) -> dict:
    """Run the flow locally; no server needed (Prefect starts a temporary one on a local SQLite file).

    Flow-run heartbeats are off: they cost ~1 s per run and only matter to a remote worker. ``track`` is off
    by default here (tests run the flow often; an MLflow store costs seconds to create); ``coalora run``
    turns it on.
    """
    runner = task_runner(dask, dask_address, dask_workers)
    flow_ = pipeline.with_options(task_runner=runner) if runner is not None else pipeline
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return flow_(root=root, profile=profile, stages=stages, track=track, fan_out_jobs=runner is not None)
