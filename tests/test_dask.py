"""Beyond one machine: the pipeline flow on Prefect's DaskTaskRunner over a local Dask cluster.

A stage that splits its work into jobs (``jobs`` / ``run_job`` in its module, as the evaluation does) has them
fanned out over the cluster's workers; a real stage runs on a cluster of worker processes and is cached the
second time, exactly as on the default runner.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from coalora.artifacts import write_json
from coalora.stages.core import Stage
from test_pipeline import make_project

pytestmark = pytest.mark.slow
N_JOBS = 4
CALLS = {"jobs": 0}
_lock = threading.Lock()


# A stage with independent jobs, shaped like the evaluation stage's module: jobs(), run_job(), the stage fn.
def jobs(params, ctx) -> list[str]:
    return [f"job{i}" for i in range(N_JOBS)]


def run_job(params, ctx, job_id: str) -> dict:
    from distributed import get_worker

    with _lock:
        CALLS["jobs"] += 1
    started = time.time()
    time.sleep(0.5)  # long enough that the jobs overlap when they run on different workers
    row = {"job": job_id, "worker": get_worker().address, "start": started, "end": time.time()}
    write_json(ctx.work / f"{job_id}.json", row)
    return row


def assemble(params, ctx) -> dict:
    rows = [json.loads((ctx.work / f"{j}.json").read_text()) for j in jobs(params, ctx)]
    write_json(ctx.out / "rows.json", rows)
    return {"jobs": len(rows), "workers": sorted({r["worker"] for r in rows})}


FAN = Stage(name="fan", fn=assemble, params=("seed",), description="synthetic stage with jobs")


@pytest.fixture
def fan_stage(monkeypatch):
    import coalora.stages as stages

    monkeypatch.setattr(stages, "PIPELINE", ("fan",))
    monkeypatch.setattr(stages, "all_stages", lambda: {"fan": FAN})
    CALLS["jobs"] = 0


def test_jobs_fan_out_over_the_workers_of_a_local_cluster(prefect_harness, repo_root, tmp_path, fan_stage):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import pipeline

    root = str(make_project(repo_root, tmp_path / "project"))
    # processes=False: the workers are threads of this process, so the synthetic stage above is visible to
    # them; the scheduling through Dask is the same as with worker processes.
    runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": 2, "threads_per_worker": 1, "processes": False, "dashboard_address": None,
        "protocol": "tcp://", "host": "127.0.0.1"})  # tcp on loopback: inproc:// looks up a public address
    flow_ = pipeline.with_options(task_runner=runner)
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        first = flow_(root=root, stages=["fan"], fan_out_jobs=True)
        assert first["stages"]["fan"]["state"] == "Completed"
        summary = first["stages"]["fan"]["summary"]
        assert summary["jobs"] == N_JOBS and CALLS["jobs"] == N_JOBS
        assert len(summary["workers"]) == 2  # both workers took jobs
        rows = json.loads((tmp_path / "project/artifacts/fan/rows.json").read_text())
        assert any(a["start"] < b["end"] and b["start"] < a["end"]
                   for a in rows for b in rows if a["worker"] != b["worker"])  # they overlapped in time

        again = flow_(root=root, stages=["fan"], fan_out_jobs=True)
    assert again["stages"]["fan"]["state"] == "Cached"
    assert CALLS["jobs"] == N_JOBS  # an up-to-date stage fans nothing out


def test_a_real_stage_on_dask_worker_processes_then_cached(prefect_harness, repo_root, tmp_path):
    from flows.pipeline import run_pipeline

    root = make_project(repo_root, tmp_path / "project")
    first = run_pipeline(str(root), stages=["data"], dask=True, dask_workers=2)
    assert first["stages"]["data"]["state"] == "Completed"
    assert (root / "artifacts/data/stage.json").is_file()
    second = run_pipeline(str(root), stages=["data"], dask=True, dask_workers=2)
    assert second["stages"]["data"]["state"] == "Cached"
    assert second["stages"]["data"]["summary"] == first["stages"]["data"]["summary"]


def test_task_runner_choice():
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import task_runner

    assert task_runner() is None
    remote = task_runner(address="tcp://127.0.0.1:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"
    local = task_runner(dask=True, workers=3)
    assert local.cluster_kwargs["n_workers"] == 3
