"""Prefect's temporary API server, tied to the life of the ``coalora run`` that starts it.

Prefect starts its own temporary server (``SubprocessASGIServer``: ``python -m uvicorn … prefect.server``)
when a flow runs with no API configured. That process is in the run's process group, so a Ctrl-C at the
terminal kills it while the flow still needs it, and nothing ends it when the run is killed (it is
re-parented to init and lives on). This module starts the same server (Prefect's ``create_app`` under
uvicorn, the UI off, the same environment) the way a run needs it:

- in its own session: terminal signals reach the run, which stops its stages and then the server;
- tied to the run (``coalora.processes.tie_to_parent``: ``PR_SET_PDEATHSIG`` plus a parent watchdog): when
  the run ends, however it ends, the server ends with it;
- on a socket the run binds first (port 0: the system picks a free one), so two servers never race for a
  port.

Importing this module imports nothing of Prefect; the server process does. Call :func:`api_server` before
the first Prefect import: it sets ``PREFECT_API_URL``, which Prefect reads when it loads its settings.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.error import URLError
from urllib.request import urlopen

log = logging.getLogger("coalora.server")

# What Prefect's SubprocessASGIServer sets for its temporary server: no UI, ephemeral mode.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
STOP_SECONDS = 5.0  # a clean stop gets this long before SIGKILL (Prefect's own choice)
DATABASE = "prefect.db"
LOG = "server.log"   # the server's own output, beside its database


class ServerError(RuntimeError):
    """The temporary server did not come up: it exited (``exited``), or did not answer in time."""

    def __init__(self, message: str, exited: bool):
        super().__init__(message)
        self.exited = exited


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _healthy(url: str) -> bool:
    try:
        with urlopen(f"{url}/health", timeout=2) as response:  # loopback only
            return response.status == 200
    except (URLError, OSError):
        return False


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")


def start(timeout: float | None = None) -> tuple[subprocess.Popen, str]:
    """Start the server; returns the process and its API URL once ``/api/health`` answers.

    Its output goes to ``server.log`` in Prefect's home (a pipe nobody reads could fill and stall it).

    Raises:
        ServerError: the server exited or did not answer within ``timeout`` seconds (default:
            ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, else 300), with its output.
    """
    timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 300))
    sock = _listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    log_path = prefect_home() / LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.server", str(os.getpid()), str(sock.fileno())],
                env={**os.environ, **SERVER_ENV}, pass_fds=(sock.fileno(),), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    finally:
        sock.close()  # the server holds its own copy
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ServerError(f"Prefect's temporary server exited with status {process.returncode}: {tail[0]} "
                              f"(all of it in {log_path})", exited=True)
        if time.monotonic() > deadline:
            stop(process)
            raise ServerError(f"Prefect's temporary server did not answer within {timeout:g} s (its output: "
                              f"{log_path}; more time: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)",
                              exited=False)
        time.sleep(0.1)
    return process, url


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after ``STOP_SECONDS``; reaps the process."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _set_aside(database: Path) -> Path:
    """Move a Prefect database the server could not start on out of the way; returns where it went."""
    aside = database.with_name(f"{database.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        source = database.with_name(database.name + suffix)
        if source.exists():
            shutil.move(source, aside.with_name(aside.name + suffix))
    return aside


@contextmanager
def api_server() -> Iterator[str | None]:
    """A temporary Prefect API for this process unless one is configured (``PREFECT_API_URL``).

    Yields the API URL (None when one was configured). The server is stopped at interpreter exit (after
    Prefect's own exit hooks, which still report to it), or with this process whatever ends it. A server
    that does not start on an existing database (left half-migrated by a killed first start) gets one
    more try on a fresh database; the old one is kept beside it, named ``….broken-<time>``. Prefect's
    database holds only its run history; coalora's cached results live in the result storage.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    database = prefect_home() / DATABASE
    try:
        process, url = start()
    except ServerError as first:
        if not (first.exited and database.exists()):
            raise
        aside = _set_aside(database)
        log.warning("Prefect's server did not start on %s (%s); moved it to %s and started on a fresh one",
                    database, str(first).splitlines()[0][:200], aside)
        process, url = start()
    # Registered before Prefect is imported, so it runs after Prefect's exit hooks (atexit is LIFO).
    atexit.register(stop, process)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def main(argv: list[str]) -> None:
    """The server process: ``python -m flows.server PARENT_PID FD``."""
    from coalora.processes import tie_to_parent

    parent, fd = int(argv[0]), int(argv[1])
    tie_to_parent(parent)
    import uvicorn

    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, log_level="error",
                            lifespan="on")
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


if __name__ == "__main__":
    main(sys.argv[1:])
