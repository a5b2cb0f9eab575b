"""NF-k quantization with double-quantized block scales, as pure tensor functions (METHOD.md §2).

The ONE implementation of the scheme. ``quantize_parts`` computes the stored pieces, ``dequantize_parts``
rebuilds the weight from them; ``fake_quantize`` is their composition and the packed format
(``coalora.quant.packed``) stores exactly these pieces, so both paths agree bitwise.

For W of shape (rows, cols), n = rows·cols, spec (b0, b1, b2, B0, B1), m = 2^b1 − 1, all in float32:

    1. w = flatten(W) row-major, zero-padded to n_blocks·B0; blocks of B0, super-blocks of B1 blocks
    2. s1 = max |w| per block                                  # (n_blocks,)
    3. o = min(s1) over the real blocks; s2 = s1 − o ≥ 0        # ()  and (n_blocks,)
    4. s3 = round_b2(max s2 per super-block)                   # (n_super,)
    5. q = clamp(round((s2 / s3)·m), 0, m)  (q = 0 where s3 = 0)
       ŝ1 = (q / m)·s3 + o                                     # (n_blocks,)
    6. code = index of the NF-b0 level nearest to w / ŝ1 (w / ŝ1 := 0 where ŝ1 = 0)
       Ŵ = level[code]·ŝ1, padding dropped, reshaped to (rows, cols)

Choices the METHOD leaves open (**ours**):
    * zero padding of the last block cannot raise its absmax, and padded super-block slots are filled
      with s2 = 0, which cannot raise s3; o is taken over real blocks only (the partial last block IS a
      real block: it holds at least one weight).
    * round_b2 saturates: values beyond the format's largest finite number become that number instead of
      inf (fp16 tops out at 65504), so ŝ1 stays finite. fp16 also flushes s2 spreads below ~6e-8 to 0,
      which then costs accuracy only relative to such tiny scales (those blocks fall back to ŝ1 = o).
    * s2/s3 and q/m are formed before multiplying, so nothing overflows for weights up to ~1e38.
    * ``torch.round`` rounds half to even; nearest-level ties go to the lower level (see nf.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .nf import nearest_level_index, nf_levels
from .spec import QuantSpec, block_counts

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True, eq=False)  # holds tensors: compare them explicitly
class QuantParts:
    """The stored pieces of one quantized matrix (all on the weight's device).

    Attributes:
        codes: (n_blocks·B0,) int32 NF-b0 level indices, row-major, including the padding of the last
            block (padding holds the index of level 0 and is dropped on dequantization).
        q: (n_blocks,) int32 first-level scale codes in 0 … 2^b1 − 1.
        s3: (n_super,) float32 second-level scales, each exactly representable in the spec's b2 format.
        offset: () float32 per-matrix offset o = min(s1).
        shape: (rows, cols) of the original matrix.
        spec: the spec used.
    """

    codes: torch.Tensor
    q: torch.Tensor
    s3: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, int]
    spec: QuantSpec

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def check_weight(weight: torch.Tensor) -> None:
    """Raise ValueError unless ``weight`` is a non-empty 2-D floating tensor (finiteness is checked later)."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (rows, cols), got {weight.dim()}-D with shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight dtype must be one of {_FLOAT_DTYPES}, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")


def _check_finite(s1: torch.Tensor) -> None:
    # aminmax propagates NaN and inf, so the (n_blocks,) block maxima reveal any non-finite weight
    # without a separate pass over all n weights.
    if not bool(torch.isfinite(s1).all()):
        raise ValueError("weight contains NaN or inf; quantization needs finite values")


