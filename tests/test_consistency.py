"""Artifacts, caches and DVC that stay consistent, end to end on the smoke profile (one per-config method, to
keep it small: the stage mechanism is what is tested).

* a damaged stage output (a flipped byte, an edited or emptied file, a deleted manifest or folder) is rebuilt
  by ``coalora run``, and nothing else is: the rebuild has the same content, so downstream stays cached;
* after ``coalora run`` DVC is in step: ``dvc status`` is clean, and on a fresh clone ``dvc pull`` brings every
  output back and ``coalora run`` finds everything up to date;
* ``dvc repro`` works without an activated venv and keeps an output whose command cannot run;
* editing a source file re-runs exactly the stages that import it, under ``coalora run`` and ``dvc repro``;
* a run whose output is not a terminal logs progress as a few lines, not a line per tick.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coalora.artifacts import MANIFEST, folder_digest, verify_manifest
from coalora.stages import PIPELINE
from test_pipeline import make_project

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STAGE_LINE = re.compile(r"^(\w+)\s+(Completed|Cached|Failed)\s", re.M)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600", **extra)
    for key in ("COALORA_PROFILE", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "VIRTUAL_ENV"):
        env.pop(key, None)  # the project keeps its own Prefect state (.coalora/)
    return env


def coalora_run(root: Path, **env: str) -> subprocess.CompletedProcess:
    """``coalora run --no-track`` in ``root``, output captured (so not a terminal)."""
    done = subprocess.run([str(BIN / "coalora"), "run", "--no-track"], cwd=root, env=_env(**env),
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def dvc(root: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=_env(DVC_NO_ANALYTICS="1", **env),
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0 or not check, f"dvc {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def states(output: str) -> dict[str, str]:
    return dict(STAGE_LINE.findall(output))


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each stage's stage.json: changes exactly when the stage's output is rebuilt."""
    stamps = {}
    for name in PIPELINE:
        record = root / "artifacts" / name / "stage.json"
        stamps[name] = (record.stat().st_ino, record.stat().st_mtime_ns) if record.exists() else None
    return stamps


def digests(root: Path) -> dict[str, str]:
    return {name: folder_digest(root / "artifacts" / name) for name in PIPELINE}


@pytest.fixture(scope="module")
def built(repo_root, tmp_path_factory):
    """A smoke project built once by `coalora run` (its output kept for the log test)."""
    root = make_project(repo_root, tmp_path_factory.mktemp("consistency") / "project", train__methods=["qlora"])
    done = coalora_run(root)
    assert set(states(done.stdout).values()) == {"Completed"}, done.stdout
    return root, done


def test_non_interactive_progress_is_a_few_lines(built):
    _, done = built
    log = done.stdout + done.stderr
    assert "\r" not in log  # no bar redrawn in place: every update would be a line in a CI log
    assert not re.search(r"\d+it/s\]|\|[█▏▎▍▌▋▊▉ ]+\|", log), "a tqdm bar in a non-interactive log"
    progress = [line for line in log.splitlines() if "coalora.progress" in line]
    assert progress, "long loops report progress"
    assert len(log.splitlines()) < 120, log  # stage lines, a line per loop and per evaluated row, the summary


def test_dvc_is_in_step_after_coalora_run(built):
    root, _ = built
    assert "Data and pipelines are up to date" in dvc(root, "status").stdout
    lock = (root / "dvc.lock").read_text()
    assert all(f"\n  {name}:\n" in lock for name in PIPELINE)
    again = coalora_run(root)
    assert "every stage is up to date" in again.stdout


DAMAGE = [
    ("data", "flip a byte in world.json", lambda a: _flip(a / "data/world.json")),
    ("data", "delete the whole folder", lambda a: shutil.rmtree(a / "data")),
    ("base_model", "flip a byte in the weights", lambda a: _flip(next((a / "base_model").rglob("*.safetensors")))),
    ("calibrate", "flip a byte in costs.safetensors", lambda a: _flip(a / "calibrate/costs.safetensors")),
    ("allocate", "edit a pool config", lambda a: _edit_json(next((a / "allocate/pool").glob("*.json")))),
    ("allocate", "delete MANIFEST.json", lambda a: (a / "allocate" / MANIFEST).unlink()),
    ("train", "flip a byte in an adapter", lambda a: _flip(next((a / "train").rglob("adapter.safetensors")))),
    ("evaluate", "empty table.csv", lambda a: (a / "evaluate/table.csv").write_text("")),
    ("report", "delete report.md", lambda a: (a / "report/report.md").unlink()),
]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_json(path: Path) -> None:
    path.write_text(path.read_text().replace('"source"', '"source "', 1))


