"""Configurations: layer discovery, bits, content ids, JSON round trips, errors, hand-written rules."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from coalora.errors import UserError
from coalora.model.confignet import block_index, matrix_type
from coalora.quant import QLORA_SPEC, QuantSpec, all_specs, storage_bits
from coalora.space import Config, config_from_rules, quantized_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32),
         "self_attn.o_proj": (32, 32), "mlp.gate_proj": (48, 32), "mlp.up_proj": (48, 32),
         "mlp.down_proj": (32, 48)}


def _tiny(kind: str = "llama", layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama")


@pytest.fixture(scope="module")
def layers(llama):
    return quantized_layers(llama, TARGETS)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_discovery_finds_every_block_linear_with_its_shape(kind):
    model = _tiny(kind, layers=3)
    found = quantized_layers(model, TARGETS)
    expected = {f"model.layers.{b}.{k}": shape for b in range(3) for k, shape in KINDS.items()}
    assert found == expected
    assert list(found) == [n for n, _ in model.named_modules() if n in expected]  # model order
    assert not any("lm_head" in n or "embed" in n for n in found)
    name = "model.layers.2.mlp.down_proj"  # θ's position of a layer: (block index, matrix type)
    assert (block_index(name), matrix_type(name)) == (2, "down_proj")


def test_target_modules_subset_suffix_and_regex(llama):
    assert list(quantized_layers(llama, ["q_proj", "v_proj"])) == [
        f"model.layers.{b}.self_attn.{k}" for b in range(2) for k in ("q_proj", "v_proj")]
    assert list(quantized_layers(llama, ["mlp.down_proj"])) == [f"model.layers.{b}.mlp.down_proj" for b in range(2)]
    assert list(quantized_layers(llama, [r"model\.layers\.1\.mlp\.(up|gate)_proj"])) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    # lm_head is a Linear outside the blocks: never quantized; naming it is an entry that matches nothing
    with pytest.raises(UserError, match=r"quant\.target_modules: 'lm_head' matches no linear layer inside"):
        quantized_layers(llama, ["lm_head", "q_proj"])


def test_no_match_names_the_field(llama):
    with pytest.raises(UserError, match=r"quant\.target_modules.*c_attn.*q_proj"):
        quantized_layers(llama, ["c_attn"])
    with pytest.raises(UserError, match=r"quant\.target_modules"):
        quantized_layers(llama, ["lm_head"])


def test_bits_formula(layers):
    for spec in (QLORA_SPEC, all_specs()[0], all_specs()[-1]):
        config = Config({n: spec for n in layers}, layers)
        assert config.bits == pytest.approx(spec.bits_per_param, rel=1e-15)
    # mixed: weighted by numel (down_proj 32·48, q_proj 32·32 …)
    two, eight = QuantSpec(2, 2, "bf16", 64, 256), QuantSpec(8, 8, "fp32", 16, 16)
    specs = {n: (eight if n.endswith("down_proj") else two) for n in layers}
    config = Config(specs, layers)
    numel = {n: o * i for n, (o, i) in layers.items()}
    expected = sum(specs[n].bits_per_param * numel[n] for n in layers) / sum(numel.values())
    assert config.bits == pytest.approx(expected, rel=1e-15)
    exact = sum(storage_bits(specs[n], layers[n]) for n in layers) / sum(numel.values())
    assert config.exact_bits == pytest.approx(exact, rel=1e-15) and config.exact_bits > config.bits


def test_content_id_is_stable_and_changes_with_any_spec(layers):
    config = Config({n: QLORA_SPEC for n in layers}, layers)
    again = Config({n: QLORA_SPEC for n in reversed(list(layers))}, layers, source="other")
    assert config.id == again.id and config == again  # order of the input and metadata do not matter
    canonical = json.dumps({n: QLORA_SPEC.to_dict() for n in layers}, sort_keys=True, separators=(",", ":"))
    assert config.id == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    ids = {config.id}
    for name in layers:
        for field_change in ({"weight_bits": 3}, {"scale_bits": 4}, {"scale2_dtype": "bf16"}, {"block0": 32},
                             {"block1": 64}):
            spec = QuantSpec(**{**QLORA_SPEC.to_dict(), **field_change})
            ids.add(Config({**{n: QLORA_SPEC for n in layers}, name: spec}, layers).id)
    assert len(ids) == 1 + 5 * len(layers)


def test_json_round_trip_and_indices(layers, tmp_path):
    specs = all_specs()
    config = Config.from_indices(list(range(0, 14 * 30, 30)), layers, budget=3.5, source="milp")
    assert config.spec_indices().tolist() == list(range(0, 14 * 30, 30))
    assert config.layer_bits().tolist() == [specs[i].bits_per_param for i in range(0, 14 * 30, 30)]
    d = config.to_dict()
    assert set(d) == {"layers", "bits", "exact_bits", "id", "budget", "source"}
    assert d["layers"]["model.layers.0.self_attn.q_proj"] == specs[0].to_dict()
    path = tmp_path / "c.json"
    config.save(path)
    back = Config.load(path, layers)
    assert back == config and back.id == config.id and back.meta == {"budget": 3.5, "source": "milp"}
    assert back.bits == config.bits and back.to_dict() == json.loads(path.read_text())


def _dict(layers):
    return Config({n: QLORA_SPEC for n in layers}, layers).to_dict()


def test_bad_configs_name_the_problem(layers, tmp_path):
    d = _dict(layers)
    d["layers"]["model.layers.9.self_attn.q_proj"] = QLORA_SPEC.to_dict()
    with pytest.raises(UserError, match=r"unknown layer.*model\.layers\.9\.self_attn\.q_proj"):
        Config.from_dict(d, layers)
    d = _dict(layers)
    del d["layers"]["model.layers.1.mlp.up_proj"]
    with pytest.raises(UserError, match=r"missing spec.*model\.layers\.1\.mlp\.up_proj"):
        Config.from_dict(d, layers)
    for field, bad, allowed in (("weight_bits", 5, r"\[2, 3, 4, 8\]"), ("scale2_dtype", "fp8", r"\[.bf16., .fp16., .fp32.\]"),
                                ("block0", 4.0, r"\[16, 32, 64\]"), ("block1", "64", r"\[16, 64, 256\]")):
        d = _dict(layers)
        d["layers"]["model.layers.0.mlp.down_proj"][field] = bad
        with pytest.raises(UserError, match=rf"model\.layers\.0\.mlp\.down_proj.*{field} must be one of {allowed}"):
            Config.from_dict(d, layers)
    d = _dict(layers)
    d["layers"]["model.layers.0.mlp.down_proj"].pop("block1")
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.down_proj.*missing fields \['block1'\]"):
        Config.from_dict(d, layers)
    d = _dict(layers)
    d["layers"]["model.layers.0.mlp.down_proj"]["weight_bits"] = 2  # edited, id now stale
    with pytest.raises(UserError, match="does not match its layers"):
        Config.from_dict(d, layers)
    del d["id"]
    assert Config.from_dict(d, layers)["model.layers.0.mlp.down_proj"].weight_bits == 2
    with pytest.raises(UserError, match="must be a mapping with a 'layers'"):
        Config.from_dict([1, 2], layers)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        Config.load(tmp_path / "bad.json", layers)


def test_rules_precedence(layers):
    two, three, four, eight = ("b2-s8-fp32-64-256", "b3-s8-fp32-64-256", "b4-s8-fp32-64-256", "b8-s8-fp32-64-256")
    config = config_from_rules({"rules": [
        {"pattern": "*", "spec": four},
        {"pattern": "down_proj", "spec": three},
        {"pattern": "mlp.down_proj", "spec": two},          # longer suffix beats down_proj
        {"pattern": "model.layers.1.mlp.down_proj", "spec": eight},  # exact name beats everything
        {"pattern": r".*\.self_attn\.(q|k)_proj", "spec": QuantSpec.from_key(three).to_dict()},  # regex
    ]}, layers)
    assert config["model.layers.0.mlp.down_proj"].key == two
    assert config["model.layers.1.mlp.down_proj"].key == eight
    assert config["model.layers.0.mlp.up_proj"].key == four
    assert config["model.layers.1.self_attn.k_proj"].key == three
    assert config["model.layers.1.self_attn.v_proj"].key == four
    assert config.meta["source"] == "rules"
    # one spec for everything, in each accepted form
    for rules in (four, {"spec": four}, QuantSpec.from_key(four), QuantSpec.from_key(four).to_dict()):
        assert set(config_from_rules(rules, layers).values()) == {QuantSpec.from_key(four)}


def test_rules_errors(layers):
    with pytest.raises(UserError, match=r"no rule covers.*model\.layers\.0\.self_attn\.q_proj"):
        config_from_rules({"rules": [{"pattern": "mlp.down_proj", "spec": "b4-s8-fp32-64-256"}]}, layers)
    with pytest.raises(UserError, match=r"rule 0 pattern 'c_attn' matches no quantized layer"):
        config_from_rules({"rules": [{"pattern": "c_attn", "spec": "b4-s8-fp32-64-256"}]}, layers)
    with pytest.raises(UserError, match=r"rule 1 \(down_proj\).*weight_bits must be one of"):
        config_from_rules({"rules": [{"pattern": "*", "spec": "b4-s8-fp32-64-256"},
                                     {"pattern": "down_proj", "spec": {**QLORA_SPEC.to_dict(), "weight_bits": 6}}]},
                          layers)
    with pytest.raises(UserError, match="QuantSpec key must look like"):
        config_from_rules("b5-whatever", layers)
