"""Checkpoints: exact resume (weights, AdamW state, RNG), digest verification, atomic writes, no pickle."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from coalora.train import checkpoint as ckpt
from coalora.train.loop import LoopSettings, Trainer
from coalora.train.runner import build_model, init_run
from test_train import METHODS, Killed, kill_at, one_thread, tiny_setup  # noqa: F401  (one_thread: autouse fixture)

SOURCE = Path(__file__).resolve().parent.parent / "coalora" / "train"


def new_trainer(run_dir: Path | None, method: str = "coalora", every: int = 4) -> tuple[Trainer, list]:
    """A fresh CoAModel run, as the runner starts one (same seed → same start)."""
    setup = tiny_setup()
    m = METHODS[method]
    model = build_model(m, setup)
    init_run(model, m, setup.seed)
    settings = LoopSettings(lr=0.01, grad_clip=1.0, k=m.k(setup.params), checkpoint_every=every, seed=setup.seed)
    return Trainer(model, setup.batches, settings, run_dir, desc=method, progress=False), setup.pool


def optimizer_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    return ckpt.optimizer_state(trainer.optimizer)[0]


def assert_same_run(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.adapter_state_dict(), b.model.adapter_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("confignet.") for k in sa)  # θ is part of what must match
    oa, ob = optimizer_tensors(a), optimizer_tensors(b)
    assert oa.keys() == ob.keys() and len(oa) == 3 * len(a.params)  # exp_avg, exp_avg_sq, step per parameter
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert a.optimizer.state_dict()["param_groups"] == b.optimizer.state_dict()["param_groups"]
    assert torch.equal(a.batch_gen.get_state(), b.batch_gen.get_state())
    assert torch.equal(a.config_gen.get_state(), b.config_gen.get_state())
    assert a.losses == b.losses and a.draws == b.draws and a.step == b.step


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight, pool = new_trainer(None)
    straight.run(8, pool)
    first, _ = new_trainer(tmp_path)
    with pytest.raises(Killed):
        first.run(8, pool, on_step=kill_at(6))
    assert [p.name for p in ckpt.step_checkpoints(tmp_path)] == ["step-00000004"]
    resumed, _ = new_trainer(tmp_path)  # a new process: fresh model, optimizer, generators
    assert resumed.resume() and resumed.step == 4
    resumed.run(8, pool)
    assert_same_run(straight, resumed)


def test_training_in_rounds_equals_one_call(tmp_path):
    """The search trains in rounds (run(end_step) with a pool per round); the same pool gives the same run."""
    once, pool = new_trainer(None)
    once.run(6, pool)
    rounds, _ = new_trainer(None)
    for end in (2, 3, 6):
        rounds.run(end, pool)
    assert_same_run(once, rounds)


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    trainer, pool = new_trainer(tmp_path, every=2)
    trainer.run(6, pool)
    folders = ckpt.step_checkpoints(tmp_path)
    assert [p.name for p in folders] == ["step-00000004", "step-00000006"]  # the last two are kept
    names = sorted(p.name for p in folders[-1].iterdir())
    assert names == ["MANIFEST.json", "adapter.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "state.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    for path in SOURCE.glob("*.py"):  # never pickle: no torch.save / torch.load / pickle in the package
        text = path.read_text()
        assert "torch.save(" not in text and "torch.load(" not in text and "import pickle" not in text, path


@pytest.mark.parametrize("victim", ["adapter.safetensors", "state.json", "MANIFEST.json"])
def test_a_corrupt_checkpoint_is_detected_by_its_digest(tmp_path, victim):
    trainer, pool = new_trainer(tmp_path, every=2)
    trainer.run(4, pool)
    folder = tmp_path / "step-00000004"
    data = bytearray((folder / victim).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (folder / victim).write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt checkpoint: .*step-00000004") as info:
        ckpt.read_checkpoint(folder)
    # a damaged file is named; a damaged digest names the file whose recorded hash no longer matches
    named = victim if victim != "MANIFEST.json" else "files differ from the manifest"
    assert named in str(info.value)


def test_resume_falls_back_past_a_corrupt_checkpoint_and_still_ends_identical(tmp_path, caplog):
    straight, pool = new_trainer(None)
    straight.run(8, pool)
    first, _ = new_trainer(tmp_path, every=2)
    first.run(6, pool)
    adapter = tmp_path / "step-00000006" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])  # truncated, as by a full disk
    resumed, _ = new_trainer(tmp_path, every=2)
    with caplog.at_level("WARNING", logger="coalora.train.checkpoint"):
        assert resumed.resume() and resumed.step == 4
    assert "step-00000006" in caplog.text and "adapter.safetensors" in caplog.text
    assert (tmp_path / "corrupt-step-00000006").is_dir()  # set aside, never read again
    resumed.run(8, pool)
    assert_same_run(straight, resumed)


def test_a_write_that_dies_leaves_no_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    trainer, pool = new_trainer(tmp_path, every=2)
    trainer.run(2, pool)
    calls = []

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.run(4, pool)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]  # no half checkpoint, no temp folder
    assert ckpt.latest_checkpoint(tmp_path).state["step"] == 2


def test_optimizer_and_rng_state_round_trip():
    trainer, pool = new_trainer(None)
    trainer.run(3, pool)
    tensors, meta = ckpt.optimizer_state(trainer.optimizer)
    fresh, _ = new_trainer(None)
    ckpt.load_optimizer_state(fresh.optimizer, tensors, meta)
    assert fresh.optimizer.state_dict()["param_groups"] == trainer.optimizer.state_dict()["param_groups"]
    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(fresh).values(), tensors.values()))
    random.seed(3)
    np.random.seed(3)
    saved = ckpt.host_rng_state()
    expected = (random.random(), float(np.random.rand()))
    ckpt.load_host_rng_state(saved)
    assert (random.random(), float(np.random.rand())) == expected
