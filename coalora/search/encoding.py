"""The GP's view of a configuration: one number per layer, the layer's bits per parameter, scaled to [0, 1].

A config's spec indices (n_layers,) (``Config.spec_indices``: 432 specs, five fields each) become

    x_i = (bpp(c_i) − bpp_min) / (bpp_max − bpp_min)          x ∈ [0, 1]^L,  L = number of quantized layers

with bpp_min, bpp_max the cheapest and richest of the 432 specs (2.03 and 8.63 bits).

Why this encoding and not the raw index vector (5 categorical numbers per layer):
* f1 is mostly driven by how coarsely each layer is stored; bpp orders specs by exactly that, so f1 is a
  smooth, monotone-ish function of x, which a stationary GP kernel can fit from tens of points; raw
  indices would give 5·L dimensions of unordered categories (140 on the default model).
* bits are LINEAR in x: bits = Σ_i w_i·(bpp_min + (bpp_max − bpp_min)·x_i), w_i = numel_i / Σ numel, so
  the exact second objective is a deterministic function of the same input (:func:`bits_of`) and is never
  modelled.
The price: specs with equal bpp (bf16 vs fp16 second-level scales, same bits) are one point to the GP;
their f1 differences read as observation noise.
"""

from __future__ import annotations

from typing import Sequence

import torch

from coalora.quant import all_specs
from coalora.space import Layers

BPP = torch.tensor([spec.bits_per_param for spec in all_specs()], dtype=torch.float64)  # (432,)
BPP_MIN, BPP_MAX = float(BPP.min()), float(BPP.max())


def encode(indices: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, L) spec indices → (N, L) float64 features in [0, 1] (module docstring)."""
    idx = torch.as_tensor(indices, dtype=torch.int64)
    return (BPP[idx] - BPP_MIN) / (BPP_MAX - BPP_MIN)


def layer_weights(layers: Layers) -> torch.Tensor:
    """(L,) float64: numel_i / Σ numel, in layer order (the weights of the bits average)."""
    numel = torch.tensor([out * inp for out, inp in layers.values()], dtype=torch.float64)
    return numel / numel.sum()


def bits_of(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., L) features → (...) average bits, exactly ``Config.bits`` up to float rounding."""
    return (BPP_MIN + (BPP_MAX - BPP_MIN) * x) @ weights
