"""CoA-LoRA: θ, the layer, configuration switching, gradients, LQ-LoRA init, and folding into peft.

Why one file of ~435 lines: these are the tests of one class (``coalora.model.coa.CoAModel``) and its layer,
all built on the same tiny-model helpers at the top; each section below is one behaviour of it."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from coalora.model.adapter import coa_header, parse_adapter, read_adapter, save_adapter
from coalora.model.coa import CoALoRALinear, CoAModel
from coalora.model.confignet import ConfigNet, block_index, matrix_type, spec_field_indices, vocabulary
from coalora.model.export import (CONFIG_FILE, PACKED_FILE, dense_weights, fold_config, peft_config,
                                  quantize_weights, read_packed, write_model_from, write_peft_adapter,
                                  write_quantization_record)
from coalora.params import ConfigNetParams, LoraParams
from coalora.quant import QLORA_SPEC, QuantSpec, all_specs, fake_quantize, storage_bits
from coalora.space import Config, quantized_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = LoraParams(rank=8, alpha=16.0, dropout=0.0, cache_mb=16,
                  confignet=ConfigNetParams(embed_dim=8, hidden=32, init_std=1e-3))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine's thread contention
    (with 2 OpenMP threads on a loaded 2-core box, each small op waits ~ms at the barrier)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, n_layers: int = 2, vocab: int = 96):
    """A tiny Llama (hidden 32, tied embeddings like the built-in model), float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def random_config(layers, seed: int) -> Config:
    rng = random.Random(seed)
    specs = all_specs()
    return Config({name: specs[rng.randrange(len(specs))] for name in layers}, layers)


def build(seed: int = 0, lora: LoraParams = LORA, use_confignet: bool = True, **kw):
    """(base model copy for references, CoAModel, layers)."""
    model = tiny_model(seed, **kw)
    reference = copy.deepcopy(model)
    layers = quantized_layers(model, TARGETS)
    torch.manual_seed(seed + 100)
    return reference, CoAModel(model, layers, lora, use_confignet).eval(), layers


@torch.no_grad()
def perturb(coa: CoAModel, scale: float = 0.05, theta: float = 0.0, seed: int = 7) -> None:
    """Nonzero B (and A noise); with ``theta`` > 0, θ's output layer too, so U is far from I."""
    g = torch.Generator().manual_seed(seed)
    for p in coa.lora_parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    if theta:
        for p in coa.confignet.out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * theta)


def ids(seed: int = 0, batch: int = 2, length: int = 11, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def quantized_reference(reference, config: Config, delta: dict | None = None):
    """The base model with each target weight replaced by W̃ (+ a merged ΔW), for hand-written comparisons."""
    model = copy.deepcopy(reference)
    for name in config:
        layer = model.get_submodule(name)
        layer.weight.copy_(fake_quantize(layer.weight, config[name]) + (delta[name] if delta else 0))
    return model


# ---------------------------------------------------------------------------------------------------------
# θ's inputs
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, block, mtype", [
    ("model.layers.7.self_attn.q_proj", 7, "q_proj"),                 # Llama
    ("model.layers.23.mlp.down_proj", 23, "down_proj"),               # Qwen2
    ("transformer.h.3.attn.c_attn", 3, "c_attn"),                     # GPT-2
    ("transformer.h.11.mlp.c_proj", 11, "c_proj"),
    ("model.decoder.layers.2.self_attn.k_proj", 2, "k_proj"),         # OPT
    ("roberta.encoder.layer.5.attention.self.query", 5, "query"),     # RoBERTa
    ("encoder.block.4.layer.1.DenseReluDense.wi", 4, "wi"),           # T5: the block, not the sub-layer
    ("model.layers.3.mlp.experts.12.up_proj", 3, "up_proj"),          # MoE: the block, not the expert
])
def test_block_index_and_matrix_type_parse_decoder_and_encoder_names(name, block, mtype):
    assert block_index(name) == block
    assert matrix_type(name) == mtype


@pytest.mark.parametrize("name", ["lm_head", "model.embed_tokens", "model.layers.q_proj", "h.x.attn"])
def test_block_index_fails_without_a_numbered_block(name):
    with pytest.raises(ValueError, match="no block index"):
        block_index(name)


