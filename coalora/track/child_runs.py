"""What a stage's run and a training method's run hold, read from the stage folders under ``artifacts/``.

    stage    the params sections the stage reads, its summary (numbers as metrics, the whole as stage.json),
             its metrics files as metrics, its small files (JSON/CSV/PNG/...) as artifacts, its tables of
             configurations (CSV with a ``bits`` column) as MLflow tables with a Pareto figure per metric
    method   (nested in the train stage run) the loss curve from loss.csv as step metrics, per-round pool
             hypervolume from train.json ``rounds`` as step metrics, a Pareto figure per search round, the
             adapter files (θ included) as artifacts. Never the base model's weights.

Whatever of a stage folder exists is logged, so a partial run still logs what it can.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Iterable

from coalora import interrupt
from coalora.artifacts import MANIFEST, RECORD
from coalora.figures import (METHOD_SERIES, Point, is_number, lower_is_better, pareto_figure, pyplot,
                                   rounds_figure)
from coalora.trained import LOSS_CSV, TRAIN_JSON
from coalora.track.store import flatten, log_metrics, log_params, log_series, numbers, read_json_or_none

log = logging.getLogger("coalora.track")

# Small readable files a stage run carries as artifacts; model weights (.safetensors, .bin) never are,
# except the adapter files of the training methods (below).
ARTIFACT_SUFFIXES = {".json", ".csv", ".png", ".svg", ".yaml", ".yml", ".md", ".txt", ".html"}
MAX_ARTIFACT_BYTES = 5 << 20
MAX_ADAPTER_BYTES = 1 << 30   # adapters and θ are megabytes; a gigabyte file is not an adapter
MAX_FILES_PER_STAGE = 200
# Table columns that are not measurements.
NOT_METRICS = {"bits", "exact_bits", "budget", "budgets", "target_bits", "step", "round", "seed", "rank",
               "layers"}
# train.json keys that are results (metrics); the other scalars are settings (params).
METHOD_METRICS = ("final_loss", "eval_loss_before_mean", "eval_loss_after_mean", "seconds", "wall_seconds",
                  "steps")


# ---------------------------------------------------------------------------------------------------------
# Tables of configurations
# ---------------------------------------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict[str, Any]]:
    """CSV rows with numeric-looking cells as floats (the tables here are small)."""
    with path.open(newline="") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return {"true": True, "false": False}.get(text.lower(), text)


def measured_columns(rows: list[dict]) -> list[str]:
    """The columns of a configuration table holding measurements: numeric, other than bits and bookkeeping."""
    if not rows:
        return []
    columns = []
    for key in rows[0]:
        if key in NOT_METRICS or key.endswith(("_id", "seconds")) or key == "id":
            continue
        if all(isinstance(r.get(key), float) or r.get(key) is None for r in rows) and \
                any(isinstance(r.get(key), float) for r in rows):
            columns.append(key)
    return columns


def configuration_tables(folder: Path) -> dict[Path, list[dict]]:
    """CSV files at the top of the folder whose rows have ``bits`` and a measured column: the stage's tables
    of configurations (per-method files in subfolders, such as DVC's plot series, are parts of them)."""
    tables = {}
    for path in sorted(folder.glob("*.csv")):
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            continue
        try:
            rows = read_csv(path)
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        if rows and "bits" in rows[0] and measured_columns(rows):
            tables[path] = rows
    return tables


def table_figure(rows: list[dict], metric: str):
    """The Pareto figure of ``metric`` in a configuration table (``coalora.evaluate.table``'s columns
    ``method`` and ``set`` where it has them; a table without ``method`` is one series)."""
    from coalora.evaluate.plan import FULL, NONE

    points = [Point(str(r.get("method", METHOD_SERIES)), str(r.get("set") or ""), r["bits"], r[metric])
              for r in rows if isinstance(r.get("bits"), float) and isinstance(r.get(metric), float)]
    return pareto_figure(points, metric, lower_is_better(metric), full=FULL, baseline=NONE)


def log_table(client, run_id: str, rows: list[dict], artifact_file: str) -> None:
    """``log_table`` wants columns of equal length: missing cells become None."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    client.log_table(run_id, {c: [r.get(c) for r in rows] for c in columns}, artifact_file)


def log_figure(client, run_id: str, fig, path: str) -> None:
    try:
        client.log_figure(run_id, fig, path)
    finally:
        pyplot().close(fig)


# ---------------------------------------------------------------------------------------------------------
# A stage's run
# ---------------------------------------------------------------------------------------------------------

def stage_files(folder: Path, skip: Iterable[Path] = ()) -> list[Path]:
    """Small readable files of a stage folder (never weights), capped in size and count."""
    skipped = [s.resolve() for s in skip]
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == MANIFEST or path.suffix.lower() not in ARTIFACT_SUFFIXES:
            continue
        if any(s in path.resolve().parents for s in skipped):
            continue
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            log.info("tracking: not logging %s (%d bytes)", path, path.stat().st_size)
            continue
        files.append(path)
    if len(files) > MAX_FILES_PER_STAGE:
        log.info("tracking: %s has %d small files; logging the first %d", folder, len(files), MAX_FILES_PER_STAGE)
    return files[:MAX_FILES_PER_STAGE]


def method_folders(train_dir: Path) -> dict[str, Path]:
    """``method → folder`` for every folder of the train stage holding a train.json."""
    return {p.parent.name: p.parent for p in sorted(train_dir.glob("*/train.json"))}


def metrics_files(stage, folder: Path) -> Iterable[dict]:
    """The stage's metrics files that exist and hold a JSON object."""
    for name in stage.metrics:
        values = read_json_or_none(folder / name) if (folder / name).is_file() else None
        if isinstance(values, dict):
            yield values


def log_stage(client, exp_id: str, parent_id: str, stage, params, root: Path,
              state: str | None) -> tuple[str, dict[Path, list[dict]]]:
    """One child run for ``stage``; returns its id (method runs of train nest under it) and its tables."""
    folder = stage.out_dir(root)
    record = read_json_or_none(folder / RECORD) or {}
    summary = record.get("summary") or {}
    run = client.create_run(exp_id, run_name=stage.name, tags={
        "mlflow.parentRunId": parent_id, "coalora.kind": "stage", "coalora.stage": stage.name,
        "coalora.state": state or "Existing", "coalora.stage_key": str(record.get("key", "")),
        "mlflow.note.content": stage.description})
    run_id = run.info.run_id
    log_params(client, run_id, flatten(params.sections(stage.params)))
    log_metrics(client, run_id, {f"summary.{k}": v for k, v in numbers(flatten(summary)).items()})
    for values in metrics_files(stage, folder):
        log_metrics(client, run_id, numbers(flatten(values)))
    methods = method_folders(folder) if stage.name == "train" else {}
    for path in stage_files(folder, skip=methods.values()):
        interrupt.check()
        rel = path.relative_to(folder).parent.as_posix()
        client.log_artifact(run_id, str(path), None if rel == "." else rel)
    tables = configuration_tables(folder)
    for path, rows in tables.items():
        log_table(client, run_id, rows, f"tables/{path.stem}.json")
        for metric in measured_columns(rows):
            log_figure(client, run_id, table_figure(rows, metric), f"pareto/{path.stem}_{metric}.png")
    for method, method_dir in methods.items():
        log_method(client, exp_id, run_id, method, method_dir)
    client.set_terminated(run_id, "FINISHED" if state in (None, "Completed", "Cached") else "FAILED")
    return run_id, tables


# ---------------------------------------------------------------------------------------------------------
# A training method's run
# ---------------------------------------------------------------------------------------------------------

def log_method(client, exp_id: str, parent_id: str, method: str, folder: Path) -> str:
    """A training method's run: params, final metrics, loss curve, search rounds, adapter files."""
    record = read_json_or_none(folder / TRAIN_JSON) or {}
    run = client.create_run(exp_id, run_name=f"train/{method}", tags={
        "mlflow.parentRunId": parent_id, "coalora.kind": "method", "coalora.method": method,
        "mlflow.note.content": str(record.get("description", ""))})
    run_id = run.info.run_id
    # Settings are params; results (losses, times, step counts) are metrics.
    settings = {k: v for k, v in record.items() if k not in METHOD_METRICS and (
        isinstance(v, (str, int, bool)) or v is None or k in ("train", "budget", "target_bits", "k"))}
    log_params(client, run_id, flatten(settings))
    log_metrics(client, run_id, {k: float(record[k]) for k in METHOD_METRICS if is_number(record.get(k))})
    if (folder / LOSS_CSV).is_file():
        rows = read_csv(folder / LOSS_CSV)
        log_series(client, run_id, "loss", [(int(r["step"]), r["loss"]) for r in rows
                                            if is_number(r.get("step")) and is_number(r.get("loss"))])
        client.log_artifact(run_id, str(folder / LOSS_CSV))
    if record.get("rounds"):
        log_rounds(client, run_id, method, record["rounds"], folder)
    log_adapters(client, run_id, folder)
    client.log_artifact(run_id, str(folder / TRAIN_JSON))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def log_rounds(client, run_id: str, method: str, rounds: list[dict], folder: Path) -> None:
    """Per-round pool hypervolume (and pool/front sizes) as step metrics, a Pareto figure per round.

    ``rounds`` is train.json's (``coalora.search.rounds.round_log`` entries).
    """
    for record in rounds:
        step = int(record["round"])
        values = {"hypervolume": float(record["hypervolume"]), "step": float(record["step"]),
                  "pool_size": float(len(record["pool"])), "front_size": float(len(record["front"]))}
        log_metrics(client, run_id, {f"search.{k}": v for k, v in values.items()}, step=step)
        log_figure(client, run_id, rounds_figure(method, rounds, upto=step), f"pareto/round_{step:03d}.png")
    log_figure(client, run_id, rounds_figure(method, rounds), "pareto/rounds.png")
    if (folder / "rounds.csv").is_file():
        client.log_artifact(run_id, str(folder / "rounds.csv"))


def log_adapters(client, run_id: str, folder: Path) -> None:
    """Every safetensors file under the method folder (the adapter, θ included; per-config adapters)."""
    for path in sorted(folder.rglob("*.safetensors")):
        size = path.stat().st_size
        if size > MAX_ADAPTER_BYTES:
            log.warning("tracking: not logging %s: %d bytes is no adapter", path, size)
            continue
        client.log_artifact(run_id, str(path), "adapter/" + path.parent.relative_to(folder).as_posix()
                            if path.parent != folder else "adapter")
