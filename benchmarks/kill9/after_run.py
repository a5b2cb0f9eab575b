"""After a run: what it must not leave behind, the stage states it reported, the repairs it logged."""

from __future__ import annotations

import fcntl
import re
from pathlib import Path

from .events import STAGES


def state_problems(root: Path) -> list[str]:
    """What a finished run must not leave: a held lock, temporary folders or stores, an old or half-made
    MLflow store, MLflow runs of this project still RUNNING."""
    problems = []
    lock = root / ".coalora" / "run.lock"
    if lock.exists():
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                problems.append("the project lock is still held")
        if lock.read_text().strip():
            problems.append(f"the project lock still names a holder: {lock.read_text().strip()}")
    art = root / "artifacts"
    left = [p.relative_to(root).as_posix() for pattern in (".tmp-*", ".old-*", ".*.tmp")
            for p in art.rglob(pattern)]
    left += [p.relative_to(root).as_posix() for p in (root / ".coalora").glob(".mlflow.db.init-*")]
    if left:
        problems.append(f"temporary files left: {', '.join(sorted(left)[:5])}")
    if (art / ".work").exists() and any((art / ".work").iterdir()):
        problems.append(f"work folders left: {sorted(p.name for p in (art / '.work').iterdir())}")
    problems += _mlflow_problems(root)
    return problems


def _mlflow_problems(root: Path) -> list[str]:
    db = root / ".coalora" / "mlflow.db"
    if not db.exists():
        return ["no MLflow store"]
    from coalora.track import head_revision, schema_revision

    if schema_revision(db) != head_revision():
        return [f"MLflow store at revision {schema_revision(db)}, not {head_revision()}"]
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        running = connection.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    return [f"{running} MLflow runs still RUNNING"] if running else []


def stage_states(stdout: str) -> dict[str, str]:
    """``stage → state`` from ``coalora run``'s stage lines."""
    states = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in STAGES:
            states[parts[0]] = parts[1]
    return states


REPAIRS = re.compile(r"(coalora\.(lock|server|track) WARNING .*)")


def repairs(root: Path) -> list[str]:
    """What the runs said they repaired (a dead run's leftovers, a half-made store, runs left RUNNING)."""
    found = []
    for log in sorted(root.glob("*.err")):
        for match in REPAIRS.finditer(log.read_text(errors="replace")):
            line = re.sub(r"/\S+/", "…/", match.group(1))  # paths shortened
            found.append(f"{log.stem}: {line[:160]}")
    return found
