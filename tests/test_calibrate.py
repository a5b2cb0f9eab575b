"""Calibration: Fisher diagonals against brute force, the cost tables, the stage end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coalora.artifacts import read_json, write_json, write_jsonl
from coalora.allocate import allocate_budget
from coalora.calibrate.costs import SEGMENT, cost_tables, layer_costs, sample_segments, segment_blocks, spec_plan
from coalora.calibrate.fisher import calibration_sequences, fisher_diagonals
from coalora.calibrate.cost_table import CostTable
from coalora.errors import ArtifactError, ParamsError, UserError
from coalora.params import load_params
from coalora.quant import QLORA_SPEC, QuantSpec, all_specs, fake_quantize, quantization_error, quantize_parts
from coalora.quant.quantizer import block_absmax, block_scales, padded_blocks
from coalora.quant.sweep import SCALE_COMBOS, scale_sets
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


# ---------------------------------------------------------------------------------------------------------
# The sweep: exact where it is exact, an unbiased estimate where it samples
# ---------------------------------------------------------------------------------------------------------

def _heavy(shape, seed):
    """Student-t weights (heavy tails, like trained ones) and a heavy-tailed Fisher with row/column structure."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp(min=0.05).sqrt() * 0.02
    f = torch.rand(shape, generator=g) ** 4 * torch.rand(shape[0], 1, generator=g)
    f = f * torch.rand(1, shape[1], generator=g)
    return w, f


@pytest.mark.parametrize("shape", [(37, 53), (5, 7), (16, 64), (1, 1)])
def test_exact_sweep_equals_quantization_error_for_every_spec(shape):
    """Partial last blocks and super-blocks (37·53 = 1961 = 30·64 + 41), a matrix smaller than one block,
    whole blocks; every spec, both weightings. Each weight's float32 error is the same number; the float64
    sums add them in another order (per scale combo over (blocks, B0) instead of over (rows, cols)), so the
    totals agree to float64 rounding."""
    w, f = _heavy(shape, 5)
    table = layer_costs(w, [None, f], SPECS)
    expected = torch.tensor([[quantization_error(w, s) for s in SPECS], [quantization_error(w, s, f) for s in SPECS]],
                            dtype=torch.float64)
    torch.testing.assert_close(table, expected, rtol=1e-13, atol=0)


def test_exact_sweep_over_several_chunks_and_specs_in_any_order():
    """A matrix larger than one chunk (the float64 sums then add chunk by chunk: equal to 1e-12), a bf16
    weight, and a subset of specs in shuffled order (columns follow the given order)."""
    w, f = _heavy((150, 131), 6)  # 19650 weights > CHUNK_WEIGHTS, not a multiple of 64
    w = w.to(torch.bfloat16)
    specs = [SPECS[i] for i in torch.randperm(len(SPECS), generator=torch.Generator().manual_seed(7))[:40].tolist()]
    table = layer_costs(w, [f, None], specs)
    for c, spec in enumerate(specs):
        assert table[0, c].item() == pytest.approx(quantization_error(w, spec, f), rel=1e-12, abs=0)
        assert table[1, c].item() == pytest.approx(quantization_error(w, spec), rel=1e-12, abs=0)