def round_to_scale2(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round float32 ``x`` (≥ 0) to the spec's b2 format, saturating at its largest finite value."""
    dtype = spec.scale2_torch_dtype
    if dtype == torch.float32:
        return x
    return x.clamp(max=torch.finfo(dtype).max).to(dtype).to(torch.float32)


def block_scales(q: torch.Tensor, s3: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Dequantized first-level scales ŝ1 = (q / m)·s3 + o, m = 2^b1 − 1; shape (n_blocks,) float32."""
    m = float(2**spec.scale_bits - 1)
    s3_per_block = s3.repeat_interleave(spec.block1)[: q.numel()]  # (n_blocks,)
    return (q.to(torch.float32) / m) * s3_per_block + offset


def block_absmax(w: torch.Tensor) -> torch.Tensor:
    """Step 2: s1 = max |w| per block of the padded weights ``w`` (n_blocks, B0); (n_blocks,) float32.

    Raises ValueError when a weight is NaN or inf."""
    lo, hi = torch.aminmax(w, dim=1)  # one pass, no |w| temporary; both propagate NaN
    s1 = torch.maximum(hi, lo.neg())  # (n_blocks,)
    _check_finite(s1)
    return s1


def scale_codes(s1: torch.Tensor, spec: QuantSpec, n_blocks: int, n_super: int):
    """Steps 3–5 from the block maxima s1 (n_blocks,): (q (n_blocks,) int32, s3 (n_super,), offset ())."""
    offset = s1.min()  # () over real blocks only: every row of w is a real block
    s2 = s1 - offset  # (n_blocks,)
    s2_super = F.pad(s2, (0, n_super * spec.block1 - n_blocks)).view(n_super, spec.block1)  # (n_super, B1)
    s3 = round_to_scale2(s2_super.amax(dim=1), spec)  # (n_super,)
    m = float(2**spec.scale_bits - 1)
    zero = torch.zeros((), dtype=torch.float32, device=s1.device)
    ratio = torch.where(s3[:, None] > 0, s2_super / s3[:, None], zero)  # (n_super, B1)
    q = torch.round(ratio.mul_(m)).clamp_(0, m).to(torch.int32).view(-1)[:n_blocks]  # (n_blocks,)
    return q, s3, offset


def _first_level(w: torch.Tensor, spec: QuantSpec, n_blocks: int, n_super: int):
    """Steps 2–5: per-block scale codes from the padded weights ``w`` of shape (n_blocks, B0)."""
    return scale_codes(block_absmax(w), spec, n_blocks, n_super)


def padded_blocks(weight: torch.Tensor, block0: int) -> torch.Tensor:
    """Step 1: flatten(W) row-major in float32, zero-padded to whole blocks; (n_blocks, B0)."""
    n = weight.numel()
    n_blocks = -(-n // block0)
    w = weight.reshape(-1).to(torch.float32)  # (n,) row-major; a copy only when the dtype differs
    pad = n_blocks * block0 - n
    return (F.pad(w, (0, pad)) if pad else w).view(n_blocks, block0)


def safe_divisor(s_hat: torch.Tensor) -> torch.Tensor:
    """ŝ1 where positive, else inf: w / inf = 0 for finite w, so a zero scale gives code of level 0 and
    Ŵ = 0·0 = 0 without a NaN (a block of zeros, or q = 0 with o = 0)."""
    inf = torch.full((), float("inf"), dtype=torch.float32, device=s_hat.device)
    return torch.where(s_hat > 0, s_hat, inf)


def quantize_parts(weight: torch.Tensor, spec: QuantSpec) -> QuantParts:
    """Quantize a 2-D weight with ``spec`` and return the stored pieces (steps 1–6 up to the codes).

    Args:
        weight: (rows, cols) float32/bf16/fp16/fp64, finite, on any device.
        spec: the layer's QuantSpec.

    Returns:
        QuantParts on ``weight.device``.

    Raises:
        ValueError: non-2-D, empty, non-float or non-finite weight.
    """
    check_weight(weight)
    n_blocks, n_super = block_counts(spec, weight.numel())
    w = padded_blocks(weight, spec.block0)  # (n_blocks, B0), never modified
    q, s3, offset = _first_level(w, spec, n_blocks, n_super)
    s_hat = block_scales(q, s3, offset, spec)  # (n_blocks,)
    ratio = w / safe_divisor(s_hat)[:, None]  # (n_blocks, B0)
    codes = nearest_level_index(ratio, spec.weight_bits).view(-1)  # (n_blocks·B0,)
    return QuantParts(codes, q, s3, offset, (int(weight.shape[0]), int(weight.shape[1])), spec)


def dequantize_parts(parts: QuantParts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild Ŵ = level[code]·ŝ1 from the pieces; shape ``parts.shape``, computed in float32, cast to ``dtype``."""
    spec = parts.spec
    n_blocks = parts.q.numel()
    s_hat = block_scales(parts.q, parts.s3, parts.offset, spec)  # (n_blocks,)
    levels = nf_levels(spec.weight_bits, torch.float32, parts.codes.device)
    w_hat = levels.index_select(0, parts.codes).view(n_blocks, spec.block0).mul_(s_hat[:, None])  # (n_blocks, B0)
    return w_hat.view(-1)[: parts.numel].view(parts.shape).to(dtype)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize ``weight`` with ``spec`` (METHOD.md §2, steps 1–6).

    Args:
        weight: (rows, cols) float32/bf16/fp16 (fp64 accepted), finite; any device.
        spec: the layer's QuantSpec.

    Returns:
        Ŵ with the same shape, dtype and device; the math runs in float32 and is cast back once.
    """
    return dequantize_parts(quantize_parts(weight, spec), weight.dtype)


def quantization_error(weight: torch.Tensor, spec: QuantSpec, fisher: torch.Tensor | None = None) -> float:
    """Weighted squared error ‖√F ⊙ (W − Ŵ)‖² = Σ F·(W − Ŵ)²; plain Σ (W − Ŵ)² when ``fisher`` is None.

    The difference is formed in float32 (Ŵ before its cast back to a 16-bit dtype) and summed in float64,
    so cost tables over many specs compare errors, not rounding noise.

    Args:
        weight: (rows, cols) weight.
        spec: the spec to quantize with.
        fisher: optional (rows, cols) non-negative finite weights (an empirical Fisher diagonal).
    """
    if fisher is not None:
        if tuple(fisher.shape) != tuple(weight.shape):
            raise ValueError(f"fisher shape {tuple(fisher.shape)} must equal weight shape {tuple(weight.shape)}")
        if not bool(torch.isfinite(fisher).all()) or bool((fisher < 0).any()):
            raise ValueError("fisher must be finite and non-negative")
    diff = dequantize_parts(quantize_parts(weight, spec), torch.float32).sub_(weight.to(torch.float32))
    sq = diff.square_()
    if fisher is not None:
        sq.mul_(fisher.to(device=sq.device, dtype=torch.float32))
    return float(sq.sum(dtype=torch.float64))
