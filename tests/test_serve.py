"""`coalora serve`: a scheduled run of the pipeline deployment fires and completes on a local Prefect server.

A real `prefect server start` on a loopback port (Prefect's temporary server never fires schedules), a
`coalora serve --interval 5` runner against it, the `data` stage of the smoke profile as the work.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_pipeline import make_project

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, body: dict | None = None, timeout: float = 5.0):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(check, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: a process exited early ({proc.args[:3]}): {_tail(proc)}")
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; {' | '.join(_tail(p) for p in procs)}")


def _tail(proc) -> str:
    path = getattr(proc, "log_path", None)
    return Path(path).read_text()[-2000:] if path and Path(path).exists() else ""


def start(args, env, log: Path, cwd: Path) -> subprocess.Popen:
    """A process in its own session (so it and its children can be stopped together), output to ``log``."""
    handle = log.open("w")
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log_path = log
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGINT first (the runner pauses its schedule on shutdown), then SIGTERM, then SIGKILL, by group id."""
    for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue


def test_scheduled_run_fires_and_completes_on_a_local_server(repo_root, tmp_path):
    root = make_project(repo_root, tmp_path / "project")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           # the scheduler looks for due deployments every second instead of every minute
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}
    env.pop("PREFECT_API_URL", None)
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                   tmp_path / "server.log", tmp_path)
    runner = None
    try:
        wait_for(lambda: api(f"{url}/health") is True, 90, "prefect server health", [server])
        runner_env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_API_URL": url}
        runner = start([sys.executable, "-m", "coalora.cli", "--root", str(root), "serve", "--interval", "5",
                        "--stages", "data", "--no-track", "--name", "every-5s"], runner_env,
                       tmp_path / "serve.log", root)

        def completed():
            runs = api(f"{url}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
            return [r for r in runs if r.get("deployment_id")]

        runs = wait_for(completed, 120, "a scheduled run reaching Completed", [server, runner])
        deployment = api(f"{url}/deployments/{runs[0]['deployment_id']}")
        assert deployment["name"] == "every-5s"
        assert deployment["parameters"]["stages"] == ["data"]
        assert deployment["schedules"][0]["schedule"]["interval"] == 5
        assert runs[0]["auto_scheduled"] is True  # fired by the schedule, not by hand
        assert (root / "artifacts" / "data" / "stage.json").is_file()
    finally:
        if runner is not None:
            stop(runner)
        stop(server)


def test_serve_rejects_a_bad_schedule_and_a_missing_server(repo_root, tmp_path):
    root = make_project(repo_root, tmp_path / "project")
    cli = [sys.executable, "-m", "coalora.cli", "--root", str(root), "serve"]
    bad = subprocess.run(cli + ["--cron", "every day"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--cron" in bad.stderr, bad.stderr
    both = subprocess.run(cli + ["--cron", "* * * * *", "--interval", "5"], capture_output=True, text=True)
    assert both.returncode == 2 and "exactly one of --cron" in both.stderr
    port = free_port()  # nothing listens there
    missing = subprocess.run(cli + ["--cron", "*/5 * * * *", "--api-url", f"http://127.0.0.1:{port}/api"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "prefect server start" in missing.stderr, missing.stderr