def test_vocabularies_come_from_the_model_layers():
    _, coa, layers = build(n_layers=3)
    assert coa.confignet.n_blocks == 3
    assert coa.confignet.matrix_types == sorted(TARGETS)
    assert coa.block_ids.tolist() == [block_index(n) for n in layers]
    model = tiny_model(n_layers=5)
    few = quantized_layers(model, ["v_proj", "q_proj"])
    assert vocabulary(few) == (5, ["q_proj", "v_proj"])
    narrow = CoAModel(model, few, LORA)
    assert narrow.confignet.matrix_types == ["q_proj", "v_proj"] and narrow.confignet.block.num_embeddings == 5


def test_spec_field_indices_follow_spec_fields_order():
    assert spec_field_indices(QLORA_SPEC) == [2, 3, 2, 2, 2]
    assert spec_field_indices(QuantSpec(2, 2, "bf16", 16, 16)) == [0, 0, 0, 0, 0]
    assert spec_field_indices(QuantSpec(8, 4, "fp16", 32, 64)) == [3, 2, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------------
# At initialisation CoA-LoRA is plain LoRA
# ---------------------------------------------------------------------------------------------------------

def test_confignet_output_is_near_identity_at_init():
    # params.yaml's θ (embed 8, hidden 128, init_std 1e-3) at r = 16.
    torch.manual_seed(0)
    net = ConfigNet(rank=16, n_blocks=4, matrix_types=sorted(TARGETS), embed_dim=8, hidden=128, init_std=1e-3)
    assert net.scale.item() == 1.0 and torch.count_nonzero(net.out.bias) == 0
    g = torch.Generator().manual_seed(1)
    fields = torch.stack([torch.randint(0, 3, (50,), generator=g) for _ in range(5)], dim=1)
    inputs = (fields, torch.randint(0, 4, (50,), generator=g), torch.randint(0, 7, (50,), generator=g))
    with torch.no_grad():
        u = net(*inputs)
    assert u.shape == (50, 16, 16)
    eye = torch.eye(16)
    deviation = u - eye  # (50, 16, 16) = s·M
    # Entry-wise, U is within 1e-2 of I (RMS over every entry); in Frobenius norm relative to ‖I‖ the
    # deviation is init_std·‖h‖·√r ≈ 1e-3 · 3.6 · 4 ≈ 1.5e-2 at r = 16.
    assert float(deviation.square().mean().sqrt()) < 1e-2
    assert float((deviation.flatten(1).norm(dim=1) / eye.norm()).max()) < 2e-2
    assert float(deviation.abs().min(dim=0).values.max()) > 0  # θ does depend on its inputs
    with torch.no_grad():
        net.out.weight.zero_()
        assert torch.equal(net(*inputs), eye.expand(50, 16, 16))  # init_std 0: exactly plain LoRA


def test_with_b_zero_the_model_is_exactly_the_quantized_base():
    reference, coa, layers = build()
    config = random_config(layers, seed=1)
    coa.set_config(config)
    with torch.no_grad():
        got = coa(ids()).logits
        want = quantized_reference(reference, config)(ids()).logits
    assert torch.equal(got, want)


def test_with_nonzero_b_and_identity_u_it_is_a_hand_written_lora():
    reference, coa, layers = build()
    perturb(coa)
    with torch.no_grad():
        coa.confignet.out.weight.zero_()  # U = I + s·0 exactly
    config = random_config(layers, seed=2)
    coa.set_config(config)
    scaling = LORA.alpha / LORA.rank
    # One layer, the equation itself: y = x·W̃ᵀ + b + (α/r)·x·Aᵀ·Bᵀ.
    name = next(iter(layers))
    layer = coa.layers[name]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = x @ fake_quantize(layer.weight, config[name]).T + scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
        # The whole model: the same as merging ΔW = (α/r)·B·A into W̃.
        delta = {n: scaling * coa.layers[n].lora_B @ coa.layers[n].lora_A for n in layers}
        torch.testing.assert_close(coa(ids()).logits, quantized_reference(reference, config, delta)(ids()).logits,
                                   rtol=1e-4, atol=1e-5)
    plain = build(use_confignet=False)[1]
    plain.load_adapter_state_dict({k: v for k, v in coa.adapter_state_dict().items() if "confignet" not in k})
    plain.set_config(config)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()).logits, coa(ids()).logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Configuration switching and the cache
