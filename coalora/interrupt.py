"""Stopping when asked: SIGINT (Ctrl-C) and SIGTERM end ``coalora run`` / ``coalora stage`` within seconds.

The signal handler only records the signal. Long loops (pretraining and training steps, calibration batches
and layers, evaluation rows and windows, search measurements, MLflow logging) call :func:`check` at every
step, which raises :class:`Interrupted` there: the stage's temporary output folder is discarded, written
checkpoints and finished stages stay, and the command prints one line and exits 128 + signal (130 for
SIGINT, 143 for SIGTERM). Work with no step to stop at (one lm-eval call, a GP fit) is cut short after
``GRACE`` seconds, and a second signal cuts it short at once: everything coalora writes is atomic, so a hard
stop leaves exactly what a kill -9 would, which the next run resumes from (and cleans up, coalora.lock).

Either way, the processes the run started (Prefect's API server, compilers, Dask workers) are stopped
before it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from coalora import processes

T = TypeVar("T")
GRACE = 6.0            # seconds a stop request waits for the next step before the hard stop
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None            # the first signal received
_announced = threading.Lock()            # the one line is printed once, by whoever stops first
_deadline: threading.Timer | None = None  # the hard stop GRACE seconds after the request


class Interrupted(BaseException):
    """A stop was requested (not an error: a BaseException, so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _requested


def check() -> None:
    """Raise :class:`Interrupted` when a stop was requested; call it at every step of a long loop."""
    if _requested is not None:
        raise Interrupted(_requested)


def message(signum: int) -> str:
    return (f"coalora: stopped by {signal.Signals(signum).name}; finished stages and the last checkpoint are "
            f"kept: run the same command again to resume")


def announce(signum: int) -> bool:
    """Print the one line (False when it was printed already)."""
    if not _announced.acquire(blocking=False):
        return False
    print(message(signum), file=sys.stderr, flush=True)
    return True


def hard_stop(signum: int) -> None:
    """Print the line, stop every process this one started, and exit 128 + signal now."""
    announce(signum)
    processes.stop(processes.descendants(os.getpid()))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(128 + signum)  # no atexit: Prefect's would report to a server that is gone


def _handle(signum: int, _frame: Any) -> None:
    global _requested, _deadline
    if _requested is not None:  # asked twice: do not wait for the next step
        hard_stop(_requested)
    _requested = signum
    # From here on only the one line is shown: Prefect, lm-eval and the stage loggers would each report the
    # stop as a failure, with tracebacks. A stopped process does nothing but exit, so logging stays off.
    logging.disable(logging.CRITICAL)
    _deadline = threading.Timer(GRACE, hard_stop, args=(signum,))
    _deadline.daemon = True
    _deadline.start()


@contextmanager
def handling() -> Iterator[None]:
    """Install the SIGINT/SIGTERM handlers for the duration (main thread only; elsewhere a no-op).

    On leaving, the hard-stop deadline is cancelled (the work ended by itself); a request already received
    stays visible to :func:`requested` until the next ``handling()`` starts afresh.
    """
    global _requested, _announced
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _requested is not None:  # a new command in the same process (tests): start afresh
        _requested, _announced = None, threading.Lock()
        logging.disable(logging.NOTSET)
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    try:
        yield
    finally:
        if _deadline is not None:
            _deadline.cancel()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread while this (main) thread stays free to take signals.

    Prefect's flow engine installs its own SIGTERM handler when it runs in the main thread, and its way of
    stopping waits for the running task to end; run elsewhere, the flow leaves signals to :func:`handling`.
    Returns what ``fn`` returns, or raises what it raised.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller, re-raised there
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="coalora-flow", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)  # short waits: the main thread runs signal handlers between them
    if "error" in outcome:
        error = outcome["error"]
        if _requested is not None and not isinstance(error, Interrupted):
            # a stop surfaces through Prefect as a failed or crashed run (its own exception types)
            raise Interrupted(_requested) from error
        raise error
    return outcome["value"]
