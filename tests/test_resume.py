"""Kill `coalora run` with SIGKILL inside training, run it again: finished stages are reused, training resumes
from its last checkpoint, and the results equal those of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline import make_project

pytestmark = pytest.mark.slow
COALORA = str(Path(sys.executable).parent / "coalora")
UPSTREAM = ("data", "base_model", "calibrate", "allocate")


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("COALORA_PROFILE", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH"):
        env.pop(key, None)  # each project keeps its own Prefect state (coalora.env puts it in .coalora/)
    return env


def _run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([COALORA, "run"], cwd=root, env=_env(root), capture_output=True, text=True, timeout=1200)


def _checkpoints(root: Path) -> list[Path]:
    return sorted((root / "artifacts" / ".work" / "train").glob("*/*/step-*"))


def _kill_inside_training(root: Path, timeout: float = 900) -> None:
    """Start `coalora run`, SIGKILL its whole process group once a training checkpoint exists."""
    proc = subprocess.Popen([COALORA, "run"], cwd=root, env=_env(root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not _checkpoints(root):
            assert proc.poll() is None, f"`coalora run` ended (rc {proc.returncode}) before any training checkpoint"
            assert time.monotonic() < deadline, "no training checkpoint appeared in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (root / "artifacts" / "train" / "stage.json").exists(), "training finished before the kill"


def _results(root: Path) -> dict[str, bytes]:
    """What must not depend on the interruption: every trained adapter and final pool, byte for byte, and
    the losses each method recorded (train.json minus its wall-clock fields)."""
    train = root / "artifacts" / "train"
    found = {str(p.relative_to(train)): p.read_bytes() for p in sorted(train.rglob("*.safetensors"))}
    found |= {str(p.relative_to(train)): p.read_bytes() for p in sorted(train.glob("*/pool/*.json"))}
    for path in sorted(train.glob("*/train.json")):
        record = json.loads(path.read_text())
        kept = {k: record[k] for k in ("configs", "eval_loss_after", "final_loss", "steps", "rounds") if k in record}
        found[str(path.relative_to(train))] = json.dumps(_timeless(kept), sort_keys=True).encode()
    return found


def _timeless(obj):
    """``obj`` without its wall-clock fields (``seconds``), which no two runs share."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def test_sigkill_inside_training_resumes_to_the_uninterrupted_result(repo_root, tmp_path):
    killed = make_project(repo_root, tmp_path / "killed")
    clean = make_project(repo_root, tmp_path / "clean")

    _kill_inside_training(killed)
    upstream = {name: (killed / "artifacts" / name / "stage.json").stat().st_mtime_ns for name in UPSTREAM}
    resumed = _run(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # finished stages were reused, not rebuilt
    assert {n: (killed / "artifacts" / n / "stage.json").stat().st_mtime_ns for n in UPSTREAM} == upstream
    assert "resum" in (resumed.stdout + resumed.stderr).lower(), "the log should say training resumed"

    # everything up to date now: `coalora run` says so without starting a flow, and logs nothing new
    again = _run(killed)
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout[-2000:]
    assert resumed.stdout.split("mlflow:")[1].split()[1] == again.stdout.split("mlflow:")[1].split()[1]

    uninterrupted = _run(clean)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert _results(killed) == _results(clean)
