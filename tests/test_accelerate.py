"""The train stage data-parallel under `accelerate launch`, in accelerate's local CPU mode (2 processes, gloo):
it completes, writes the same files as a one-process run, and its losses match that run's closely.

Why close and not equal: the two ranks each run half of every batch and DDP averages their gradients. For
text data (every token counts) the mean of the two half-batch losses IS the full-batch loss, and the averaged
gradient IS the full-batch gradient, mathematically; in floating point the sums are taken in another order
(two (B/2, T) forwards, a gloo all-reduce), so each step differs by float32 rounding, which training carries
forward. Measured on this smoke run: training losses differ by ≤ 2.4e-7 (loss.csv rounds to 1e-6), adapter
tensors by ≤ 6e-8, held-out losses not at all. The tolerance (1e-5) is well above that and far below what
a real fault does (ranks training on their own halves without averaging, or a lost step: 1e-3 and more).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coalora import parallel
from coalora.errors import UserError

BIN = Path(sys.executable).parent
UPSTREAM = ("data", "base_model", "calibrate", "allocate")
METHODS = ["coalora", "qlora"]  # a pool method with search rounds (θ, k = 2) and a per-config method (two runs)
ATOL = 1e-5  # training losses (per step), held-out losses and adapter tensors (module docstring)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",  # the CPU test mode, also on a GPU box
               HF_HOME=str(tmp / "hf"))  # no user accelerate config (default_config.yaml) applies
    for key in ("COALORA_PROFILE", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "WORLD_SIZE", "RANK",
                "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(args: list[str], root: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _losses(path: Path) -> list[tuple[str, str, float]]:
    with open(path, newline="") as f:
        return [(row["step"], row["run"], float(row["loss"])) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_train_stage_under_accelerate_launch_matches_one_process(repo_root, tmp_path):
    from test_pipeline import make_project

    root = make_project(repo_root, tmp_path / "project", train__methods=METHODS)
    env = _env(tmp_path)
    coalora = [sys.executable, "-m", "coalora.cli"]
    for stage in UPSTREAM:
        _run(coalora + ["stage", stage], root, env)

    started = time.perf_counter()
    _run(coalora + ["stage", "train"], root, env)
    one_seconds = time.perf_counter() - started
    single = tmp_path / "train-one-process"
    shutil.move(root / "artifacts" / "train", single)

    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",  # 0: a free port
              "-m", "coalora.cli", "stage", "train"]
    started = time.perf_counter()
    proc = _run(launch, root, env)
    two_seconds = time.perf_counter() - started
    print(f"train stage: one process {one_seconds:.1f} s, accelerate launch (2 CPU processes) {two_seconds:.1f} s")

    # Both ranks ran, on CPU with gloo; the summary was printed once (by the main process).
    for rank in (0, 1):
        assert f"data-parallel: rank {rank} of 2 (MULTI_CPU, gloo backend" in proc.stderr, proc.stderr[-4000:]
    assert proc.stdout.count('"methods"') == 1, proc.stdout
    out = root / "artifacts" / "train"
    assert not (root / "artifacts" / ".work" / "train").exists()  # removed after success, as in one process

    # The same files, MANIFEST included, and a stage record the next `coalora run` accepts as up to date.
    assert _files(out) == _files(single)
    from coalora.artifacts import verify_manifest
    from coalora.params import load_params
    from coalora.stages import fresh_summary, get_stage

    assert verify_manifest(out) is None
    params = load_params(root)
    assert fresh_summary(get_stage("train"), params, root) is not None

    # The same steps, configs and draws; losses equal up to rounding (module docstring).
    for method in METHODS:
        one, two = _losses(single / method / "loss.csv"), _losses(out / method / "loss.csv")
        assert [r[:2] for r in one] == [r[:2] for r in two]
        worst = max(abs(a[2] - b[2]) for a, b in zip(one, two))
        print(f"{method}: {len(one)} steps, largest loss difference {worst:.2e}")
        assert worst <= ATOL, (method, worst)
        a, b = (json.loads((d / method / "train.json").read_text()) for d in (single, out))
        for key in ("configs", "steps", "steps_per_run", "config_draws"):
            assert a[key] == b[key], key
        for cid, loss in a["eval_loss_after"].items():
            assert b["eval_loss_after"][cid] == pytest.approx(loss, abs=ATOL), cid
        assert a["eval_loss_after_mean"] < a["eval_loss_before_mean"]  # it trained
    # Search rounds saw the same pools (the main process's round result is every rank's).
    a, b = (json.loads((d / "coalora" / "train.json").read_text()) for d in (single, out))
    assert [[p["id"] for p in r["pool"]] for r in a["rounds"]] == [[p["id"] for p in r["pool"]] for r in b["rounds"]]
    # The adapters agree tensor by tensor.
    from safetensors.torch import load_file

    for path in sorted(single.rglob("adapter.safetensors")):
        x, y = load_file(path), load_file(out / path.relative_to(single))
        assert x.keys() == y.keys()
        worst = max(float((x[k] - y[k]).abs().max()) for k in x)
        print(f"{path.relative_to(single)}: largest tensor difference {worst:.1e}")
        assert worst <= ATOL, (path, worst)


def test_shard_gives_each_rank_its_own_rows(monkeypatch):
    import torch

    class Rank:  # what shard reads of an Accelerator
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, index):
            self.process_index = index

    batch = {"input_ids": torch.arange(12).view(4, 3), "labels": torch.arange(12).view(4, 3) + 100}
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for index in (0, 1):
        monkeypatch.setattr(parallel, "_accelerator", Rank(index))
        parts.append(parallel.shard(batch))
    assert [p["input_ids"][:, 0].tolist() for p in parts] == [[0, 3], [6, 9]]  # rows 0-1 and 2-3
    for key in batch:
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    with pytest.raises(UserError, match="train.batch_size"):
        parallel.shard({k: v[:3] for k, v in batch.items()})


def test_only_data_parallel_stages_run_under_a_launch(repo_root, tmp_path, monkeypatch):
    from coalora.params import load_params
    from coalora.stages import get_stage, run_stage

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parallel.launched() and parallel.world_size() == 2
    with pytest.raises(UserError, match="stage data runs in one process"):
        run_stage(get_stage("data"), load_params(repo_root, "smoke"), tmp_path)
    assert not (tmp_path / "artifacts").exists()  # refused before anything was written
    assert get_stage("train").extra.get("data_parallel") is True


def test_batch_size_must_split_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    parallel.check_batch_size(6)
    with pytest.raises(UserError, match="train.batch_size"):
        parallel.check_batch_size(4)
    monkeypatch.delenv("WORLD_SIZE")
    assert not parallel.launched() and parallel.accelerator() is None and parallel.is_main()
