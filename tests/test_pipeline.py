"""End to end on the smoke profile: the Prefect flow caches every stage, a corrupt artifact is rebuilt,
and `dvc repro` runs the same stages and is a no-op the second time."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coalora.params import dump_params, load_params

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def make_project(repo_root: Path, dest: Path, **overrides) -> Path:
    """A fresh project folder: the smoke params resolved into params.yaml, dvc.yaml, the DVC config, the
    code paths dvc.yaml lists as dependencies and the stage command it runs (bin/); a git repository as on a
    fresh clone."""
    dest.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load(dump_params(load_params(repo_root, "smoke")))
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(repo_root / name, dest / name)
    shutil.copytree(repo_root / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(repo_root / "coalora", dest / "coalora", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo_root / "bin", dest / "bin")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def states(result: dict) -> dict[str, str]:
    return {name: outcome["state"] for name, outcome in result["stages"].items()}


def test_flow_caches_every_stage_and_rebuilds_corrupt_artifacts(prefect_harness, repo_root, tmp_path):
    from coalora.stages import PIPELINE
    from flows.pipeline import run_pipeline

    root = make_project(repo_root, tmp_path / "project")
    first = run_pipeline(str(root))
    assert set(states(first).values()) == {"Completed"}, states(first)
    assert list(first["stages"]) == list(PIPELINE)

    second = run_pipeline(str(root))
    assert set(states(second).values()) == {"Cached"}, states(second)
    for name in PIPELINE:
        assert second["stages"][name]["summary"] == first["stages"][name]["summary"]

    # A corrupt artifact is never used: its stage runs again, and the stages reading it follow.
    from coalora.artifacts import verify_manifest

    victim = root / "artifacts/data/text/validation.jsonl"
    original = victim.read_text()
    victim.write_text(original[: len(original) // 2])
    third = run_pipeline(str(root), stages=["data"])
    assert states(third) == {"data": "Completed"}
    assert victim.read_text() == original  # rebuilt, deterministically
    assert verify_manifest(root / "artifacts/data") is None


def test_changed_param_reruns_exactly_the_stages_that_read_it(prefect_harness, repo_root, tmp_path):
    from flows.pipeline import run_pipeline

    root = make_project(repo_root, tmp_path / "project")
    run_pipeline(str(root), stages=["data", "base_model"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eval"]["perplexity"]["max_windows"] += 1  # read by base_model, not by data
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_pipeline(str(root), stages=["data", "base_model"])
    assert states(result) == {"data": "Cached", "base_model": "Completed"}


def test_dvc_repro_runs_the_stages_then_is_a_noop(repo_root, tmp_path):
    root = make_project(repo_root, tmp_path / "project")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    first = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    second = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout

    # Every stage's outputs (trained adapters and pools, tables, the report) go to the local remote and
    # come back byte for byte on a checkout that lost its cache and outputs.
    def dvc(*args: str) -> str:
        done = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def digests() -> dict[str, str]:
        art = root / "artifacts"
        return {p.relative_to(art).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(art.rglob("*")) if p.is_file() and ".work" not in p.parts}

    before = digests()
    assert any(name.startswith("train/") and name.endswith(".safetensors") for name in before)
    dvc("push")
    shutil.rmtree(root / ".dvc" / "cache")
    for name in lock["stages"]:
        shutil.rmtree(root / "artifacts" / name)
    dvc("pull")
    assert digests() == before
    assert "up to date" in dvc("status")
