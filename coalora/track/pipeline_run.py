"""A pipeline run in MLflow: one parent run, a child run per stage (``coalora.track.child_runs``), and the
parent's headline (every stage's metrics files, the Pareto figures of the tables comparing methods).

    parent   all params (flattened), the resolved params.yaml, dvc.lock, stage states as tags, the headline
    stage    (``child_runs.log_stage``) and, nested in the train stage's run, a run per training method

Runs a killed ``coalora run`` left RUNNING are closed (KILLED) before a new parent run starts.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from coalora import interrupt
from coalora.artifacts import RECORD
from coalora.errors import UserError
from coalora.track.child_runs import log_figure, log_stage, measured_columns, metrics_files, table_figure
from coalora.track.store import (EXPERIMENT, TrackedRun, experiment_id, flatten, log_metrics, log_params,
                                 numbers, open_client, remember)

log = logging.getLogger("coalora.track")


def log_pipeline(root: Path | str, profile: str | None = None, outcome: dict | None = None, *,
                 experiment: str | None = None, run_name: str | None = None) -> TrackedRun:
    """Log the pipeline run at ``root`` to MLflow: a parent run and its child runs.

    Args:
        root: the project folder.
        profile: the params profile the run used (``--profile``).
        outcome: the flow's result ``{"stages": {name: {"state", "summary"}}}``; None logs every stage whose
            output folder exists (``coalora track``).
        experiment: experiment name; default ``MLFLOW_EXPERIMENT_NAME`` or ``coalora``.
        run_name: the parent run's name; default ``pipeline <profile> <UTC time>``.
    """
    from coalora.params import dump_params, load_params
    from coalora.stages import STAGES

    root = Path(root).resolve()
    params = load_params(root, profile)
    states = {name: o.get("state") for name, o in (outcome or {}).get("stages", {}).items()}
    stages = [s for s in STAGES.values() if (s.name in states if outcome else (s.out_dir(root) / RECORD).is_file())]
    if not stages:
        raise UserError(f"track: no stage output under {root / 'artifacts'}; run `coalora run` first")
    client, uri = open_client(root)
    exp_id = experiment_id(client, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT, root, uri)
    close_abandoned(client, exp_id, root)
    name = run_name or f"pipeline {profile or 'default'} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}"
    parent = client.create_run(exp_id, run_name=name, tags={
        "coalora.kind": "pipeline", "coalora.root": str(root), "coalora.profile": profile or "",
        **{f"coalora.state.{n}": str(s) for n, s in states.items()}})
    parent_id = parent.info.run_id
    status = "FINISHED"
    try:
        log_params(client, parent_id, flatten(params.model_dump(mode="json")))
        client.log_text(parent_id, dump_params(params), "params.yaml")
        if (root / "dvc.lock").is_file():
            client.log_artifact(parent_id, str(root / "dvc.lock"))
        for stage in stages:
            interrupt.check()  # a stop request ends logging between stages; the run is marked FAILED
            _, tables = log_stage(client, exp_id, parent_id, stage, params, root, states.get(stage.name))
            log_headline(client, parent_id, stage, root, tables)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        client.set_terminated(parent_id, status)
    tracked = TrackedRun(parent_id, exp_id, uri)
    remember(root, [s.name for s in stages], tracked)
    return tracked


def log_headline(client, parent_id: str, stage, root: Path, tables: dict[Path, list[dict]]) -> None:
    """On the parent run, the first page a user opens: every stage's metrics files (``<stage>.<name>``, so
    runs compare side by side in the runs table) and the Pareto figures of the tables comparing methods."""
    for values in metrics_files(stage, stage.out_dir(root)):
        log_metrics(client, parent_id, {f"{stage.name}.{k}": v for k, v in numbers(flatten(values)).items()})
    for path, rows in tables.items():
        if "method" not in rows[0]:
            continue
        for metric in measured_columns(rows):
            log_figure(client, parent_id, table_figure(rows, metric), f"pareto/{stage.name}_{path.stem}_{metric}.png")


def close_abandoned(client, exp_id: str, root: Path) -> int:
    """Mark KILLED the runs of this project still RUNNING: a killed ``coalora run`` left them so.

    Called while holding the project's lock (coalora.lock), when no other run of this project can be logging.
    Returns how many runs (pipeline runs and the stage and method runs under them) were closed.
    """
    closed = 0
    queue = [run.info.run_id for run in client.search_runs(
        [exp_id], filter_string=f"tags.`coalora.root` = '{_quoted(str(root))}' and attributes.status = 'RUNNING'")]
    while queue:
        run_id = queue.pop()
        children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
        queue += [child.info.run_id for child in children if child.info.status == "RUNNING"]
        client.set_terminated(run_id, "KILLED")
        closed += 1
    if closed:
        log.warning("tracking: marked %d MLflow runs left RUNNING by an interrupted run as KILLED", closed)
    return closed


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
