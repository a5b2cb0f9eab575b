"""The MLflow store of a project: where it is, making it whole, and the values a run holds.

The store is ``sqlite:///<project>/.coalora/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set; artifacts go
to ``<project>/.coalora/mlartifacts`` (given explicitly: with sqlite, MLflow would otherwise resolve the
artifact root against the working directory). Here: the tracking URI and ``mlflow ui`` over it, creating
and checking the SQLite store (:func:`ensure_store`), the experiment, and writing params, metrics and
curves in MLflow's batches. mlflow is imported inside functions, so the library imports without it.
"""

from __future__ import annotations

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

from coalora.env import state_dir
from coalora.errors import UserError

log = logging.getLogger("coalora.track")

EXPERIMENT = "coalora"
DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
UI_HOST, UI_PORT = "127.0.0.1", 5000


@dataclass(frozen=True)
class TrackedRun:
    """Where a logged pipeline run lives."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def url(self, host: str = UI_HOST, port: int = UI_PORT) -> str:
        """The run's page in ``mlflow ui`` / ``coalora ui``."""
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def tracking_uri(root: Path | str) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir(root) / DB}"


def artifact_root(root: Path | str) -> Path:
    return state_dir(root) / ARTIFACT_DIR


def open_client(root: Path | str):
    """An ``MlflowClient`` on the project's store (made whole first when it is SQLite), and its URI."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        ensure_store(Path(uri.removeprefix("sqlite:///")), artifact_root(root))
    return MlflowClient(tracking_uri=uri), uri


def ui_command(root: Path | str, host: str = UI_HOST, port: int = UI_PORT) -> list[str]:
    """``mlflow ui`` on loopback over the project's store (artifacts are read from their local folder)."""
    import shutil

    mlflow = Path(sys.executable).parent / "mlflow"
    found = str(mlflow) if mlflow.exists() else shutil.which("mlflow")
    if found is None:
        raise UserError("ui: the `mlflow` command is not installed in this environment (pip install mlflow)")
    return [found, "ui", "--backend-store-uri", tracking_uri(root), "--host", host, "--port", str(port)]


# ---------------------------------------------------------------------------------------------------------
# The SQLite store, made so that a kill never leaves it half-made
# ---------------------------------------------------------------------------------------------------------

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
        revision, head = schema_revision(db), head_revision()
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


def head_revision() -> str:
    """The schema revision of the installed MLflow's stores."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def schema_revision(db: Path) -> str | None:
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
# Values: params, metrics and curves in MLflow's batches
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
    log_points(client, run_id, [(k, step, v) for k, v in sorted(values.items())])


def log_series(client, run_id: str, name: str, points: list[tuple[int, float]]) -> None:
    """One metric as a curve: ``(step, value)`` points, non-finite values left out."""
    log_points(client, run_id, [(metric_key(name), int(s), float(v)) for s, v in points if math.isfinite(float(v))])


def log_points(client, run_id: str, points: list[tuple[str, int, float]]) -> None:
    """``(key, step, value)`` metrics in batches of 1000 (MLflow's limit), all stamped now."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    items = [Metric(key, value, stamp, step) for key, step, value in points]
    for chunk in _chunks(items, 1000):
        client.log_batch(run_id, metrics=chunk)


def read_json_or_none(path: Path) -> Any:
    """A JSON file's content, or None (with a warning) when it cannot be read: logging is best effort."""
    from coalora.artifacts import read_json

    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("tracking: skipping unreadable %s: %s", path, exc)
        return None


# ---------------------------------------------------------------------------------------------------------
# What was logged last: a fully cached `coalora run` need not log the same results again
# ---------------------------------------------------------------------------------------------------------

LAST_TRACKED = "tracked.json"


def fingerprint(root: Path | str, names: list[str]) -> str:
    """Identity of the results a run would log: each stage's key (``stage.json``) and the tracking store."""
    from coalora.artifacts import ARTIFACTS, RECORD, content_id

    root = Path(root)
    keys = {}
    for name in names:
        record = root / ARTIFACTS / name / RECORD
        keys[name] = (read_json_or_none(record) or {}).get("key") if record.is_file() else None
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
    last = read_json_or_none(path) if path.is_file() else None
    if not isinstance(last, dict) or last.get("fingerprint") != fingerprint(root, names):
        return None
    return TrackedRun(last["run_id"], last["experiment_id"], last["tracking_uri"])