def test_damaged_output_is_rebuilt_and_nothing_else(built):
    root, _ = built
    expected = digests(root)
    for victim, how, damage in DAMAGE:
        before = stamps(root)
        damage(root / "artifacts")
        done = coalora_run(root)
        rebuilt = {name for name, stamp in stamps(root).items() if stamp != before[name]}
        assert rebuilt == {victim}, f"{victim}, {how}: rebuilt {sorted(rebuilt)}\n{done.stdout}{done.stderr}"
        assert states(done.stdout)[victim] == "Completed", f"{victim}, {how}"
        assert all(states(done.stdout)[name] == "Cached" for name in PIPELINE if name != victim), done.stdout
        assert verify_manifest(root / "artifacts" / victim) is None
        # same content (what downstream keys see); report.md spells the measured times out, and nothing reads it
        now = digests(root)
        assert {n: now[n] for n in PIPELINE if n != "report"} == {n: expected[n] for n in PIPELINE if n != "report"}
    assert "Data and pipelines are up to date" in dvc(root, "status").stdout


def test_fresh_clone_pulls_everything_and_is_up_to_date(built, tmp_path):
    root, _ = built
    dvc(root, "push")
    clone = tmp_path / "clone"
    shutil.copytree(root, clone, ignore=shutil.ignore_patterns("artifacts", "cache", "tmp", "prefect", "mlflow*",
                                                               "dvc-recorded.json"))
    assert not (clone / "artifacts").exists() and (clone / ".coalora" / "dvc-remote").is_dir()
    dvc(clone, "pull")
    assert digests(clone) == digests(root)
    done = coalora_run(clone)
    assert "every stage is up to date: nothing to run" in done.stdout, done.stdout
    assert "Data and pipelines are up to date" in dvc(clone, "status").stdout


def _append(path: Path, text: str) -> str:
    original = path.read_text()
    path.write_text(original + text)
    return original


def test_source_edit_reruns_exactly_its_stages_under_dvc_repro_without_a_venv(built):
    root, _ = built
    (root / ".venv").symlink_to(BIN.parent)  # the project's venv, as `make venv` makes it; not activated
    bare = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    try:
        summary = root / "coalora/evaluate/statistics.py"  # imported by the report stage only
        original = _append(summary, "\n# edited\n")
        assert re.findall(r"^(\w+):\s*$", dvc(root, "status").stdout, re.M) == ["report"]
        before = stamps(root)
        done = dvc(root, "repro", **bare)
        assert re.findall(r"Running stage '(\w+)'", done.stdout) == ["report"], done.stdout
        assert {name for name, stamp in stamps(root).items() if stamp != before[name]} == {"report"}
        # a command that cannot start (no such Python) fails; DVC keeps the output it could not rebuild
        _append(summary, "# edited again\n")
        report = digests(root)["report"]
        failed = dvc(root, "repro", check=False, COALORA_PYTHON="/nonexistent/python", **bare)
        assert failed.returncode != 0
        assert verify_manifest(root / "artifacts/report") is None and digests(root)["report"] == report
        summary.write_text(original)
        dvc(root, "repro", **bare)
    finally:
        (root / ".venv").unlink()
    assert "Data and pipelines are up to date" in dvc(root, "status").stdout


def test_source_edit_reruns_exactly_its_stages_under_coalora_run(built):
    root, _ = built
    source = root / "coalora/allocate.py"  # imported by the allocate stage only
    original = _append(source, "\n# edited\n")
    try:
        before, expected = stamps(root), digests(root)
        # PYTHONPATH: this project's coalora/, the edited copy, instead of the installed one
        done = coalora_run(root, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        assert {name for name, stamp in stamps(root).items() if stamp != before[name]} == {"allocate"}
        assert states(done.stdout)["allocate"] == "Completed" and states(done.stdout)["train"] == "Cached"
        assert digests(root) == expected  # a comment: same output, so train and the rest stay cached
        assert "Data and pipelines are up to date" in dvc(root, "status").stdout
    finally:
        source.write_text(original)
