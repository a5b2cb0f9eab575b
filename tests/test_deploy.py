"""Packed deployment: PackedLinear, the "coalora" transformers quantization method, packed model folders written
by ``coalora adapt`` (built-in model and a SmolLM2-shaped model), and every bad folder refused before loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coalora.errors import ArtifactError
from coalora.quant import all_specs, fake_quantize, quantize, storage_bits
from coalora.quant.dequant import dequantize_streams
from coalora.quant.linear import PackedLinear
from coalora.space import Config
from test_adapt import adapt, exported_logits, make_project
from test_coa import one_thread  # noqa: F401 (fixture)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# PackedLinear
# ---------------------------------------------------------------------------------------------------------

def test_packed_linear_holds_the_packed_bytes_and_computes_fake_quantize_for_every_spec():
    w, b, x = randn(19, 37, seed=1), randn(19, seed=2), randn(3, 37, seed=3)  # 703 weights: partial blocks
    for spec in all_specs():
        layer = PackedLinear.from_quantized(quantize(w, spec), b)
        want = fake_quantize(w, spec)
        assert torch.equal(layer.dequantize(), want), spec
        assert torch.equal(layer(x), F.linear(x, want, b)), spec
        held = sum(t.numel() * t.element_size() for name, t in layer.state_dict().items() if name != "bias")
        exact = storage_bits(spec, (19, 37)) / 8
        assert exact <= held < exact + 2, spec  # each of the two bit streams rounds up to a whole byte
        assert layer.weight.dtype == torch.uint8 and not any(t.shape == (19, 37) for t in layer.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_in_steps_is_bitwise_the_reference(monkeypatch, dtype):
    monkeypatch.setattr("coalora.quant.dequant.SLAB", 40)  # many steps, ending mid-matrix and mid-block
    w = randn(23, 29, seed=4)
    for spec in all_specs()[::7]:
        qt = quantize(w, spec)
        got = dequantize_streams(qt.weight_codes, qt.scale_codes, qt.scale2, qt.offset, spec, qt.shape, dtype)
        assert got.dtype == dtype and torch.equal(got, fake_quantize(w, spec).to(dtype)), spec


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_word_lookup_moves_the_table_values_bitwise_at_any_alignment(flush_denormal):
    """The CPU gathers a chunk's 1, 2 or 4 floats as one float32 / int64 / complex128 word; the result must be
    the table rows bit for bit, also where a word is a subnormal double (flush-to-zero on) and where the
    destination is not aligned to the word (then rows are gathered)."""
    from coalora.quant.dequant import lookup, lookup_size
    from coalora.quant.nf import nf_levels

    stream = torch.randint(0, 256, (301,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    torch.set_flush_denormal(flush_denormal)
    try:
        for bits in (2, 3, 4, 8):
            codes = [(int(b) >> i) & 1 for b in stream for i in range(8)]  # the stream's bits, little-endian
            codes = [sum(codes[j * bits + i] << i for i in range(bits)) for j in range(len(codes) // bits)]
            for kind, values in (("levels", nf_levels(bits)),
                                 ("scales", torch.arange(2**bits, dtype=torch.float32) / float(2**bits - 1))):
                want = values[torch.tensor(codes)]
                for shift in (0, 1, 2, 3):  # float offsets 0..3: only 0 is aligned to every word
                    buf = torch.full((shift + lookup_size(stream.numel(), bits),), float("nan"))
                    lookup(stream, bits, kind, buf[shift:])
                    got = buf[shift: shift + len(codes)]
                    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (bits, kind, shift)
    finally:
        torch.set_flush_denormal(False)  # torch's default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_forward_multiplies_a_few_rows_at_a_time_as_linear_would(monkeypatch, dtype):
    monkeypatch.setattr("coalora.quant.dequant.MATMUL_SLAB", 200)  # many steps of whole blocks
    w, b, x = randn(45, 54, seed=13), randn(45, seed=14), randn(2, 3, 54, seed=15).to(dtype)
    for spec in all_specs()[::17]:
        layer = PackedLinear.from_quantized(quantize(w, spec), b).to(dtype)
        want = F.linear(x, fake_quantize(w, spec).to(dtype), b.to(dtype))
        got = layer(x)
        assert got.dtype == dtype and got.shape == (2, 3, 45) and got.is_contiguous()
        torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


def test_casting_a_model_never_touches_the_packed_scales():
    spec = all_specs()[-1]  # fp32 second-level scales: a bf16 copy would be a different scale
    w, b, x = randn(8, 40, seed=5), randn(8, seed=6), randn(2, 40, seed=7)
    layer = PackedLinear.from_quantized(quantize(w, spec), b)
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer = layer.to(torch.bfloat16)
    assert all(torch.equal(getattr(layer, k), v) for k, v in before.items())
    assert layer.compute_dtype == torch.bfloat16
    want = F.linear(x.bfloat16(), fake_quantize(w, spec).bfloat16(), b.bfloat16())
    assert torch.equal(layer(x.bfloat16()), want)


@pytest.mark.parametrize("steps", [False, True], ids=["one-step", "many-steps"])
def test_gradients_flow_through_a_packed_layer_to_its_input(monkeypatch, steps):
    if steps:
        monkeypatch.setattr("coalora.quant.dequant.MATMUL_SLAB", 64)  # a layer larger than one step
    w = randn(36, 40, seed=8)
    layer = PackedLinear.from_quantized(quantize(w, all_specs()[100]))
    x = randn(3, 40, seed=9).requires_grad_()
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 36) @ layer.dequantize())


def test_the_quantized_tensor_round_trips_through_the_layer():
    qt = quantize(randn(12, 21, seed=10), all_specs()[200])
    back = PackedLinear.from_quantized(qt).quantized()
    assert back.spec == qt.spec and back.shape == qt.shape
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), qt.state_dict().values()))


# ---------------------------------------------------------------------------------------------------------
# Registration with transformers
# ---------------------------------------------------------------------------------------------------------

def test_import_coalora_stays_cheap_and_registers_when_transformers_registry_is_imported():
    code = ("import sys, coalora; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as q, "
            "AUTO_QUANTIZATION_CONFIG_MAPPING as c; print(q['coalora'].__name__, c['coalora'].__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CoaloraHfQuantizer", "CoaloraQuantizationConfig"]


def test_install_registers_at_once_when_transformers_is_already_imported(monkeypatch):
    from transformers.quantizers import auto

    from coalora.deploy.hooks import install

    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "coalora")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "coalora")
    install()
    assert auto.AUTO_QUANTIZER_MAPPING["coalora"].__name__ == "CoaloraHfQuantizer"


# ---------------------------------------------------------------------------------------------------------
# Packed folders from `coalora adapt`: the built-in model and a SmolLM2-shaped one
# ---------------------------------------------------------------------------------------------------------

def builtin_model(tokenizer):
    """The built-in default model at its smoke size (params.yaml + profiles/smoke.yaml), untrained."""
    from coalora.model.builtin import build_model
    from coalora.params import load_params

    params = load_params(Path(__file__).resolve().parent.parent, "smoke")
    return build_model(params.model.builtin, tokenizer, seed=0).eval()


def smollm2_shaped_model(tokenizer):
    """SmolLM2-135M's structure shrunk: Llama, 9 query / 3 key-value heads, FFN 8/3 of hidden, tied embeddings
    (head_dim 6: no weight is a whole number of 64-blocks, so every last block is partial)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=54, intermediate_size=144, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