# ---------------------------------------------------------------------------------------------------------

def test_switching_configuration_equals_building_fresh_and_the_cache_is_bounded():
    _, coa, layers = build()
    perturb(coa, theta=0.05)
    state = coa.adapter_state_dict()
    configs = [random_config(layers, seed=s) for s in (10, 11, 12)]
    outputs = []
    with torch.no_grad():
        for config in configs + configs[:1]:
            coa.set_config(config)
            outputs.append(coa(ids()).logits)
        for config, got in zip(configs, outputs):
            fresh = build()[1]
            fresh.load_adapter_state_dict(state)
            fresh.set_config(config)
            assert torch.equal(fresh(ids()).logits, got)
    assert torch.equal(outputs[3], outputs[0]) and not torch.equal(outputs[0], outputs[1])
    assert coa.cache.hits >= len(layers)  # switching back to configs[0] hit the cache

    one_layer = max(w.numel() * 4 for w in (coa.layers[n].weight for n in layers))
    coa.cache.clear()
    coa.cache.max_bytes = 3 * one_layer
    for config in configs[1:] + configs[:1]:  # configs[0] is current: start by switching away
        coa.set_config(config)
        assert 0 < coa.cache.nbytes <= coa.cache.max_bytes
    assert coa.cache.evictions > 0 and len(coa.cache) <= 3 * one_layer // (32 * 16 * 4)

    no_cache = build(lora=LORA.model_copy(update={"cache_mb": 0}))[1]
    no_cache.load_adapter_state_dict(state)
    no_cache.set_config(configs[1])
    assert len(no_cache.cache) == 0 and no_cache.cache.nbytes == 0
    with torch.no_grad():
        assert torch.equal(no_cache(ids()).logits, outputs[1])


def test_set_config_rejects_another_models_config_and_forward_needs_one():
    _, coa, layers = build()
    with pytest.raises(RuntimeError, match="set_config"):
        coa(ids())
    other = quantized_layers(tiny_model(n_layers=3), TARGETS)
    with pytest.raises(ValueError, match="other layers"):
        coa.set_config(random_config(other, seed=0))


# ---------------------------------------------------------------------------------------------------------
# Training: what gets gradients
# ---------------------------------------------------------------------------------------------------------

def test_gradients_reach_a_b_and_theta_only():
    _, coa, layers = build()
    perturb(coa)  # with B = 0 exactly, A and θ get zero gradient (ΔW = B·U·A)
    coa.set_config(random_config(layers, seed=3))
    coa.train()
    coa(ids(), labels=ids()).loss.backward()
    trainable = coa.trainable_parameters()
    assert len(coa.lora_parameters()) == 2 * len(layers)
    assert len(trainable) == 2 * len(layers) + len(list(coa.confignet.parameters()))
    for p in coa.lora_parameters() + [coa.confignet.out.weight, coa.confignet.hidden.weight, coa.confignet.scale]:
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    assert all(p.grad is None and not p.requires_grad for p in coa.model.parameters()
               if all(p is not q for q in trainable))
    assert {id(p) for p in coa.parameters() if p.requires_grad} == {id(p) for p in trainable}


# ---------------------------------------------------------------------------------------------------------
# Adapter state, reset, LQ-LoRA
# ---------------------------------------------------------------------------------------------------------

def test_adapter_state_round_trips_through_the_adapter_file(tmp_path):
    _, coa, layers = build()
    perturb(coa, theta=0.05)
    config = random_config(layers, seed=4)
    coa.set_config(config)
    save_adapter(coa, tmp_path / "adapter.safetensors", step=12)
    tensors, header = read_adapter(tmp_path / "adapter.safetensors")
    assert header["step"] == 12 and header["rank"] == LORA.rank
    # the layers' shapes (the header is written with sorted keys, as the train stage always has: the bytes,
    # and so the stage's digest, must not depend on the order a header was built in)
    assert header["layers"] == {name: list(shape) for name, shape in layers.items()}
    assert set(tensors) == set(coa.adapter_state_dict())
    same_base = build()[1]
    same_base.load_adapter_state_dict(tensors)
    same_base.set_config(config)
    with torch.no_grad():
        assert torch.equal(same_base(ids()).logits, coa(ids()).logits)
    other = build(seed=5)[1]
    with pytest.raises(ValueError, match="missing"):
        other.load_adapter_state_dict({k: v for k, v in tensors.items() if not k.endswith("lora_B")})
    with pytest.raises(ValueError, match="shape"):
        build(lora=LORA.model_copy(update={"rank": 4}))[1].load_adapter_state_dict(tensors)


