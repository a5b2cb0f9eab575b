"""MLflow tracking of a pipeline run: one parent run, a child run per stage and per training method.

What is logged, read from the stage folders under ``artifacts/`` (whatever of them exists, so a partial run
or a newer stage layout still logs what it can):

    parent   all params (flattened), the resolved params.yaml, stage states as tags, and the Pareto-front
             figures of the evaluated configurations (each metric vs bits, every method on one figure)
    stage    the params sections the stage reads, its summary (numbers as metrics, the whole as stage.json),
             its metrics files as metrics, its small files (JSON/CSV/PNG/...) as artifacts, its tables of
             configurations (CSV with a ``bits`` column) as MLflow tables
    method   (nested in the train stage run) the loss curve from loss.csv as step metrics, per-round pool
             hypervolume from train.json ``rounds`` as step metrics, a Pareto figure per search round, the
             adapter files (θ included) as artifacts. Never the base model's weights.

The store is ``sqlite:///<project>/.coalora/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set; artifacts go
to ``<project>/.coalora/mlartifacts`` (given explicitly: with sqlite, MLflow would otherwise resolve the
artifact root against the working directory). mlflow and matplotlib are imported inside functions, so the
library stays importable where they are not installed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from coalora import interrupt
from coalora.artifacts import MANIFEST, RECORD, read_json
from coalora.env import state_dir
from coalora.errors import UserError

log = logging.getLogger("coalora.track")

EXPERIMENT = "coalora"
DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
UI_HOST, UI_PORT = "127.0.0.1", 5000
# Small readable files a stage run carries as artifacts; model weights (.safetensors, .bin) never are,
# except the adapter files of the training methods (below).
ARTIFACT_SUFFIXES = {".json", ".csv", ".png", ".svg", ".yaml", ".yml", ".md", ".txt", ".html"}
MAX_ARTIFACT_BYTES = 5 << 20
MAX_ADAPTER_BYTES = 1 << 30   # adapters and θ are megabytes; a gigabyte file is not an adapter
MAX_FILES_PER_STAGE = 200
# Metric names where lower is better; every other metric (accuracy, f1, ...) is higher-better.
LOWER_BETTER = re.compile(r"loss|ppl|perplexity|error|nll", re.IGNORECASE)
# Table columns that are not metrics.
NOT_METRICS = {"bits", "exact_bits", "budget", "budgets", "target_bits", "step", "round", "seed", "rank",
               "layers"}


@dataclass(frozen=True)
class TrackedRun:
    """Where a logged pipeline run lives."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def url(self, host: str = UI_HOST, port: int = UI_PORT) -> str:
        """The run's page in ``mlflow ui`` / ``coalora ui``."""
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


# ---------------------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------------------

def tracking_uri(root: Path | str) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir(root) / DB}"


def artifact_root(root: Path | str) -> Path:
    return state_dir(root) / ARTIFACT_DIR


def _client(root: Path | str):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        ensure_store(Path(uri.removeprefix("sqlite:///")), artifact_root(root))
    return MlflowClient(tracking_uri=uri), uri


def ensure_store(db: Path, artifacts: Path) -> None:
    """Make ``db`` a complete MLflow SQLite store, built so that a kill can never leave it half-made.

    MLflow creates a new store by running its schema migrations one by one; killed in between, the file is
    left half-migrated and every later open fails (``table scorers already exists``). So a new store is
    created and migrated under a temporary name (``.mlflow.db.init-<pid>``) and renamed into place whole.
    A store found at another schema revision holding no runs (left half-made by an older version, or by a
    killed ``mlflow db upgrade``) is moved aside (``mlflow.db.broken-<time>``) with a warning and made
    anew; one holding runs is never touched: a UserError says what to do. Temporary stores of dead
    processes are removed.
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_inits(db)
    if db.exists():
        revision, head = _schema_revision(db), _head_revision()
        if revision == head:
            return
        runs = _count_runs(db)
        if runs:
            raise UserError(f"tracking: the MLflow store {db} is at schema revision {revision}, not {head} (the "
                            f"installed MLflow's), and holds {runs} runs: back it up and run `mlflow db upgrade "
                            f"sqlite:///{db}`, or move it away to start a new store, or run with --no-track")
        aside = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(db, aside)
        log.warning("tracking: %s was half-made (schema revision %s of %s, no runs: a migration was "
                    "interrupted); moved it to %s and made a new store", db, revision, head, aside)
    tmp = db.with_name(f".{db.name}.init-{os.getpid()}")
    _sqlite_files(tmp, unlink=True)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{tmp}"
    store = SqlAlchemyStore(uri, artifacts.as_uri())  # runs every migration
    store.engine.dispose()  # closes the file: nothing still writes it when it is renamed
    SqlAlchemyStore._engine_map.pop(uri, None)  # MLflow caches engines by URI; this one has done its work
    os.replace(tmp, db)
    _sqlite_files(tmp, unlink=True)


def _sqlite_files(db: Path, unlink: bool = False) -> list[Path]:
    """The database file and SQLite's journal files beside it (optionally removed)."""
    found = [db.with_name(db.name + s) for s in ("", "-journal", "-wal", "-shm") if db.with_name(db.name + s).exists()]
    for path in found if unlink else ():
        path.unlink(missing_ok=True)
    return found


