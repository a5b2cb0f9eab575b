"""Tests of coalora.quant: fake quantization and packing (CPU; CUDA behind a marker). Specs and NF-k levels:
test_quant_spec.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from coalora.quant import (QLORA_SPEC, QuantizedTensor, QuantSpec, all_specs, dequantize_parts, fake_quantize,
                           nf_levels, pack_bits, quantization_error, quantize, quantize_parts, storage_bits, unpack_bits)
from coalora.quant.quantizer import block_scales

SOME_SPECS = [
    QLORA_SPEC,
    QuantSpec(2, 2, "bf16", 16, 16),
    QuantSpec(3, 4, "fp16", 32, 64),
    QuantSpec(8, 3, "fp32", 16, 256),
    QuantSpec(2, 8, "bf16", 64, 64),
    QuantSpec(4, 2, "fp16", 16, 16),
]
ODD_SHAPES = [(1, 1), (7, 13), (3, 1000), (129, 257)]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rel_err(w, w_hat):
    return float((w.double() - w_hat.double()).norm() / w.double().norm())


# ------------------------------------------------------------------------------ fake quantization


def reference_fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Slow, loop-based reading of METHOD.md §2 with no padding at all (partial blocks are short slices)."""
    w = weight.reshape(-1).float()
    blocks = [w[i : i + spec.block0] for i in range(0, w.numel(), spec.block0)]
    s1 = torch.stack([b.abs().max() for b in blocks])
    o = s1.min()
    s2 = s1 - o
    m = float(2**spec.scale_bits - 1)
    levels = nf_levels(spec.weight_bits)
    out = []
    for j in range(0, len(blocks), spec.block1):
        s3 = s2[j : j + spec.block1].max()
        if spec.scale2_dtype != "fp32":
            s3 = s3.to(spec.scale2_torch_dtype).float()
        for i in range(j, min(j + spec.block1, len(blocks))):
            q = torch.clamp(torch.round((s2[i] / s3) * m), 0, m) if s3 > 0 else torch.tensor(0.0)
            s_hat = (q / m) * s3 + o
            x = blocks[i] / s_hat if s_hat > 0 else torch.zeros_like(blocks[i])
            code = (x[:, None] - levels[None, :]).abs().argmin(dim=1)
            out.append(levels[code] * s_hat)
    return torch.cat(out).view(weight.shape)


@pytest.mark.parametrize("shape", ODD_SHAPES + [(64, 64), (10, 160)])
@pytest.mark.parametrize("spec", SOME_SPECS, ids=str)
def test_matches_loop_reference_on_odd_shapes(shape, spec):
    w = randn(*shape, seed=shape[0] * 1000 + shape[1])
    out = fake_quantize(w, spec)
    ref = reference_fake_quantize(w, spec)
    assert out.shape == w.shape and bool(torch.isfinite(out).all())
    # Same math, same order of float32 operations: equal up to a rare tie at a level midpoint.
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)


def test_hand_computed_example():
    """Spec (2, 2, fp32, 16, 16), three blocks of 16 (one super-block), worked by hand from METHOD.md §2.

    s1 = (4, 1, 2.2) → o = 1, s2 = (3, 0, 1.2), s3 = 3, q = round(s2·3/3) = (3, 0, 1),
    ŝ1 = q·3/3 + 1 = (4, 1, 2). NF2 levels (−1, 0, 0.3379, 1), midpoints (−0.5, 0.16895, 0.66895).
    """
    spec = QuantSpec(2, 2, "fp32", 16, 16)
    w = torch.tensor([
        [4, -4, 0, 1, 2, 3, -1, -2.5, 0.5, 0.7, 2.6, -1.9, 0, 0, 0, 0],  # ŝ1 = 4
        [1, 0.1, -0.5, -0.49, 0.3, 0.7, -0.9, 0, 0.2, -0.1, 0.6, 0.68, -1, 0.16, 0.17, 0.05],  # ŝ1 = 1
        [2.2, -1.2, 0.4, 1.0, -0.8, 1.4, 0.3, -2.0, 0, 0.5, 1.3, -1.1, 0.9, 0.33, 0.35, -0.3],  # ŝ1 = 2
    ])
    # Codes by hand: w/ŝ1 against the midpoints. −0.5 in block 1 sits exactly on a midpoint: ties go to
    # the lower level. 2.2/2 = 1.1 lies beyond +1 (ŝ1 < s1 after scale quantization): level +1.
    codes = torch.tensor([
        [3, 0, 1, 2, 2, 3, 1, 0, 1, 2, 2, 1, 1, 1, 1, 1],
        [3, 1, 0, 1, 2, 3, 0, 1, 2, 1, 2, 3, 0, 1, 2, 1],
        [3, 0, 2, 2, 1, 3, 1, 0, 1, 2, 2, 0, 2, 1, 2, 1],
    ])
    scales = torch.tensor([4.0, 1.0, 2.0])
    parts = quantize_parts(w, spec)
    assert parts.q.tolist() == [3, 0, 1]
    assert parts.s3.tolist() == [3.0] and float(parts.offset) == 1.0
    assert parts.codes.view(3, 16).tolist() == codes.tolist()
    expected = nf_levels(2)[codes] * scales[:, None]
    assert torch.equal(fake_quantize(w, spec), expected)
    assert expected[0, 3] == pytest.approx(4 * 0.3379, abs=1e-3) and expected[2, 0] == 2.0


