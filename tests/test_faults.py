"""Faults a run must survive: a second run in the same folder, a killed holder of any lock, a stop request,
a killed MLflow migration, a killed run's helper processes, a stale lock of botorch's kernel build.

The end-to-end kill -9 trials (every stage, MLflow logging) are ``benchmarks/kill9/`` and a sample of them
``tests/test_kill9.py``; the signal handling of a whole ``coalora run`` is ``tests/test_signals.py``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coalora import interrupt, lock, processes
from coalora.errors import UserError

PYTHON = sys.executable


def _holder(root: Path) -> subprocess.Popen:
    """A process that takes the project lock of ``root`` and keeps it until killed."""
    code = ("import sys, time; from coalora import lock; lock.acquire(sys.argv[1], 'coalora run'); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([PYTHON, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _project(repo_root: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    return root


# ---- one run per project ---------------------------------------------------------------------------------

def test_a_second_holder_is_refused_with_the_holders_pid(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"pid {holder.pid}\b.*kill -INT {holder.pid}"):
            lock.acquire(tmp_path, "coalora stage data")
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_stale_and_its_leftovers_go(tmp_path, caplog):
    holder = _holder(tmp_path)
    half = tmp_path / "artifacts" / ".tmp-train-1234abcd"           # a stage output being written
    old = tmp_path / "artifacts" / ".old-data-1234abcd"             # a replaced output not yet removed
    part = tmp_path / "artifacts" / ".work" / "evaluate" / "rows" / ".x.json.abc.tmp"  # an atomic write
    kept = tmp_path / "artifacts" / ".work" / "train" / "coalora" / "step-00000004" / "state.json"
    for path in (half / "a.json", old / "b.json", part, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.holder(tmp_path / ".coalora" / lock.LOCK)["pid"] == holder.pid  # the dead run's record
    with caplog.at_level(logging.WARNING, logger="coalora.lock"):
        held = lock.acquire(tmp_path, "coalora run")
    try:
        assert f"pid {holder.pid}" in caplog.text and "ended without finishing" in caplog.text
        assert not half.exists() and not old.exists() and not part.exists()
        assert kept.is_file()  # checkpoints are what a resumed run needs
        assert lock.holder(held.path)["pid"] == os.getpid()
    finally:
        held.release()
    assert lock.holder(held.path) is None  # released: nothing recorded, nothing to clean up next time


def test_the_lock_is_reentrant_within_a_process_and_free_after_the_last_release(tmp_path):
    outer = lock.acquire(tmp_path, "coalora run")
    inner = lock.acquire(tmp_path, "flow coalora-pipeline")
    assert inner is outer
    inner.release()
    assert lock.holder(outer.path)["command"] == "coalora run"  # still held by the outer command
    outer.release()
    again = lock.acquire(tmp_path, "coalora stage data")  # free: a new holder gets it
    again.release()


@pytest.mark.parametrize("command", [["run"], ["stage", "data"], ["track"]])
def test_cli_stops_with_exit_2_while_another_run_holds_the_project(repo_root, tmp_path, capsys, command):
    from coalora.cli import main

    root = _project(repo_root, tmp_path / "project")
    holder = _holder(root)
    try:
        assert main(["--root", str(root), *command]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {holder.pid}" in err[0], err
    assert not (root / "artifacts").exists()  # nothing was started or written


# ---- stop requests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_is_raised_at_the_next_check_with_its_exit_status(signum, code):
    # The handler there before (Python's default_int_handler, or SIG_IGN when the test run was started in the
    # background by a non-interactive shell) is the one handling() must put back.
    before = signal.getsignal(signal.SIGINT)
    steps = 0
    with interrupt.handling():
        with pytest.raises(interrupt.Interrupted) as caught:
            while steps < 1000:
                interrupt.check()
                steps += 1
                if steps == 3:
                    os.kill(os.getpid(), signum)
    assert steps == 3 and caught.value.exit_code == code
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    with interrupt.handling():  # a new command starts afresh
        interrupt.check()
    logging.disable(logging.NOTSET)


def test_in_thread_returns_and_raises_what_the_function_does():
    assert interrupt.in_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad"):
        interrupt.in_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))


def test_a_stopped_command_prints_one_line_and_stops_its_children(tmp_path):
    """A stage with no step to stop at (here: sleeping) is cut short GRACE seconds after the signal, with the
    one line, exit 143, and no child process left."""
    script = textwrap.dedent("""
        import subprocess, sys, time
        from coalora import interrupt
        with interrupt.handling():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print(child.pid, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=interrupt.GRACE + 10)
    assert proc.returncode == 143
    assert err.strip().splitlines() == [interrupt.message(signal.SIGTERM)]
    assert not processes.alive(child)