MODELS = {"builtin": builtin_model, "smollm2": smollm2_shaped_model}


@pytest.fixture(scope="module", params=sorted(MODELS))
def deployed(request, tmp_path_factory, repo_root):
    """(project info, packed output, dense output) of `coalora adapt --budget 3.25` on one model."""
    root = tmp_path_factory.mktemp(request.param)
    info = make_project(root, repo_root, MODELS[request.param])
    packed, dense = root / "packed", root / "dense"
    assert adapt(root, "--budget", "3.25", "--out", str(packed)) == 0
    assert adapt(root, "--budget", "3.25", "--out", str(dense), "--dense") == 0
    return info, packed, dense


@pytest.fixture(autouse=True)
def no_profile(monkeypatch):
    monkeypatch.delenv("COALORA_PROFILE", raising=False)


def test_packed_and_dense_give_the_same_logits_with_and_without_the_adapter(deployed):
    info, packed, dense = deployed
    tokens = torch.randint(0, info["vocab"], (2, 11), generator=torch.Generator().manual_seed(0))
    for with_adapter in (False, True):
        torch.testing.assert_close(exported_logits(packed, tokens, with_adapter),
                                   exported_logits(dense, tokens, with_adapter), rtol=1e-5, atol=1e-6)


def test_generate_on_the_packed_model_with_its_adapter(deployed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    info, packed, dense = deployed
    prompt = torch.randint(1, info["vocab"], (1, 5), generator=torch.Generator().manual_seed(1))
    outputs = []
    for out in (packed, dense):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "model"), out / "adapter")
        outputs.append(model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                      do_sample=False, min_new_tokens=6))
    assert outputs[0].shape == (1, 11) and torch.equal(outputs[0], outputs[1])