def test_reset_lora_is_seeded_and_zeroes_b():
    _, coa, _ = build()
    perturb(coa)
    coa.reset_lora(3)
    first = [p.clone() for p in coa.lora_parameters()]
    coa.reset_lora(3)
    assert all(torch.equal(a, b) for a, b in zip(first, coa.lora_parameters()))
    assert all(torch.count_nonzero(b) == 0 for b in first[1::2])
    bound = max(a.abs().max().item() * a.shape[1] ** 0.5 for a in first[0::2])
    assert 0.9 < bound <= 1.0  # U(−1/√in, 1/√in), peft's kaiming-uniform
    coa.reset_lora(4)
    assert not torch.equal(first[0], coa.lora_parameters()[0])
    assert not torch.equal(first[0], first[14])  # layers of the same shape get different draws


def test_lqlora_init_is_the_rank_r_svd_and_the_residual_completes_w():
    reference, coa, layers = build()
    residuals = coa.init_lqlora(seed=0)
    scaling = LORA.alpha / LORA.rank
    for name in layers:
        w = coa.layers[name].weight.double()
        p, s, qt = torch.linalg.svd(w, full_matrices=False)
        w_r = (p[:, :LORA.rank] * s[:LORA.rank]) @ qt[:LORA.rank]
        product = scaling * coa.layers[name].lora_B.double() @ coa.layers[name].lora_A.double()
        torch.testing.assert_close(product, w_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(residuals[name].double() + product, w, rtol=0, atol=1e-6)
    # Quantizing the residual: at 2 bits the LQ-LoRA model is much closer to full precision than QLoRA's.
    config = Config({n: QuantSpec(2, 8, "fp32", 64, 256) for n in layers}, layers)
    coa.set_residual_base(residuals)
    coa.set_config(config)
    assert torch.equal(coa.layers[name].weight_q, fake_quantize(residuals[name], config[name]))
    with torch.no_grad():
        full = reference(ids()).logits
        lq_error = (coa(ids()).logits - full).norm()
        coa.set_residual_base(None)
        coa.reset_lora(0)
        q_error = (coa(ids()).logits - full).norm()
    assert lq_error < 0.7 * q_error


def test_lqlora_init_with_rank_above_the_matrix_rank_keeps_extra_directions_trainable():
    _, coa, layers = build(lora=LORA.model_copy(update={"rank": 40}))  # k_proj/v_proj have rank ≤ 16
    residuals = coa.init_lqlora(seed=0)
    layer = coa.layers["model.layers.0.self_attn.k_proj"]  # (16, 32): 16 singular values
    assert torch.count_nonzero(layer.lora_B[:, 16:]) == 0 and torch.count_nonzero(layer.lora_A[16:]) > 0
    assert float(residuals["model.layers.0.self_attn.k_proj"].abs().max()) < 1e-5  # full rank captured


# ---------------------------------------------------------------------------------------------------------
# Folding θ into a peft adapter, and the quantized model folder
# ---------------------------------------------------------------------------------------------------------

def save_quantized_model(model, config: Config, out) -> None:
    """The dense quantized model folder of a loaded model, through `coalora adapt --dense`'s functions."""
    weights = {n: model.get_submodule(n).weight.detach() for n in config}
    packed = quantize_weights(weights, config)
    dtype = next(iter(weights.values())).dtype
    write_model_from(model, None, out, dense_weights(packed, dtype), dtype)
    write_quantization_record(out, packed, config)


def fold_adapter(coa: CoAModel, config: Config) -> dict[str, torch.Tensor]:
    """The peft tensors of ``coa``'s adapter under ``config``, through `coalora adapt`'s functions."""
    return fold_config(parse_adapter(coa.adapter_state_dict(), coa_header(coa), LORA.alpha, LORA.dropout), config)

def test_fold_gives_the_same_logits_through_peft_loading(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference, coa, layers = build()
    perturb(coa, theta=0.05)
    config = random_config(layers, seed=5)
    coa.set_config(config)
    u = coa.compute_u()
    assert float((u - torch.eye(LORA.rank)).abs().max()) > 0.05  # θ is far from the identity now
    save_quantized_model(reference, config, tmp_path / "model")
    write_peft_adapter(fold_adapter(coa, config), peft_config(list(layers), LORA.rank, LORA.alpha, LORA.dropout,
                                                              str(tmp_path / "model")), tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == list(layers) and adapter_config["r"] == LORA.rank
    assert (adapter_config["peft_type"], adapter_config["task_type"], adapter_config["bias"]) == \
        ("LORA", "CAUSAL_LM", "none")

    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        want = coa(ids()).logits
        for name in layers:  # the HF folder alone holds W̃
            assert torch.equal(quantized.get_submodule(name).weight, coa.layers[name].weight_q)
        peft_model = PeftModel.from_pretrained(quantized, tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(ids()).logits, want, rtol=1e-4, atol=1e-5)
    folded = fold_adapter(coa, config)
    first = f"base_model.model.{next(iter(layers))}"
    assert set(folded) == {f"base_model.model.{n}.lora_{x}.weight" for n in layers for x in "AB"}
    assert not torch.equal(folded[f"{first}.lora_B.weight"], coa.layers[next(iter(layers))].lora_B)


def test_quantized_folder_holds_the_config_and_the_packed_bits(tmp_path):
    reference, _, layers = build()
    config = random_config(layers, seed=6)
    save_quantized_model(reference, config, tmp_path / "model")
    saved = Config.load(tmp_path / "model" / CONFIG_FILE, layers)
    assert saved.id == config.id and saved.bits == pytest.approx(config.bits)
    packed, config_id = read_packed(tmp_path / "model" / PACKED_FILE)
    assert config_id == config.id and list(packed) == list(layers)
    from safetensors.torch import load_file

    dense = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name in layers:
        assert packed[name].spec == config[name]
        assert torch.equal(packed[name].dequantize(), dense[f"{name}.weight"])
        assert abs(packed[name].nbytes * 8 - storage_bits(config[name], layers[name])) < 16
    assert torch.equal(dense["model.embed_tokens.weight"], reference.model.embed_tokens.weight)  # untouched


def test_the_base_model_is_untouched():
    reference, coa, layers = build()
    perturb(coa, theta=0.05)
    coa.set_config(random_config(layers, seed=8))
    coa.init_lqlora(0)
    before = reference.state_dict()
    for key, value in coa.model.state_dict().items():
        if not key.endswith(("lora_A", "lora_B")):
            assert torch.equal(value, before[key]), key
    assert isinstance(coa.model.get_submodule(next(iter(layers))), CoALoRALinear)


def test_bfloat16_models_hold_w_tilde_in_bfloat16_and_train_adapters_in_float32(tmp_path):
    from safetensors.torch import load_file

    reference, _, layers = build()
    model = copy.deepcopy(reference).to(torch.bfloat16)
    plain = copy.deepcopy(model)  # the base model in bfloat16, before CoAModel wraps its layers
    coa = CoAModel(model, layers, LORA)
    config = random_config(layers, seed=9)
    coa.set_config(config)
    name = next(iter(layers))
    layer = coa.layers[name]
    assert layer.weight_q.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert torch.equal(layer.weight_q, fake_quantize(layer.weight.float(), config[name]).to(torch.bfloat16))
    coa.train()
    perturb(coa)
    coa(ids(), labels=ids()).loss.backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.count_nonzero(layer.lora_A.grad) > 0
    save_quantized_model(plain, config, tmp_path / "model")
    dense = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert dense[f"{name}.weight"].dtype == torch.bfloat16 and torch.equal(dense[f"{name}.weight"], layer.weight_q)
    assert not any(k.endswith(("lora_A", "lora_B")) for k in dense)