# ---- processes tied to the run ---------------------------------------------------------------------------

def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while processes.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not processes.alive(pid)


def test_a_tied_child_ends_when_its_parent_is_killed():
    parent = textwrap.dedent("""
        import os, subprocess, sys, time
        code = "import sys, time; from coalora.processes import tie_to_parent; tie_to_parent(int(sys.argv[1])); " \\
               "print('tied', flush=True); time.sleep(600)"
        child = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], start_new_session=True,
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([PYTHON, "-c", parent], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    assert processes.alive(child) and child in processes.descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)  # the child is in its own session: only the tie can end it
    proc.wait()
    assert _wait_gone(child), "the tied child outlived its killed parent"


def test_prefects_server_ends_with_a_killed_run(tmp_path):
    """The temporary API server of `coalora run` (flows.server) answers, and dies with its parent's kill -9."""
    script = textwrap.dedent("""
        import os, sys, time
        from coalora.env import configure
        configure(sys.argv[1])
        os.environ.pop("PREFECT_API_URL", None)
        from flows.server import api_server
        with api_server() as url:
            import httpx
            print(httpx.get(url + "/health").status_code, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([PYTHON, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "200"
        servers = [pid for pid in processes.descendants(proc.pid)
                   if b"flows.server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(servers) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run's whole process group; the server has its own session
        proc.wait()
    assert _wait_gone(servers[0]), "Prefect's server outlived the killed run"


# ---- botorch's run-time kernel build ---------------------------------------------------------------------

def test_a_search_round_neither_builds_botorchs_kernel_nor_waits_on_a_stale_lock(tmp_path):
    """botorch 0.18 compiles its fused kernel on first use under a lock file; a killed compile leaves the lock
    and every later search waited on it forever. Proposals use the pure-PyTorch path: a stale lock is ignored
    and nothing is compiled."""
    ext = tmp_path / "torch_extensions"
    stale = ext / "py311_cpu" / "logei_fused_ext" / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    (ext / "logei_fused_ext").mkdir()
    (ext / "logei_fused_ext" / "lock").write_text("")
    before = sorted(p.relative_to(ext) for p in ext.rglob("*"))
    code = textwrap.dedent("""
        import numpy as np, torch
        import botorch.acquisition.multi_objective.logei as logei
        from coalora.search.encoding import encode
        from coalora.search.gp import bits_of
        from coalora.search.propose import candidate_set, propose
        rng = np.random.default_rng(0)
        pool = [[int(i) for i in rng.integers(432, size=4)] for _ in range(6)]
        x = encode(pool)
        w = torch.ones(4, dtype=torch.float64) / 4
        f1 = 1 + 0.2 * torch.exp(-(bits_of(x, w) - 2))
        cands = candidate_set(pool, {tuple(p) for p in pool}, 16, rng)
        chosen = propose("ehvi", cands, 2, x_seen=x, f1_norm=f1 / f1.max(), weights=w, reference=[1.1, 1.1],
                         mc_samples=8, seed=0, rng=rng)
        assert len(set(chosen)) == 2, chosen
        assert logei._C is None, "the fused kernel was loaded"
        print("ok")
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext))
    done = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert sorted(p.relative_to(ext) for p in ext.rglob("*")) == before  # nothing built, the locks untouched