def test_the_packed_model_holds_only_the_bits_its_config_pays_for(deployed):
    from transformers import AutoModelForCausalLM

    info, packed, _ = deployed
    qc = json.loads((packed / "model" / "config.json").read_text())["quantization_config"]
    config = Config.load(packed / "model" / "coalora_config.json", info["layers"])
    assert qc["quant_method"] == "coalora" and qc["config_id"] == config.id and qc["bits"] == config.bits
    assert qc["layers"] == {name: config[name].key for name in config} and config.bits <= 3.25
    model = AutoModelForCausalLM.from_pretrained(packed / "model")
    shapes = {tuple(t.shape) for t in model.state_dict().values()}
    assert not any(shape in shapes for shape in info["layers"].values())  # never a dense target weight
    held = 0
    for name, shape in info["layers"].items():
        layer = model.get_submodule(name)
        assert isinstance(layer, PackedLinear) and layer.spec == config[name] and layer.shape == shape
        held += sum(getattr(layer, k).nbytes for k in ("weight", "scale_codes", "scale2", "offset"))
    exact = sum(storage_bits(config[n], s) for n, s in info["layers"].items()) / 8
    assert exact <= held < exact + 2 * len(info["layers"])


def test_a_sharded_base_model_gives_a_sharded_packed_folder(tmp_path, repo_root):
    from transformers import AutoModelForCausalLM

    from coalora.artifacts import atomic_folder, write_json

    info = make_project(tmp_path, repo_root, smollm2_shaped_model)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts" / "base_model" / "model")
    with atomic_folder(tmp_path / "artifacts" / "base_model") as tmp:  # the same model in 30 KB shards
        base.save_pretrained(tmp / "model", max_shard_size="30KB")
        write_json(tmp / "base.json", {"source": "builtin", "path": "model", "revision": None})
    assert adapt(tmp_path, "--budget", "3.25", "--out", str(tmp_path / "packed")) == 0
    assert adapt(tmp_path, "--budget", "3.25", "--out", str(tmp_path / "dense"), "--dense") == 0
    folder = tmp_path / "packed" / "model"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = json.loads((folder / "config.json").read_text())["quantization_config"]["files"]
    assert len(files) > 1 and set(files) == set(index["weight_map"].values())
    name = next(iter(info["layers"]))
    assert f"{name}.scale_codes" in index["weight_map"]
    tokens = torch.randint(0, info["vocab"], (1, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(exported_logits(tmp_path / "packed", tokens),
                               exported_logits(tmp_path / "dense", tokens), rtol=1e-5, atol=1e-6)
    shard = folder / sorted(files)[1]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match=f"{shard.name} is .* bytes.*truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("deployed", ["smollm2"], indirect=True)
def test_transformers_without_coalora_refuses_the_packed_folder_instead_of_random_layers(deployed):
    _, packed, _ = deployed
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(packed / 'model')!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "Unknown quantization type, got coalora" in done.stderr
    assert "mismatch" in done.stderr.lower()


# ---------------------------------------------------------------------------------------------------------
# Bad folders: a clear error naming the file or layer, before any tensor is loaded
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def broken(deployed, tmp_path, monkeypatch):
    """A copy of the packed model folder to damage; loading it must fail before the checkpoint is read."""
    from transformers import PreTrainedModel

    info, packed, _ = deployed
    folder = tmp_path / "model"
    shutil.copytree(packed / "model", folder)

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was read although the folder is bad")

    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(no_loading))
    return info, folder


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_a_corrupt_weight_file_is_refused_by_its_digest(broken):
    _, folder = broken
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x5A  # a byte of the last tensor's data: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors does not match its sha256.*corrupt"):
        load(folder)


def test_a_truncated_weight_file_is_refused(broken):
    _, folder = broken
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated"):
        load(folder)


def test_a_missing_weight_file_is_refused(broken):
    _, folder = broken
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        load(folder)


def test_packed_tensors_that_do_not_match_the_recorded_spec_are_refused(broken):
    info, folder = broken
    config = Config.load(folder / "coalora_config.json", info["layers"])
    name = next(iter(config))
    other = next(s for s in all_specs() if s.weight_bits != config[name].weight_bits)
    edited = Config({**{n: config[n] for n in config}, name: other}, info["layers"])

    def change(c):  # a consistent config.json (id and specs agree) whose spec is not what the file holds
        c["quantization_config"].update(layers={n: edited[n].key for n in edited}, config_id=edited.id)

    edit_config(folder, change)
    with pytest.raises(ArtifactError, match=rf"layer {name}: {name}\.weight is U8 .* but spec {other.key}"):
        load(folder)


def test_an_edited_spec_without_its_id_is_refused(broken):
    info, folder = broken
    name = next(iter(info["layers"]))
    edit_config(folder, lambda c: c["quantization_config"]["layers"].update({name: "b8-s8-fp32-64-256"}))
    with pytest.raises(ArtifactError, match="does not match its layers"):
        load(folder)


def test_a_quantization_config_for_a_different_model_is_refused(broken):
    _, folder = broken
    edit_config(folder, lambda c: c.update(intermediate_size=c["intermediate_size"] + 8))
    with pytest.raises(ArtifactError, match=r"layer model\.layers\.0\.mlp\.\w+_proj is \d+×\d+ in the model but "
                                            r"\d+×\d+ in the quantization config"):
        load(folder)


def test_an_unknown_format_is_refused(broken):
    _, folder = broken
    edit_config(folder, lambda c: c["quantization_config"].update(format="coalora.packed-model/99"))
    with pytest.raises(ArtifactError, match="format"):
        load(folder)


# ---------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_layers_and_models_run_on_cuda(deployed):
    from transformers import AutoModelForCausalLM

    w, x = randn(37, 50, seed=11), randn(4, 50, seed=12)
    for spec in all_specs()[::11]:
        layer = PackedLinear.from_quantized(quantize(w, spec))
        gpu = layer.cuda()
        assert torch.equal(gpu.dequantize().cpu(), layer.dequantize())
        torch.testing.assert_close(gpu(x.cuda()).cpu(), layer(x), rtol=1e-4, atol=1e-5)
    info, packed, _ = deployed
    tokens = torch.randint(0, info["vocab"], (2, 7), generator=torch.Generator().manual_seed(3))
    model = AutoModelForCausalLM.from_pretrained(packed / "model", device_map="cuda")
    with torch.no_grad():
        logits = model(tokens.cuda()).logits.cpu()
    torch.testing.assert_close(logits, exported_logits(packed, tokens, adapter=False), rtol=1e-3, atol=1e-4)