def _remove_dead_inits(db: Path) -> None:
    """Remove ``.mlflow.db.init-<pid>*`` files of processes that no longer run (killed while creating it)."""
    from coalora.processes import alive

    for path in db.parent.glob(f".{db.name}.init-*"):
        pid = path.name.removeprefix(f".{db.name}.init-").split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            path.unlink(missing_ok=True)


def _head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _schema_revision(db: Path) -> str | None:
    """The store's alembic revision (None: no revision recorded, e.g. killed before the first migration)."""
    import sqlite3

    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        try:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.DatabaseError:
            return None
    return row[0] if row else None


def _count_runs(db: Path) -> int:
    import sqlite3

    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        try:
            return int(connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        except sqlite3.DatabaseError:
            return 0


def experiment_id(client, name: str, root: Path | str, uri: str) -> str:
    """The experiment's id, creating it with its artifacts under the project's state folder.

    A tracking server (http[s] URI) chooses its own artifact store, so none is given there.
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None if uri.startswith(("http://", "https://", "databricks")) else \
        (artifact_root(root) / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------

def metric_key(name: str) -> str:
    """MLflow accepts letters, digits and ``_-./ :``; anything else becomes ``_``."""
    return re.sub(r"[^\w\-./ :]", "_", name)[:250]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b.c": leaf}``; lists of scalars stay one leaf, lists of dicts are dropped."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return {}
    return {prefix: obj} if prefix else {}


def numbers(flat: dict[str, Any]) -> dict[str, float]:
    """The finite numeric leaves (bools as 0/1) of a flattened dict, with MLflow-safe keys."""
    out = {}
    for key, value in flat.items():
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[metric_key(key)] = float(value)
    return out


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def log_params(client, run_id: str, flat: dict[str, Any]) -> None:
    """Params in batches of 100 (MLflow's limit); values as JSON text, cut at MLflow's 6000 characters."""
    from mlflow.entities import Param

    items = [Param(metric_key(k), json.dumps(v) if not isinstance(v, str) else v)
             for k, v in sorted(flat.items())]
    items = [Param(p.key, p.value[:6000]) for p in items]
    for chunk in _chunks(items, 100):
        client.log_batch(run_id, params=chunk)


def log_metrics(client, run_id: str, values: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    items = [Metric(k, v, stamp, step) for k, v in sorted(values.items())]
    for chunk in _chunks(items, 1000):
        client.log_batch(run_id, metrics=chunk)


def log_series(client, run_id: str, name: str, points: list[tuple[int, float]]) -> None:
    """One metric as a curve: ``(step, value)`` points, non-finite values left out."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    items = [Metric(metric_key(name), float(v), stamp, int(s)) for s, v in points if math.isfinite(float(v))]
    for chunk in _chunks(items, 1000):
        client.log_batch(run_id, metrics=chunk)


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("tracking: skipping unreadable %s: %s", path, exc)
        return None


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


# ---------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg: no display needed)
# ---------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def front_indices(xs: list[float], ys: list[float], lower_better: bool) -> list[int]:
    """Indices of the non-dominated points (fewer bits better; metric by ``lower_better``), by bits."""
    from coalora.pareto import non_dominated

    sign = 1.0 if lower_better else -1.0
    keep = non_dominated([(x, sign * y) for x, y in zip(xs, ys)])
    return sorted((i for i in range(len(xs)) if keep[i]), key=lambda i: (xs[i], sign * ys[i]))


def metric_columns(rows: list[dict]) -> list[str]:
    """Numeric columns of a configuration table other than bits and bookkeeping."""
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


def pareto_figure(rows: list[dict], metric: str, title: str = ""):
    """``metric`` vs bits, one colour and marker per method, each method's front drawn as a step line.

    Held-out (unseen) configurations, when the table says so (``set``/``seen``), are hollow markers; reference
    rows (full precision, at the weights' own bits) are left out of the bits axis.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    lower = bool(LOWER_BETTER.search(metric))
    methods = sorted({str(r.get("method", "all")) for r in rows})
    # A marker shape per method, earlier methods larger: methods that score the same config alike (common on
    # small models) stay visible instead of hiding under the last one drawn.
    markers = "osD^vPX*<>"
    for index, method in enumerate(methods):
        sel = [r for r in rows if str(r.get("method", "all")) == method and r.get("set") != "reference"
               and isinstance(r.get("bits"), float) and isinstance(r.get(metric), float)]
        if not sel:
            continue
        xs, ys = [r["bits"] for r in sel], [r[metric] for r in sel]
        unseen = [_is_unseen(r) for r in sel]
        marker, size = markers[index % len(markers)], max(14, 70 - 8 * index)
        line = ax.plot([], [], marker=marker, label=method)[0]
        colour = line.get_color()
        ax.scatter([x for x, u in zip(xs, unseen) if not u], [y for y, u in zip(ys, unseen) if not u],
                   color=colour, marker=marker, s=size)
        if any(unseen):
            ax.scatter([x for x, u in zip(xs, unseen) if u], [y for y, u in zip(ys, unseen) if u],
                       facecolors="none", edgecolors=colour, marker=marker, s=size)
        front = front_indices(xs, ys, lower)
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color=colour, alpha=0.8)
    ax.set_xlabel("average bits per parameter")
    ax.set_ylabel(f"{metric} ({'lower' if lower else 'higher'} is better)")
    ax.set_title(title or f"Pareto front: {metric} vs bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _is_unseen(row: dict) -> bool:
    for key in ("seen", "split", "set"):
        value = row.get(key)
        if isinstance(value, bool):
            return not value
        if isinstance(value, str):
            return value.lower() in ("unseen", "heldout", "held-out", "held_out")
    return False


def round_points(record: dict) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(pool points, front points) as (bits, f1) from one ``rounds`` entry of train.json.

    ``front`` may list pool ids, pool-like dicts or indices into the pool; anything else gives no front.
    """
    pool = [p for p in record.get("pool") or [] if isinstance(p, dict)]
    points = [(float(p["bits"]), float(p["f1"])) for p in pool if _num(p.get("bits")) and _num(p.get("f1"))]
    by_id = {p.get("id"): p for p in pool}
    front = []
    for item in record.get("front") or []:
        entry = by_id.get(item) if isinstance(item, str) else item if isinstance(item, dict) else \
            pool[item] if isinstance(item, int) and 0 <= item < len(pool) else None
        if entry and _num(entry.get("bits")) and _num(entry.get("f1")):
            front.append((float(entry["bits"]), float(entry["f1"])))
    return points, sorted(front)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def rounds_figure(method: str, rounds: list[dict], upto: int | None = None):
    """The pool (dots) and its front (line) of each search round up to ``upto``, later rounds darker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    shown = [r for r in rounds if upto is None or r.get("round", 0) <= upto]
    cmap = plt.get_cmap("viridis")
    for i, record in enumerate(shown):
        colour = cmap(i / max(1, len(shown) - 1))
        points, front = round_points(record)
        label = f"round {record.get('round', i)}"
        if _num(record.get("hypervolume")):
            label += f" (HV {record['hypervolume']:.4g})"
        if points:
            ax.scatter(*zip(*points), color=colour, s=14, alpha=0.6)
        if front:
            ax.step(*zip(*front), where="post", color=colour, label=label)
        elif points:
            ax.plot([], [], color=colour, label=label)
    ax.set_xlabel("average bits per parameter")
    ax.set_ylabel("f1 (lower is better)")
    ax.set_title(f"{method}: configuration pool and Pareto front per search round")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_figure(client, run_id: str, fig, path: str) -> None:
    plt = _pyplot()
    try:
        client.log_figure(run_id, fig, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Stage folders
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


def configuration_tables(folder: Path) -> dict[Path, list[dict]]:
    """CSV files at the top of the folder whose rows have ``bits`` and a metric column: the stage's tables
    of configurations (per-method files in subfolders, such as DVC's plot series, are parts of them)."""
    tables = {}
    for path in sorted(folder.glob("*.csv")):
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            continue
        try:
            rows = read_csv(path)
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        if rows and "bits" in rows[0] and metric_columns(rows):
            tables[path] = rows
    return tables


def method_folders(train_dir: Path) -> dict[str, Path]:
    """``method → folder`` for every folder of the train stage holding a train.json."""
    return {p.parent.name: p.parent for p in sorted(train_dir.glob("*/train.json"))}


def log_stage(client, exp_id: str, parent_id: str, stage, params, root: Path,
              state: str | None) -> tuple[str, dict[Path, list[dict]]]:
    """One child run for ``stage``; returns its id (method runs of train nest under it) and its tables."""
    folder = stage.out_dir(root)
    record = _read_json(folder / RECORD) or {}
    summary = record.get("summary") or {}
    run = client.create_run(exp_id, run_name=stage.name, tags={
        "mlflow.parentRunId": parent_id, "coalora.kind": "stage", "coalora.stage": stage.name,
        "coalora.state": state or "Existing", "coalora.stage_key": str(record.get("key", "")),
        "mlflow.note.content": stage.description})
    run_id = run.info.run_id
    log_params(client, run_id, flatten(params.sections(stage.params)))
    log_metrics(client, run_id, {f"summary.{k}": v for k, v in numbers(flatten(summary)).items()})
    for name in stage.metrics:
        values = _read_json(folder / name) if (folder / name).is_file() else None
        if isinstance(values, dict):
            log_metrics(client, run_id, numbers(flatten(values)))
    methods = method_folders(folder) if stage.name == "train" else {}
    for path in stage_files(folder, skip=methods.values()):
        interrupt.check()
        client.log_artifact(run_id, str(path), _artifact_dir(path.relative_to(folder)))
    tables = configuration_tables(folder)
    for path, rows in tables.items():
        log_table(client, run_id, rows, f"tables/{path.stem}.json")
        for metric in metric_columns(rows):
            log_figure(client, run_id, pareto_figure(rows, metric), f"pareto/{path.stem}_{metric}.png")
    for method, method_dir in methods.items():
        log_method(client, exp_id, run_id, method, method_dir)
    client.set_terminated(run_id, "FINISHED" if state in (None, "Completed", "Cached") else "FAILED")
    return run_id, tables


def _artifact_dir(rel: Path) -> str | None:
    parent = rel.parent.as_posix()
    return None if parent == "." else parent


def log_table(client, run_id: str, rows: list[dict], artifact_file: str) -> None:
    """``log_table`` wants columns of equal length: missing cells become None."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    client.log_table(run_id, {c: [r.get(c) for r in rows] for c in columns}, artifact_file)


def log_method(client, exp_id: str, parent_id: str, method: str, folder: Path) -> str:
    """A training method's run: params, final metrics, loss curve, search rounds, adapter files."""
    record = _read_json(folder / "train.json") or {}
    run = client.create_run(exp_id, run_name=f"train/{method}", tags={
        "mlflow.parentRunId": parent_id, "coalora.kind": "method", "coalora.method": method,
        "mlflow.note.content": str(record.get("description", ""))})
    run_id = run.info.run_id
    # Settings are params; results (losses, times, step counts) are metrics.
    settings = {k: v for k, v in record.items() if k not in _METHOD_METRICS and (
        isinstance(v, (str, int, bool)) or v is None or k in ("train", "budget", "target_bits", "k"))}
    log_params(client, run_id, flatten(settings))
    log_metrics(client, run_id, {k: float(record[k]) for k in _METHOD_METRICS if _num(record.get(k))})
    if (folder / "loss.csv").is_file():
        rows = read_csv(folder / "loss.csv")
        log_series(client, run_id, "loss", [(int(r["step"]), r["loss"]) for r in rows
                                            if _num(r.get("step")) and _num(r.get("loss"))])
        client.log_artifact(run_id, str(folder / "loss.csv"))
    log_rounds(client, run_id, method, record.get("rounds"), folder)
    log_adapters(client, run_id, folder)
    client.log_artifact(run_id, str(folder / "train.json"))
    client.set_terminated(run_id, "FINISHED")
    return run_id


_METHOD_METRICS = ("final_loss", "eval_loss_before_mean", "eval_loss_after_mean", "seconds", "wall_seconds",
                   "steps")


def log_rounds(client, run_id: str, method: str, rounds: Any, folder: Path) -> None:
    """Per-round pool hypervolume (and pool/front sizes) as step metrics, a Pareto figure per round."""
    if not isinstance(rounds, list) or not rounds:
        return
    rounds = [r for r in rounds if isinstance(r, dict)]
    for i, record in enumerate(rounds):
        step = int(record.get("round", i))
        values = {name: float(record[name]) for name in ("hypervolume", "hv_reference_bits", "step")
                  if _num(record.get(name))}
        values["pool_size"] = float(len(record.get("pool") or []))
        values["front_size"] = float(len(record.get("front") or []))
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


# ---------------------------------------------------------------------------------------------------------
# The pipeline run
# ---------------------------------------------------------------------------------------------------------

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
    client, uri = _client(root)
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


# ---------------------------------------------------------------------------------------------------------
# What was logged last: a fully cached `coalora run` need not log the same results again
# ---------------------------------------------------------------------------------------------------------

LAST_TRACKED = "tracked.json"


def fingerprint(root: Path | str, names: list[str]) -> str:
    """Identity of the results a run would log: each stage's key (``stage.json``) and the tracking store."""
    from coalora.artifacts import content_id

    root = Path(root)
    keys = {}
    for name in names:
        record = root / "artifacts" / name / RECORD
        keys[name] = (_read_json(record) or {}).get("key") if record.is_file() else None
    return content_id({"stages": keys, "tracking_uri": tracking_uri(root)})


def remember(root: Path | str, names: list[str], tracked: TrackedRun) -> None:
    """Record the run that holds the results of ``names`` as they are now (``.coalora/tracked.json``)."""
    from coalora.artifacts import write_json

    write_json(state_dir(root) / LAST_TRACKED, {"fingerprint": fingerprint(root, names), "run_id": tracked.run_id,
                                                "experiment_id": tracked.experiment_id,
                                                "tracking_uri": tracked.tracking_uri})


def already_tracked(root: Path | str, names: list[str]) -> TrackedRun | None:
    """The MLflow run already holding exactly these results, or None (without importing mlflow)."""
    path = state_dir(root) / LAST_TRACKED
    last = _read_json(path) if path.is_file() else None
    if not isinstance(last, dict) or last.get("fingerprint") != fingerprint(root, names):
        return None
    return TrackedRun(last["run_id"], last["experiment_id"], last["tracking_uri"])


def log_headline(client, parent_id: str, stage, root: Path, tables: dict[Path, list[dict]]) -> None:
    """On the parent run, the first page a user opens: every stage's metrics files (``<stage>.<name>``, so
    runs compare side by side in the runs table) and the Pareto figures of the tables comparing methods."""
    folder = stage.out_dir(root)
    for name in stage.metrics:
        values = _read_json(folder / name) if (folder / name).is_file() else None
        if isinstance(values, dict):
            log_metrics(client, parent_id, {f"{stage.name}.{k}": v for k, v in numbers(flatten(values)).items()})
    for path, rows in tables.items():
        if "method" not in rows[0]:
            continue
        for metric in metric_columns(rows):
            log_figure(client, parent_id, pareto_figure(rows, metric), f"pareto/{stage.name}_{path.stem}_{metric}.png")


def ui_command(root: Path | str, host: str = UI_HOST, port: int = UI_PORT) -> list[str]:
    """``mlflow ui`` on loopback over the project's store (artifacts are read from their local folder)."""
    import shutil

    mlflow = Path(sys.executable).parent / "mlflow"
    found = str(mlflow) if mlflow.exists() else shutil.which("mlflow")
    if found is None:
        raise UserError("ui: the `mlflow` command is not installed in this environment (pip install mlflow)")
    return [found, "ui", "--backend-store-uri", tracking_uri(root), "--host", host, "--port", str(port)]
