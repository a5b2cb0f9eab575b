"""Processes a run starts must not outlive it: liveness, a process's descendants, tying a child to its parent.

Linux first (``/proc``, ``prctl``); elsewhere the parent watchdog alone ties a child to its parent and
:func:`descendants` finds nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1   # linux/prctl.h
WATCH_SECONDS = 0.5    # how often a tied child looks at its parent


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts as gone: it runs no code)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        # EPERM: it exists, owned by someone else
    return _state(pid) != "Z"


def _state(pid: int) -> str | None:
    """The one-letter state from ``/proc/<pid>/stat`` (None where unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None.

    A pid is reused after its process ends; (pid, start time) names one process for good.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children first, then theirs), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def stop(pids: list[int], grace: float = 1.0) -> None:
    """SIGTERM ``pids``, then SIGKILL whichever still runs after ``grace`` seconds."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # already gone


def tie_to_parent(parent: int) -> None:
    """End this process when ``parent`` ends, however it ends (kill -9 included).

    ``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL the moment the parent dies; a daemon thread that
    checks every ``WATCH_SECONDS`` whether this process was re-parented covers systems without it. Call it
    first thing in the child: if the parent is already gone, this process exits at once.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # not Linux: the watchdog below does it
    if os.getppid() != parent:  # the parent died before the kernel could be told
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
