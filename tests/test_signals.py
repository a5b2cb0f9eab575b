"""Ctrl-C and SIGTERM stop `coalora run` within 10 s at the next step of the stage it is in, keep what it
finished (stages, the last checkpoint), print one line, exit 130 / 143, leave no process behind; the next
`coalora run` resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coalora.interrupt import message
from test_pipeline import make_project

pytestmark = pytest.mark.slow
COALORA = str(Path(sys.executable).parent / "coalora")
STAGES = "data,base_model,calibrate,allocate,train"
MARK = "COALORA_SIGNAL_TEST"
LIMIT = 10.0  # seconds from the signal to the exit


def _env(tag: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **{MARK: tag})
    for key in ("COALORA_PROFILE", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_API_URL"):
        env.pop(key, None)
    return env


def _marked(tag: str) -> list[int]:
    needle = f"{MARK}={tag}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes():
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stop_when(root: Path, ready, signum: int, group: bool, tag: str, timeout: float = 1500):
    """Start `coalora run`, send ``signum`` once ``ready()`` (to the process group, as a terminal's Ctrl-C
    does, or to the process alone, as `kill` does); returns (rc, seconds to exit, stderr after the signal)."""
    err_path = root / f"{tag}.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([COALORA, "run", "--stages", STAGES], cwd=root, env=_env(tag),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"`coalora run` ended (rc {proc.returncode}) before the signal"
            assert time.monotonic() < deadline, "the run never reached the point to stop it at"
            time.sleep(0.05)
        before = err_path.stat().st_size
        sent = time.monotonic()
        (os.killpg if group else os.kill)(proc.pid, signum)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with open(err_path, "rb") as handle:
        handle.seek(before)
        after = handle.read().decode(errors="replace")
    return rc, took, after


def _lines(text: str) -> list[str]:
    """The lines printed, without progress-bar redraws (tqdm's carriage-return updates)."""
    parts = [p.strip() for line in text.split("\n") for p in line.split("\r")]
    return [p for p in parts if p and "it/s]" not in p and "s/it]" not in p and "%|" not in p]


def _left_behind(tag: str) -> list[int]:
    deadline = time.monotonic() + 5
    while (pids := _marked(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def test_sigint_and_sigterm_stop_within_10_s_keep_finished_work_and_the_next_run_resumes(repo_root, tmp_path):
    root = make_project(repo_root, tmp_path / "project")
    art = root / "artifacts"

    # Ctrl-C (SIGINT to the whole foreground group) while the base model is being built
    rc, took, after = _stop_when(root, lambda: any(art.glob(".tmp-base_model-*")), signal.SIGINT, True, "int")
    assert rc == 130 and took <= LIMIT, (rc, took, after[-2000:])
    assert _lines(after) == [message(signal.SIGINT)], after[-2000:]
    assert not _left_behind("int"), "processes outlived the stopped run"
    data = (art / "data" / "stage.json").stat().st_mtime_ns  # finished before the signal: kept
    assert not (art / "base_model").exists()

    # SIGTERM (to the process alone) once training wrote a checkpoint
    checkpoints = lambda: sorted((art / ".work" / "train").glob("*/*/step-*"))  # noqa: E731
    rc, took, after = _stop_when(root, lambda: bool(checkpoints()), signal.SIGTERM, False, "term")
    assert rc == 143 and took <= LIMIT, (rc, took, after[-2000:])
    assert _lines(after) == [message(signal.SIGTERM)], after[-2000:]
    assert not _left_behind("term"), "processes outlived the stopped run"
    assert (art / "data" / "stage.json").stat().st_mtime_ns == data
    assert (art / "base_model" / "stage.json").is_file() and not (art / "train").exists()
    from coalora.train.checkpoint import latest_checkpoint

    kept = [latest_checkpoint(folder) for folder in sorted({c.parent for c in checkpoints()})]
    assert kept and all(found is not None for found in kept)  # the last checkpoint is intact

    # the next run resumes: finished stages are reused, training continues from its checkpoint
    done = subprocess.run([COALORA, "run", "--stages", STAGES], cwd=root, env=_env("resume"),
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step" in done.stderr
    states = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()
              if line.split() and line.split()[0] in STAGES.split(",")}
    assert states == {"data": "Cached", "base_model": "Cached", "calibrate": "Cached", "allocate": "Cached",
                      "train": "Completed"}, done.stdout
    assert (art / "data" / "stage.json").stat().st_mtime_ns == data
    assert not _left_behind("resume")
