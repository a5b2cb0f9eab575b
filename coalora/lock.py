"""One run per project at a time: ``coalora run`` and ``coalora stage`` (what ``dvc repro`` calls) hold
``.coalora/run.lock`` while they work.

The lock is an exclusive ``flock`` on that file, so the kernel releases it when its holder ends, however it
ends (kill -9 included): a lock left by a killed run is stale by construction and the next run simply takes
it. The file also records the holder (pid, process start time, command, start time), for the message a
second run prints (exit status 2) and for recognising that the previous holder died without finishing: the
new holder then removes what only a dead run can have left behind (the half-written output folders
``.tmp-*`` and ``.old-*``, and the ``.*.tmp`` files of atomic writes, anywhere under ``artifacts/``), since
no other process can be writing them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from coalora import processes
from coalora.artifacts import ARTIFACTS
from coalora.env import state_dir
from coalora.errors import UserError

log = logging.getLogger("coalora.lock")

LOCK = "run.lock"
# the temporary names of coalora.artifacts: atomic_folder's folders, write_text_atomic's files
LEFTOVERS = (".tmp-*", ".old-*", ".*.tmp")

_held: dict[Path, "ProjectLock"] = {}  # the locks this process holds, by lock file


@dataclass
class ProjectLock:
    """A held project lock; :meth:`release` (or process exit) frees it. Re-entrant within a process: the
    flow of a ``coalora run`` takes the lock its command already holds (a scheduled flow takes it itself)."""

    path: Path
    fd: int
    depth: int = 1

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.fd >= 0:
            _held.pop(self.path, None)
            os.ftruncate(self.fd, 0)  # no holder recorded: a reader sees a free lock, not a dead one
            os.close(self.fd)         # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> "ProjectLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: Path) -> dict | None:
    """What the lock file records about its (last) holder; None when empty or unreadable."""
    try:
        record = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def acquire(root: Path | str, command: str) -> ProjectLock:
    """Take the project's lock for ``command`` or raise a UserError naming the process that holds it.

    Under a multi-process launch (``accelerate launch``) only rank 0 takes it: the other ranks are part of
    the same run.
    """
    if os.environ.get("RANK", "0") != "0":
        return ProjectLock(Path(), -1)
    root = Path(root).resolve()
    path = state_dir(root) / LOCK
    if path in _held:  # this process holds it already
        _held[path].depth += 1
        return _held[path]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by programs the run starts (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(_busy_message(root, holder(path))) from None
    previous = holder(path)
    if previous is not None and previous["pid"] != os.getpid():
        # the lock was free yet names a holder: that run ended without releasing it (killed)
        log.warning("a previous %s (pid %d, started %s) ended without finishing; cleaning up after it",
                    previous.get("command", "run"), previous["pid"], previous.get("started", "?"))
        remove_leftovers(root)
    record = {"pid": os.getpid(), "start_time": processes.start_time(os.getpid()), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[path] = ProjectLock(path, fd)
    return _held[path]


def _busy_message(root: Path, record: dict | None) -> str:
    if record is None:
        return (f"another coalora process is working in {root} (it holds {state_dir(root) / LOCK}); "
                f"wait for it to finish")
    pid = record["pid"]
    return (f"another `{record.get('command', 'coalora')}` (pid {pid}, started {record.get('started', '?')}) "
            f"is working in {root}; wait for it to finish, or stop it with `kill -INT {pid}` "
            f"(it keeps what it finished and the next run resumes)")


def remove_leftovers(root: Path) -> list[Path]:
    """Delete the temporary folders and files of runs that died (only while holding the lock)."""
    artifacts = Path(root) / ARTIFACTS
    found = sorted({p for pattern in LEFTOVERS for p in artifacts.rglob(pattern)}) if artifacts.is_dir() else []
    found = [p for p in found if not any(q in p.parents for q in found)]  # a folder's contents go with it
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted run", path)
    return found
