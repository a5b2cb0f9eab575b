"""Calibration: Fisher diagonals against brute force, the cost tables, the stage end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coalora.artifacts import read_json, write_json, write_jsonl
from coalora.calibrate import (CostTable, calibration_sequences, cost_tables, fisher_diagonals, layer_costs)
from coalora.errors import ArtifactError, UserError
from coalora.params import load_params
from coalora.quant import QLORA_SPEC, all_specs, fake_quantize, quantization_error
from coalora.space import model_weights, quantized_layers
from coalora.stages.core import StageContext

SPECS = all_specs()


def tiny_llama(blocks: int = 2, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=blocks, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def layers(model):
    return quantized_layers(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_fisher_equals_per_sequence_brute_force(model, layers):
    sequences = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    fisher = fisher_diagonals(model, sequences, layers, progress=False, batch_size=2)  # a batch and a single
    weights = model_weights(model, layers)
    expected = {name: torch.zeros(shape) for name, shape in layers.items()}
    for ids in sequences:  # one sequence at a time: its own loss, its own gradient, squared
        model.zero_grad()
        model(input_ids=ids[None], labels=ids[None]).loss.backward()
        for name, w in weights.items():
            expected[name] += w.grad.square() / len(sequences)
    model.zero_grad()
    for name, shape in layers.items():
        f = fisher[name]
        assert tuple(f.shape) == shape and f.dtype == torch.float32
        assert torch.isfinite(f).all() and (f >= 0).all() and f.sum() > 0
        torch.testing.assert_close(f, expected[name], rtol=1e-4, atol=1e-12)
    # the model is left as it was found
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    # not the square of the batch gradient: that one is smaller (gradients of different sequences cancel)
    model.zero_grad()
    model(input_ids=sequences, labels=sequences).loss.backward()
    name = next(iter(layers))
    assert weights[name].grad.square().sum() < fisher[name].sum()
    model.zero_grad()


def test_cost_table_shape_and_entries(model):
    few = quantized_layers(model, ["q_proj", "down_proj"])
    weights = model_weights(model, few)
    fisher = {n: torch.rand(s, generator=torch.Generator().manual_seed(2)) for n, s in few.items()}
    tables = cost_tables(model, few, fisher, progress=False)
    assert set(tables) == {"squared", "fisher"}
    for table in tables.values():
        assert table.shape == (len(few), len(SPECS)) and table.dtype == torch.float64
        assert torch.isfinite(table).all() and (table >= 0).all()
    for i, name in enumerate(few):
        w = weights[name].detach()
        for c in (0, 57, SPECS.index(QLORA_SPEC), 431):
            direct = float(((w - fake_quantize(w, SPECS[c])) ** 2).sum(dtype=torch.float64))
            assert tables["squared"][i, c].item() == pytest.approx(direct, rel=1e-6)
            assert tables["squared"][i, c].item() == quantization_error(w, SPECS[c])  # bitwise
            weighted = float((fisher[name] * (w - fake_quantize(w, SPECS[c])) ** 2).sum(dtype=torch.float64))
            assert tables["fisher"][i, c].item() == pytest.approx(weighted, rel=1e-6)
    # more weight bits, less error: the mean over layers and the other four fields falls with b0
    bits = np.array([s.weight_bits for s in SPECS])
    means = [tables["squared"][:, bits == b].mean().item() for b in (2, 3, 4, 8)]
    assert means == sorted(means, reverse=True) and means[0] > 10 * means[2] > 100 * means[3]


def test_layer_costs_of_several_weightings_come_from_one_quantization():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    f = torch.rand(24, 40, generator=torch.Generator().manual_seed(4))
    specs = SPECS[::50]
    out = layer_costs(w.to(torch.bfloat16), [None, f, torch.ones_like(f)], specs)
    assert out.shape == (3, len(specs))
    assert torch.equal(out[0], out[2])
    for c, spec in enumerate(specs):
        assert out[1, c].item() == quantization_error(w.to(torch.bfloat16), spec, f)


def test_calibration_sequences_are_seeded_and_sized():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, **{f"w{i}": i + 1 for i in range(20)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    texts = [" ".join(f"w{(d + k) % 20}" for k in range(5 + d % 7)) for d in range(40)]
    a = calibration_sequences(tokenizer, texts, 6, 10, seed=1)
    assert a.shape == (6, 10) and a.dtype == torch.int64
    assert torch.equal(a, calibration_sequences(tokenizer, texts, 6, 10, seed=1))
    assert not torch.equal(a, calibration_sequences(tokenizer, texts, 6, 10, seed=2))
    assert (a == 0).any()  # EOS between documents
    with pytest.raises(UserError, match=r"calibrate\.n_sequences × calibrate\.seq_len"):
        calibration_sequences(tokenizer, texts, 1000, 10, seed=1)


# ---------------------------------------------------------------------------------------------------------
# The stage, end to end, on a tiny model folder
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """A data folder (C4-schema text) and a base_model folder (a tiny Llama + tokenizer, ``base.json``)."""
    from coalora.model.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("calibrate-inputs")
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "market", "north", "green", "seven"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(8, 30)))) + "." for _ in range(120)]
    data = root / "data"
    write_jsonl(data / "text/train.jsonl", [{"text": t, "url": f"https://x/{i}", "timestamp": "2020-01-01"}
                                            for i, t in enumerate(texts)])
    tokenizer = train_tokenizer(texts, 300)
    base = root / "base_model"
    model = tiny_llama(blocks=1, vocab=len(tokenizer))
    model.save_pretrained(base / "model")
    tokenizer.save_pretrained(base / "model")
    write_json(base / "base.json", {"source": "builtin", "path": "model", "revision": None})
    return {"data": data, "base_model": base}


def _run_calibrate(params, inputs, out):
    from coalora.stages.calibrate import STAGE

    out.mkdir()
    ctx = StageContext(root=out.parent, out=out, work=out.parent / "work", inputs=inputs, progress=False)
    return STAGE.fn(params, ctx)


def _params(repo_root, weighting):
    params = load_params(repo_root, "smoke")
    return params.model_copy(update={
        "quant": params.quant.model_copy(update={"target_modules": ["q_proj", "down_proj"]}),
        "calibrate": params.calibrate.model_copy(update={"n_sequences": 3, "seq_len": 16, "batch_size": 2,
                                                         "weighting": weighting}),
    })


def test_stage_end_to_end(repo_root, stage_inputs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "calibrate"
    summary = _run_calibrate(_params(repo_root, "fisher"), stage_inputs, out)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    assert summary["layers"] == 2 and summary["specs"] == 432 and summary["weighting"] == "fisher"
    assert summary["params_quantized"] == 32 * 32 + 32 * 48 and summary["n_sequences"] == 3
    index = read_json(out / "costs.json")
    assert index["layers"] == names and index["shapes"] == [[32, 32], [32, 48]]
    assert index["specs"] == [s.key for s in SPECS] and index["selected"] == "cost_fisher"
    tensors = load_file(str(out / "costs.safetensors"))
    assert set(tensors) == {"cost_fisher", "cost_squared", "numel", "bits_per_param"}
    assert tensors["cost_fisher"].shape == (2, 432) and tensors["numel"].tolist() == [1024, 1536]
    fisher = load_file(str(out / "fisher.safetensors"))
    assert list(fisher) == sorted(names) and fisher[names[1]].shape == (32, 48)
    table = CostTable.load(out)
    assert table.layers == {names[0]: (32, 32), names[1]: (32, 48)} and table.selected is table.tables["cost_fisher"]
    # the Fisher-weighted cost is the squared error weighted by the saved Fisher
    from coalora.model.load import load_base

    model, _ = load_base(stage_inputs["base_model"])
    w = model_weights(model, table.layers)[names[1]].detach()
    diff = w - fake_quantize(w, SPECS[100])
    assert table.tables["cost_fisher"][1, 100].item() == pytest.approx(float((fisher[names[1]] * diff ** 2).sum()),
                                                                        rel=1e-6)
    assert not list(out.glob("*.pt")) and not list(out.glob("*.bin"))  # never pickle
    # deterministic
    _run_calibrate(_params(repo_root, "fisher"), stage_inputs, tmp_path / "again")
    for name in ("costs.safetensors", "costs.json", "fisher.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_stage_squared_weighting_and_damaged_index(repo_root, stage_inputs, tmp_path):
    out = tmp_path / "calibrate"
    summary = _run_calibrate(_params(repo_root, "squared"), stage_inputs, out)
    assert summary["weighting"] == "squared" and summary["n_sequences"] == 0
    assert not (out / "fisher.safetensors").exists()
    table = CostTable.load(out)
    assert set(table.tables) == {"cost_squared"} and table.selected is table.tables["cost_squared"]
    index = read_json(out / "costs.json")
    index["shapes"][0] = [32, 16]
    write_json(out / "costs.json", index)
    with pytest.raises(ArtifactError, match="does not match costs.json"):
        CostTable.load(out)