def test_scale_sets_are_the_quantizers_scales():
    w, _ = _heavy((23, 45), 8)
    for block0 in (16, 32, 64):
        s_hat = scale_sets(block_absmax(padded_blocks(w, block0)), block0, w.numel(), SCALE_COMBOS)
        assert s_hat.shape == (len(SCALE_COMBOS), -(-w.numel() // block0))
        for j, (b1, b2, block1) in enumerate(SCALE_COMBOS):
            parts = quantize_parts(w, QuantSpec(3, b1, b2, block0, block1))
            assert torch.equal(s_hat[j], block_scales(parts.q, parts.s3, parts.offset, parts.spec))


def test_spec_plan_covers_each_spec_once():
    plan = spec_plan(SPECS)
    assert sorted(plan) == [16, 32, 64]
    seen = {}
    for block0, (combos, bits, columns) in plan.items():
        assert combos == list(SCALE_COMBOS) and bits == [2, 3, 4, 8]
        for column, b, j in columns:
            b1, b2, block1 = combos[j]
            seen[column] = QuantSpec(bits[b], b1, b2, block0, block1)
    assert [seen[c] for c in range(len(SPECS))] == list(SPECS)


def test_sample_segments_are_spread_seeded_and_unbiased():
    n = 1000 * SEGMENT + 17  # 1001 segments, the last one partial
    segments = sample_segments(n, 100 * SEGMENT, seed=3)
    assert segments.shape == (100,) and segments.dtype == torch.int64
    assert torch.equal(segments, sample_segments(n, 100 * SEGMENT, seed=3))
    assert not torch.equal(segments, sample_segments(n, 100 * SEGMENT, seed=4))
    # one per stretch of N/m segments: the j-th lies in [j·N/m, (j+1)·N/m)
    lows = torch.arange(100) * 1001 / 100
    assert ((segments >= lows.floor()) & (segments < lows + 1001 / 100)).all()
    assert sample_segments(n, 1001 * SEGMENT, seed=3) is None  # the sample would be everything: exact
    assert sample_segments(n, 5000 * SEGMENT, seed=3) is None
    # every segment, the partial last one too, is drawn m/N times per call on average
    counts = torch.zeros(1001)
    for seed in range(400):
        counts += torch.bincount(sample_segments(n, 100 * SEGMENT, seed), minlength=1001)
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean() and counts[-1] > 0


@pytest.mark.parametrize("block0", [16, 32, 64])
def test_segment_blocks_are_the_segments_weights(block0):
    n = 7 * SEGMENT + 40  # 8 segments, the last one 40 weights: 40/B0 blocks, rounded up
    n_blocks = -(-n // block0)
    segments = torch.tensor([0, 3, 3, 7])
    blocks = segment_blocks(segments, block0, n_blocks)
    covered = [i for b in blocks.tolist() for i in range(b * block0, min((b + 1) * block0, n))]
    expected = [i for s in segments.tolist() for i in range(s * SEGMENT, min((s + 1) * SEGMENT, n))]
    assert covered == expected


def test_sampled_costs_are_exact_for_a_full_sample_and_unbiased_otherwise():
    w, f = _heavy((40, 100), 9)  # 4000 weights = 62.5 segments
    specs = SPECS[::7]
    exact = layer_costs(w, [None, f], specs)
    assert torch.equal(layer_costs(w, [None, f], specs, sample_weights=4000, seed=1), exact)
    estimates = torch.stack([layer_costs(w, [None, f], specs, sample_weights=16 * SEGMENT, seed=s) for s in range(60)])
    rel = estimates / exact - 1  # (seeds, K, C)
    assert rel.abs().max() > 0.01  # a real estimate, not the exact table
    assert rel.mean(dim=0).abs().mean() < 0.03  # unbiased: the mean over seeds closes in on the exact table
    assert rel.mean(dim=0).abs().mean() < 0.25 * rel.abs().mean()


def test_sampled_allocation_costs_within_tolerance_of_the_exact_one():
    """The allocation a sampled table leads to, costed with the exact table, against the exact optimum, at six
    budgets, on 12 small layers with heavy-tailed weights and Fisher (a harsh case: few weights, outliers).
    Sampling 2048 weights per layer (44–89 % of the larger ones; the smallest fall back to exact) keeps the
    regret within 2 % on average and 5 % at worst for both weightings; 512 weights do not (up to 29 %)."""
    shapes = [(48, 96), (96, 48), (48, 48), (24, 48)] * 3
    pairs = [_heavy(shape, 20 + i) for i, shape in enumerate(shapes)]
    pairs = [(w * (1 + i % 4), f) for i, (w, f) in enumerate(pairs)]  # layers of different scales
    exact = torch.stack([layer_costs(w, [None, f], SPECS) for w, f in pairs])  # (L, 2, C)
    sampled = torch.stack([layer_costs(w, [None, f], SPECS, 2048, i) for i, (w, f) in enumerate(pairs)])
    assert (sampled / exact - 1).abs().max() > 0.05  # estimates, not the exact table
    bpp = np.array([s.bits_per_param for s in SPECS])
    numel = np.array([w.numel() for w, _ in pairs])
    rows = np.arange(len(pairs))
    for k in (0, 1):
        ex, est = exact[:, k].numpy(), sampled[:, k].numpy()
        regret = []
        for budget in (2.5, 3.0, 3.5, 4.0, 5.0, 6.0):
            best = allocate_budget(ex, bpp, numel, budget)
            regret.append(ex[rows, allocate_budget(est, bpp, numel, budget).idx].sum() / best.objective - 1)
        assert np.mean(regret) <= 0.02 and max(regret) <= 0.05, regret


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


def test_stage_sampled_table_and_its_parameter(repo_root, stage_inputs, tmp_path):
    params = _params(repo_root, "fisher")
    sampled = params.model_copy(update={"calibrate": params.calibrate.model_copy(update={"sample_weights": 512})})
    summary = _run_calibrate(sampled, stage_inputs, tmp_path / "sampled")
    assert summary["sample_weights"] == 512
    estimate = CostTable.load(tmp_path / "sampled").tables  # 512 of 1024 and 1536 weights
    _run_calibrate(params, stage_inputs, tmp_path / "exact")
    reference = CostTable.load(tmp_path / "exact").tables
    for key in ("cost_fisher", "cost_squared"):
        assert not torch.equal(estimate[key], reference[key])
        assert (estimate[key] / reference[key] - 1).abs().median() < 0.2
    raw = params.model_dump(mode="json")
    raw["calibrate"]["sample_weights"] = 10
    from coalora.params import validate

    with pytest.raises(ParamsError, match=r"calibrate\.sample_weights: Input should be greater than or equal to 64"):
        validate(raw)
