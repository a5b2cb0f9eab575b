"""Tests of the optional bitsandbytes backend (coalora.quant.bnb) and of our NF4 against bitsandbytes'."""

from __future__ import annotations

import pytest
import torch

from coalora.quant import (
    QLORA_SPEC,
    bnb_available,
    bnb_nf4_linear,
    bnb_nf4_roundtrip,
    fake_quantize,
    guard_bnb_cpu_repack,
    nf_levels,
    nf_midpoints,
    quantize_parts,
)
from coalora.quant.quantizer import block_scales

pytestmark = pytest.mark.skipif(not bnb_available(), reason="bitsandbytes is not installed or cannot load")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bnb_pieces(w: torch.Tensor):
    """bitsandbytes' NF4 round trip of ``w`` plus its dequantized block scales, shape (n_blocks,)."""
    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise, quantize_4bit

    packed, state = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    scales = dequantize_blockwise(state.absmax, state.state2) + state.offset
    return dequantize_4bit(packed, state), scales


def cpu_has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def test_nf4_levels_equal_bitsandbytes_table():
    from bitsandbytes.functional import get_4bit_type

    table = get_4bit_type("nf4", device="cpu").float()
    assert torch.allclose(nf_levels(4), table, rtol=0, atol=1e-6)


def test_roundtrip_wrapper_equals_bitsandbytes():
    w = randn(96, 128, seed=1)
    assert torch.equal(bnb_nf4_roundtrip(w), bnb_pieces(w)[0])
    assert bnb_nf4_roundtrip(w.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("rows_scaled", [False, True], ids=["iid", "row-scales"])
def test_ours_vs_bitsandbytes_differ_only_through_block_scales(rows_scaled):
    """Ours with QLORA_SPEC and bitsandbytes NF4 share the levels, the row-major blocks of 64 and the bits;
    they differ in (i) how block scales are quantized and (ii) which scale picks the codes: bitsandbytes
    codes w / s1 (exact absmax) then multiplies by its quantized scale; we code w / ŝ1 (METHOD step 6).

    Check 1 (mechanism, exact): bitsandbytes' output = ℓ(w / s1)·ŝb, with ℓ our nearest NF4 level and ŝb
    bitsandbytes' own dequantized scales. This pins levels, block layout and nearest-level rule.

    Check 2 (bound). With x = w/s1 and ε = (ŝ1 − s1)/s1 our relative scale error, our code differs from
    bitsandbytes' only where a level midpoint μ lies between x and x/(1+ε), i.e. |x − μ| ≲ |μ·ε|: to first
    order a fraction f(μ)·|μ|·|ε| of the weights (f the density of x), each off by one level gap g_μ·s1.
    Where codes agree the values differ by ℓ·(ŝ1 − ŝb). So, to first order,

        ‖W_ours − W_bnb‖² ≈ n·E[s1²|ε|]·Σ_μ f(μ)|μ|g_μ² + Σ_w ℓ(x)²(ŝ1 − ŝb)².

    We evaluate this prediction from the data and require the measured difference to stay within 1.3×
    of it (it matches within ~5% on these matrices; 1.3 leaves room for the first-order approximation
    and the density estimate). Both scale errors are small (8-bit codes), so the prediction is itself
    ≈ 0.2–0.27 of our quantization error: a transposed or shifted block layout, other levels or another
    rounding rule give a difference of the order of the error itself and fail. Finally both methods have
    the same error within 1%.
    """
    w = randn(512, 512, seed=2)
    if rows_scaled:  # rows of different magnitude: scales vary a lot within a super-block
        w = w * torch.rand(512, 1, generator=torch.Generator().manual_seed(3)) * 3
    levels, mids = nf_levels(4), nf_midpoints(4)
    w_bnb, s_bnb = bnb_pieces(w)
    blocks = w.view(-1, 64)  # (n_blocks, 64)
    s1 = blocks.abs().amax(dim=1)  # (n_blocks,)
    x = blocks / s1[:, None]
    ell = levels[torch.bucketize(x, mids)]  # (n_blocks, 64)
    # Check 1: bitsandbytes multiplies 1/s1 instead of dividing: allow a couple of ulps.
    assert torch.allclose((ell * s_bnb[:, None]).view_as(w), w_bnb, rtol=2e-6, atol=1e-7)

    parts = quantize_parts(w, QLORA_SPEC)
    s_ours = block_scales(parts.q, parts.s3, parts.offset, QLORA_SPEC)
    w_ours = fake_quantize(w, QLORA_SPEC)
    eps = (s_ours - s1).abs() / s1
    h = 0.01  # density of x at each midpoint from a window of ±h
    density = torch.stack([((x - mu).abs() < h).float().mean() / (2 * h) for mu in mids])
    flips = w.numel() * (s1.square() * eps).mean() * (density * mids.abs() * (levels[1:] - levels[:-1]).square()).sum()
    rescale = (ell * (s_ours - s_bnb)[:, None]).square().sum()
    predicted = float((flips + rescale).sqrt())
    err_ours, err_bnb = float((w - w_ours).norm()), float((w - w_bnb).norm())
    diff = float((w_ours - w_bnb).norm())
    assert predicted < 0.3 * err_ours
    assert diff <= 1.3 * predicted
    assert err_ours == pytest.approx(err_bnb, rel=0.01)
    # The bound is tight enough to catch a layout error: blocks running down columns instead of rows.
    w_transposed_blocks = fake_quantize(w.t().contiguous(), QLORA_SPEC).t()
    assert float((w_transposed_blocks - w_bnb).norm()) > 2 * predicted


def test_nf4_linear_matches_bitsandbytes_roundtrip():
    torch.manual_seed(4)
    linear = torch.nn.Linear(128, 64)
    before = linear.weight.detach().clone()
    layer = bnb_nf4_linear(linear)
    import bitsandbytes as bnb

    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_type == "nf4" and layer.weight.blocksize == 64 and layer.weight.bnb_quantized
    assert layer.weight.quant_state.nested  # double quantization (compress_statistics)
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    assert layer.support_avx512bf16_for_cpu is False
    assert torch.equal(linear.weight, before)
    x = randn(5, 128, seed=5)
    expected = torch.nn.functional.linear(x, bnb_nf4_roundtrip(linear.weight.detach()), linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        bnb_nf4_linear(torch.nn.Conv1d(2, 2, 1))


def test_guard_counts_linear4bit_layers():
    import bitsandbytes as bnb

    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(64, 64, quant_type="nf4"), torch.nn.ReLU(), torch.nn.Linear(64, 64),
        torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4")),
    )
    assert guard_bnb_cpu_repack(model) == 2
    assert all(m.support_avx512bf16_for_cpu is False for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert guard_bnb_cpu_repack(torch.nn.Linear(3, 3)) == 0


def _grads(layer, x):
    layer.train()
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    (layer(x) * torch.arange(x.shape[0] * layer.out_features).view(x.shape[0], -1)).sum().backward()
    return x.grad, None if layer.bias is None else layer.bias.grad


def test_guarded_layer_trains_the_same_after_an_eval_forward():
    torch.manual_seed(6)
    layer = bnb_nf4_linear(torch.nn.Linear(128, 64))  # guarded on construction
    x = randn(4, 128, seed=7)
    before = _grads(layer, x)
    weight_before = layer.weight.data.clone()
    layer.eval()
    with torch.no_grad():
        layer(x)  # the eval forward that would repack an unguarded layer on an avx512_bf16 CPU
    assert torch.equal(layer.weight.data, weight_before)
    after = _grads(layer, x)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


@pytest.mark.skipif(not bnb_available() or not cpu_has_avx512bf16(), reason="the repack trap needs an avx512_bf16 CPU")
def test_unguarded_layer_is_repacked_and_guard_refuses_it():
    """Shows the trap is real on this CPU (so the guard matters), and that a repacked layer is refused.

    Without a bias the later training step runs, but no gradient flows through the repacked weight:
    the input gradient is silently lost, so every layer before it stops learning (with a bias it crashes
    instead, inside bitsandbytes)."""
    torch.manual_seed(8)
    layer = bnb_nf4_linear(torch.nn.Linear(128, 64, bias=False))
    layer.support_avx512bf16_for_cpu = True  # undo the guard
    x = randn(4, 128, seed=9)
    before = _grads(layer, x)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    with pytest.raises(RuntimeError, match="already repacked"):
        guard_bnb_cpu_repack(torch.nn.Sequential(layer))
    assert before[0] is not None and float(before[0].abs().sum()) > 0
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        after = _grads(layer, x)
    assert after[0] is None  # the silently lost gradient the guard prevents