# ---- MLflow's store --------------------------------------------------------------------------------------

def _set_revision(db: Path, revision: str, drop: str | None = None) -> None:
    import sqlite3

    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (revision,))
        if drop:
            connection.execute(f"DROP TABLE {drop}")


def test_a_store_left_half_migrated_is_rebuilt_and_one_with_runs_is_never_touched(tmp_path, caplog):
    """MLflow migrates a new store one step at a time; a kill in between left a store every later run failed
    on (``table scorers already exists``). Made under a temporary name and renamed whole, a store is never
    seen half-made; one left so by an older version is set aside and rebuilt, unless it holds runs."""
    import sqlalchemy.exc
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    from coalora.track.store import ensure_store, head_revision, schema_revision

    state, artifacts = tmp_path / ".coalora", tmp_path / "mlartifacts"
    db = state / "mlflow.db"
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale_init = state / f".mlflow.db.init-{dead.stdout.strip()}"  # a store being made by a killed run
    state.mkdir()
    stale_init.write_bytes(b"SQLite format 3\0")
    ensure_store(db, artifacts)
    assert schema_revision(db) == head_revision() and not stale_init.exists()
    assert sorted(p.name for p in state.iterdir()) == ["mlflow.db"]
    with_runs = tmp_path / "with_runs.db"
    shutil.copy(db, with_runs)

    # killed inside the migration that adds the scorer tables, after it created them (as the issue saw it)
    _set_revision(db, "1a0cddfcaa16", drop="online_scoring_configs")
    with pytest.raises(sqlalchemy.exc.OperationalError, match="scorers already exists"):
        SqlAlchemyStore(f"sqlite:///{db}", artifacts.as_uri())
    SqlAlchemyStore._engine_map.clear()
    with caplog.at_level(logging.WARNING, logger="coalora.track"):
        ensure_store(db, artifacts)
    assert schema_revision(db) == head_revision()
    aside = [p for p in state.iterdir() if p.name.startswith("mlflow.db.broken-")]
    assert len(aside) == 1 and str(aside[0]) in caplog.text and "no runs" in caplog.text
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert client.create_experiment("e", artifact_location=artifacts.as_uri())

    # a store at another revision that holds runs: never moved or rebuilt, the user is told what to do
    other = MlflowClient(tracking_uri=f"sqlite:///{with_runs}")
    other.create_run(other.create_experiment("x", artifact_location=artifacts.as_uri()))
    SqlAlchemyStore._engine_map.clear()
    _set_revision(with_runs, "1a0cddfcaa16")
    before = with_runs.read_bytes()
    with pytest.raises(UserError, match=r"holds 1 runs.*mlflow db upgrade"):
        ensure_store(with_runs, artifacts)
    assert with_runs.read_bytes() == before


def test_runs_left_running_by_a_killed_run_are_closed(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from coalora.track import close_abandoned, ensure_store

    db = tmp_path / "mlflow.db"
    ensure_store(db, tmp_path / "mlartifacts")
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.create_experiment("coalora", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp, tags={"coalora.root": str(tmp_path)}).info.run_id
    stage = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    method = client.create_run(exp, tags={"mlflow.parentRunId": stage}).info.run_id
    other = client.create_run(exp, tags={"coalora.root": "/elsewhere"}).info.run_id  # another project's
    with caplog.at_level(logging.WARNING, logger="coalora.track"):
        assert close_abandoned(client, exp, tmp_path) == 3
    assert {client.get_run(r).info.status for r in (parent, stage, method)} == {"KILLED"}
    assert client.get_run(other).info.status == "RUNNING"
    assert "marked 3 MLflow runs" in caplog.text
    assert close_abandoned(client, exp, tmp_path) == 0
