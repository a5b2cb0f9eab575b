"""One matrix under many specs at once: the work specs share, done once (METHOD.md §2, §5 cost table).

``quantize_parts`` runs steps 1–6 for one spec. Across the 432 specs most of those steps repeat:

    step                          depends on                 distinct per matrix
    1–2  blocks, absmax s1        B0                         3
    3–5  offset, s3, q → ŝ1       B0, b1, b2, B1             108 ("scale combos", 36 per B0)
    6    w / ŝ1 and its grid cell B0, b1, b2, B1             108, shared by the four b0
    6    nearest level, Ŵ, error  every field                432

so this module computes each row of that table once, calling the functions of ``quantizer.py`` for steps
1–5 (the one implementation) and ``nf.grid_level_value`` for step 6, whose levels equal those of
``nearest_level_index`` (tested). Per weight, the float32 numbers are the ones ``quantization_error``
forms; only the float64 sums run in another order.

    SCALE_COMBOS       the (b1, b2, B1) triples, in ``all_specs`` order
    scale_sets         ŝ1 of several combos for one B0, from one s1                 (S, n_blocks)
    block_error_sums   Σ_blocks F ⊙ (W − Ŵ)² for every (b0, weighting, combo)        (b, K, S)
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from .quantizer import block_scales, safe_divisor, scale_codes
from .nf import grid_cell, grid_level_value
from .spec import SPEC_FIELDS, QuantSpec, block_counts

ScaleCombo = tuple[int, str, int]  # (b1, b2, B1): with B0 it fixes ŝ1; b0 is chosen afterwards
SCALE_COMBOS: tuple[ScaleCombo, ...] = tuple(itertools.product(
    SPEC_FIELDS["scale_bits"], SPEC_FIELDS["scale2_dtype"], SPEC_FIELDS["block1"]))


def combo_spec(b0: int, combo: ScaleCombo, block0: int) -> QuantSpec:
    """The spec (b0, b1, b2, B0, B1) of a weight-bit count, a scale combo and a block size."""
    b1, b2, block1 = combo
    return QuantSpec(b0, b1, b2, block0, block1)


def scale_sets(s1: torch.Tensor, block0: int, numel: int, combos: Sequence[ScaleCombo]) -> torch.Tensor:
    """Steps 3–5 for several scale combos from one block absmax: the dequantized scales ŝ1.

        ŝ1[j] = (q_j / (2^b1 − 1))·s3_j + o,   q_j, s3_j, o from ``scale_codes(s1, spec_j)``

    Args:
        s1: (n_blocks,) float32 block absmax of the matrix for block size ``block0`` (``block_absmax``).
        block0: B0.
        numel: weights in the matrix (fixes n_blocks and the super-block count of each combo).
        combos: S (b1, b2, B1) triples.

    Returns:
        (S, n_blocks) float32, row j bitwise equal to ``block_scales`` of ``quantize_parts`` under combo j
        (the NF bits do not enter steps 3–5, so any b0 gives the same row).
    """
    rows = []
    for combo in combos:
        spec = combo_spec(SPEC_FIELDS["weight_bits"][0], combo, block0)
        n_blocks, n_super = block_counts(spec, numel)
        q, s3, offset = scale_codes(s1, spec, n_blocks, n_super)
        rows.append(block_scales(q, s3, offset, spec))
    return torch.stack(rows)


def block_error_sums(w: torch.Tensor, weightings: Sequence[torch.Tensor | None], s_hat: torch.Tensor,
                     bits: Sequence[int]) -> torch.Tensor:
    """Σ over the given blocks of F ⊙ (W − Ŵ)² for every NF bit count, weighting and scale combo.

        r = w / ŝ1,   Ŵ = level_b0(r)·ŝ1,   e = (Ŵ − w)²,   sum[b, k, j] = Σ_blocks Σ_B0 F_k ⊙ e

    with level_b0(r) the nearest NF-b0 level (``grid_level_value``) and w / ŝ1 := 0 where ŝ1 = 0
    (``safe_divisor``), exactly as ``quantize_parts``/``dequantize_parts`` do; the grid cell of r is
    found once for the four b0. Padding (w = 0) quantizes to 0 and adds nothing.

    Args:
        w: (nb, B0) float32 zero-padded weight blocks (``padded_blocks``), any subset of a matrix's blocks.
        weightings: K tensors (nb, B0) float32 (the same blocks of F), or None for F = 1.
        s_hat: (S, nb) float32 ŝ1 of these blocks under each of S combos (``scale_sets``).
        bits: the b0 values wanted.

    Returns:
        (len(bits), K, S) float64.
    """
    s = s_hat[:, :, None]  # (S, nb, 1)
    r = w / safe_divisor(s_hat)[:, :, None]  # (S, nb, B0)
    cell = grid_cell(r)  # (S, nb, B0) int32, shared by every b0
    out = torch.empty(len(bits), len(weightings), s_hat.shape[0], dtype=torch.float64, device=w.device)
    for b, k in enumerate(bits):
        e = grid_level_value(r, cell, k).mul_(s).sub_(w).square_()  # (S, nb, B0) (Ŵ − w)², float32
        for i, f in enumerate(weightings):
            out[b, i] = (e if f is None else e * f).sum(dim=(1, 2), dtype=torch.float64)
    return out