@pytest.mark.parametrize("scale_bits", [2, 3, 4, 8])
def test_error_shrinks_as_weight_bits_grow(scale_bits):
    w = randn(256, 256, seed=1)
    errors = [rel_err(w, fake_quantize(w, QuantSpec(b, scale_bits, "fp32", 64, 256))) for b in (2, 3, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > errors[3] > 0
    if scale_bits == 8:  # with fine scales the error is the NF rounding: NF4 ≈ 0.09, NF8 ≈ 0.005 on Gaussians
        assert errors[2] < 0.1 and errors[3] < 0.01


def test_error_shrinks_as_scale_bits_grow():
    w = randn(256, 256, seed=2) * torch.rand(256, 1, generator=torch.Generator().manual_seed(3))
    errors = [rel_err(w, fake_quantize(w, QuantSpec(8, b1, "fp32", 64, 256))) for b1 in (2, 3, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > errors[3]


@pytest.mark.parametrize("spec", all_specs()[::37], ids=str)
def test_scale_quantization_error_bound(spec):
    """|ŝ1 − s1| ≤ s3/(2m) + |max s2 − s3|: half a code step, plus the b2 rounding of s3 (0 for fp32)."""
    w = randn(37, 300, seed=4) * torch.rand(37, 1, generator=torch.Generator().manual_seed(5))
    parts = quantize_parts(w, spec)
    n_blocks = parts.q.numel()
    flat = torch.nn.functional.pad(w.reshape(-1), (0, n_blocks * spec.block0 - w.numel()))
    s1 = flat.view(n_blocks, spec.block0).abs().amax(1)
    assert float(parts.offset) == float(s1.min())
    s2 = torch.nn.functional.pad(s1 - parts.offset, (0, parts.s3.numel() * spec.block1 - n_blocks))
    s3_exact = s2.view(-1, spec.block1).amax(1)
    assert torch.equal(parts.s3, parts.s3.to(spec.scale2_torch_dtype).float())  # representable in b2
    if spec.scale2_dtype == "fp32":
        assert torch.equal(parts.s3, s3_exact)
    m = 2**spec.scale_bits - 1
    assert int(parts.q.min()) >= 0 and int(parts.q.max()) <= m
    assert int(parts.codes.min()) >= 0 and int(parts.codes.max()) < 2**spec.weight_bits
    slack = (parts.s3 / (2 * m) + (s3_exact - parts.s3).abs()).repeat_interleave(spec.block1)[:n_blocks]
    s_hat = block_scales(parts.q, parts.s3, parts.offset, spec)
    assert bool(((s_hat - s1).abs() <= slack * (1 + 1e-5) + 1e-6 * s1).all())


@pytest.mark.parametrize("spec", SOME_SPECS, ids=str)
def test_zero_matrix_and_zero_blocks(spec):
    z = torch.zeros(5, 100)
    assert torch.equal(fake_quantize(z, spec), z)
    w = randn(4, 256, seed=6)
    w[1] = 0  # whole blocks of zeros: o = 0, and those blocks must come back as exact zeros
    out = fake_quantize(w, spec)
    assert bool(torch.isfinite(out).all()) and bool((out[1] == 0).all())
    assert rel_err(w, out) < rel_err(w, torch.zeros_like(w))


@pytest.mark.parametrize("spec", SOME_SPECS, ids=str)
def test_blocks_with_one_absmax_are_exact(spec):
    """Every block holds values in {−a, 0, +a} with the same absmax a: s2 = 0, s3 = 0, q = 0, ŝ1 = o = a,
    and −1, 0, +1 are NF levels, so the matrix is exactly representable."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randint(-1, 2, (33, 64), generator=g) * 0.37).float()
    w.view(-1)[:: spec.block0] = 0.37  # make sure every block reaches the absmax
    out = fake_quantize(w, spec)
    assert torch.equal(out, w)


def test_blocks_with_representable_scales_are_exact():
    """Block absmaxes 1, 2, 3, 4 with b1 = 2: o = 1, s2 ∈ {0, 1, 2, 3} = s3·q/3 exactly."""
    spec = QuantSpec(3, 2, "fp32", 16, 16)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(4)  # 16 blocks, one super-block
    signs = torch.tensor([1.0, -1.0, 0.0, 1.0]).repeat(4)
    w = (a[:, None] * signs[None, :]).reshape(4, 64)
    assert torch.equal(fake_quantize(w, spec), w)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
@pytest.mark.parametrize(
    "spec", [QLORA_SPEC, QuantSpec(3, 4, "bf16", 32, 64), QuantSpec(2, 8, "fp32", 16, 16)], ids=str
)
def test_tiny_and_huge_magnitudes_stay_accurate(magnitude, spec):
    w = randn(64, 96, seed=8)
    out = fake_quantize(w * magnitude, spec)
    assert bool(torch.isfinite(out).all())
    assert rel_err(w * magnitude, out) == pytest.approx(rel_err(w, fake_quantize(w, spec)), rel=0.02)


@pytest.mark.parametrize("magnitude", [1e-30, 1e6, 1e30])
def test_fp16_second_level_saturates_instead_of_overflowing(magnitude):
    """fp16 cannot hold s3 beyond 65504 (or below ~6e-8): the result stays finite and within ±max|W|."""
    w = randn(64, 96, seed=9) * torch.rand(64, 1, generator=torch.Generator().manual_seed(10)) * magnitude
    spec = QuantSpec(4, 8, "fp16", 64, 16)
    out = fake_quantize(w, spec)
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) <= float(w.abs().max()) * (1 + 1e-6)
    parts = quantize_parts(w, spec)
    assert float(parts.s3.max()) <= 65504.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_are_rejected(bad, dtype):
    w = randn(8, 40, dtype=dtype)
    w[3, 17] = bad
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        fake_quantize(w, QLORA_SPEC)
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        quantize(w, QLORA_SPEC)


@pytest.mark.parametrize(
    "weight, match",
    [(torch.randn(10), "2-D"), (torch.randn(2, 3, 4), "2-D"), (torch.zeros(0, 5), "empty"),
     (torch.ones(3, 3, dtype=torch.int32), "dtype")],
)
def test_bad_weights_are_rejected(weight, match):
    with pytest.raises(ValueError, match=match):
        fake_quantize(weight, QLORA_SPEC)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_shape_device_preserved(dtype):
    w = randn(17, 70, seed=11, dtype=dtype)
    out = fake_quantize(w, QLORA_SPEC)
    assert out.dtype == dtype and out.shape == w.shape and out.device == w.device
    # A 16-bit input is quantized exactly like its float32 copy; the result is cast back once.
    assert torch.equal(out, fake_quantize(w.float(), QLORA_SPEC).to(dtype))
    assert quantize(w, QLORA_SPEC).dequantize().dtype == dtype


def test_input_is_not_modified_and_non_contiguous_is_row_major():
    w = randn(40, 64, seed=12)
    before = w.clone()
    fake_quantize(w, QLORA_SPEC)
    assert torch.equal(w, before)
    wt = w.t()  # non-contiguous: its row-major flattening differs from w's memory order
    assert torch.equal(fake_quantize(wt, QLORA_SPEC), fake_quantize(wt.contiguous(), QLORA_SPEC))


def test_quantization_error_plain_and_weighted():
    w = randn(33, 50, seed=13)
    spec = QuantSpec(3, 4, "bf16", 32, 64)
    diff2 = (w.double() - fake_quantize(w, spec).double()) ** 2
    assert quantization_error(w, spec) == pytest.approx(float(diff2.sum()), rel=1e-6)
    fisher = torch.rand(33, 50, generator=torch.Generator().manual_seed(14))
    fisher[:10] = 0  # rows with no Fisher mass do not count
    assert quantization_error(w, spec, fisher) == pytest.approx(float((fisher.double() * diff2).sum()), rel=1e-6)
    assert quantization_error(w, spec, torch.full_like(w, 2.0)) == pytest.approx(2 * quantization_error(w, spec))
    with pytest.raises(ValueError, match="fisher shape"):
        quantization_error(w, spec, fisher.t())
    with pytest.raises(ValueError, match="non-negative"):
        quantization_error(w, spec, -fisher)


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_is_a_little_endian_bit_stream(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 5, 8, 9, 24, 101):
        codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int32)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        stream = [(int(c) >> i) & 1 for c in codes for i in range(bits)]
        stream += [0] * (-len(stream) % 8)
        assert packed.tolist() == [sum(stream[8 * k + i] << i for i in range(8)) for k in range(len(stream) // 8)]
        assert torch.equal(unpack_bits(packed, bits, n), codes)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), bits, 100)


@pytest.mark.parametrize("shape", ODD_SHAPES + [(256, 320)])
@pytest.mark.parametrize("spec", SOME_SPECS + [QuantSpec(b, 3, "bf16", 32, 16) for b in (2, 3, 4, 8)], ids=str)
def test_packed_round_trip_equals_fake_quantize_bitwise(shape, spec):
    w = randn(*shape, seed=15)
    qt = quantize(w, spec)
    assert torch.equal(qt.dequantize(), fake_quantize(w, spec))
    assert qt.weight_codes.dtype == torch.uint8 and qt.scale2.dtype == spec.scale2_torch_dtype
    exact = storage_bits(spec, shape) / 8
    assert exact <= qt.nbytes < exact + 2  # two bit streams, each rounded up to a whole byte


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_size_approaches_bits_per_param(bits):
    spec = QuantSpec(bits, 8, "fp32", 64, 256)
    qt = quantize(randn(512, 1024, seed=16), spec)
    assert qt.weight_codes.numel() == 512 * 1024 * bits // 8  # 3-bit codes take 3 bits
    assert qt.nbytes == pytest.approx(spec.bits_per_param * 512 * 1024 / 8, rel=1e-4)


def test_packed_save_and_load_with_safetensors(tmp_path):
    w = randn(129, 257, seed=17, dtype=torch.bfloat16)
    spec = QuantSpec(3, 4, "bf16", 32, 64)
    qt = quantize(w, spec)
    path = tmp_path / "layer.safetensors"
    save_file(qt.state_dict(), str(path), metadata=qt.safetensors_metadata())
    with open(path, "rb") as f:  # the header is plain JSON inside the safetensors header
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len))["__metadata__"]
    loaded = QuantizedTensor.from_state_dict(load_file(str(path)), meta)
    assert loaded.spec == spec and loaded.shape == (129, 257) and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.dequantize(), fake_quantize(w, spec))
    assert QuantizedTensor.from_state_dict(qt.state_dict(), json.dumps(qt.header())).nbytes == qt.nbytes


def test_from_state_dict_rejects_corrupt_input():
    qt = quantize(randn(10, 70, seed=18), QLORA_SPEC)
    tensors, header = qt.state_dict(), qt.header()
    with pytest.raises(ValueError, match="weight_codes"):
        QuantizedTensor.from_state_dict(tensors | {"weight_codes": tensors["weight_codes"][:-1]}, header)
    with pytest.raises(ValueError, match="format"):
        QuantizedTensor.from_state_dict(tensors, header | {"format": "other/1"})
    with pytest.raises(ValueError, match="missing keys"):
        QuantizedTensor.from_state_dict(tensors, header | {"spec": {"weight_bits": 4}})
    with pytest.raises(ValueError, match="tensors must be exactly"):
        QuantizedTensor.from_state_dict({k: v for k, v in tensors.items() if k != "offset"}, header)


def test_dequantize_parts_is_the_shared_path():
    w = randn(21, 45, seed=19)
    spec = QuantSpec(3, 3, "fp16", 16, 16)
    parts = quantize(w, spec).parts()
    assert torch.equal(parts.codes[: w.numel()], quantize_parts(w, spec).codes[: w.numel()])
    assert torch.equal(dequantize_parts(parts, torch.float16), fake_quantize(w, spec).half())


# --------------------------------------------------------------------------------- import and CUDA


def test_import_without_bitsandbytes():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None  # makes `import bitsandbytes` raise ImportError
        import torch, coalora.quant as q
        assert not q.bnb_available()
        assert q.guard_bnb_cpu_repack(torch.nn.Linear(4, 4)) == 0
        try:
            q.bnb_nf4_roundtrip(torch.zeros(4, 64))
        except RuntimeError as e:
            assert "bitsandbytes is not available" in str(e)
        else:
            raise AssertionError("expected RuntimeError")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", SOME_SPECS, ids=str)
def test_cuda_matches_cpu_bitwise(spec):
    w = randn(129, 257, seed=20)
    cpu = fake_quantize(w, spec)
    gpu = fake_quantize(w.cuda(), spec)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
    qt = quantize(w.cuda(), spec)
    assert qt.device.type == "cuda" and torch.equal(qt.dequantize().cpu(), cpu)
    assert torch.equal(qt.to("cpu").dequantize(), cpu)
