"""DVC's local remote: `dvc push` stores a stage's outputs, and on a clone that lost its cache and outputs
`dvc pull` restores them byte for byte. The remote is the one the project configures (.dvc/config:
`local` → .coalora/dvc-remote), on a fresh git project with the smoke params."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline import make_project

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_restores_outputs_byte_identical(repo_root, tmp_path):
    root = make_project(repo_root, tmp_path / "project")
    dvc(root, "repro", "data")
    before = digests(root / "artifacts" / "data")
    assert "stage.json" in before

    dvc(root, "push", "data")
    remote = root / ".coalora" / "dvc-remote"
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))

    # A clone without cache or outputs (what `git clone` gives): pull brings everything back.
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "artifacts" / "data")
    dvc(root, "pull", "data")
    assert digests(root / "artifacts" / "data") == before
    assert "up to date" in dvc(root, "status", "data")
