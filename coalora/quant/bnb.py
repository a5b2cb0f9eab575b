"""Optional bitsandbytes backend: classic QLoRA NF4 layers, the reference point of METHOD.md §6.

bitsandbytes is imported lazily inside each function, so ``coalora.quant`` imports without it.
Its NF4 + double quantization at blocksize 64 is our spec (4, 8, fp32, 64, 256) = ``QLORA_SPEC`` in
bits, with one difference in how block scales are stored: bitsandbytes subtracts the MEAN of the block
absmaxes and codes the result with a signed 8-bit dynamic (log-like) code per 256 blocks; we subtract
the MIN and use an unsigned linear 8-bit code. The NF4 levels and the blocks are identical.

CPU trap (ECOSYSTEM.md): on CPUs with avx512_bf16, the first eval-mode forward of a ``Linear4bit`` with
an input that does not require grad repacks its weight IN PLACE into a bf16 inference layout (block
scales rounded to bf16, served by a kernel without autograd). Training afterwards crashes (layers with
a bias) or silently loses the gradient through the layer (measured with bitsandbytes 0.50.2: the input
gradient is None, so everything before the layer stops learning; tests/test_quant_bnb.py shows it).
Every layer built here is guarded, and ``guard_bnb_cpu_repack`` guards a whole model.
"""

from __future__ import annotations

import functools

import torch

NF4_BLOCKSIZE = 64


@functools.lru_cache(maxsize=1)
def bnb_available() -> bool:
    """True when bitsandbytes imports and its 4-bit functions are present."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit  # noqa: F401
        from bitsandbytes.nn import Linear4bit, Params4bit  # noqa: F401
    except Exception:  # ImportError, or a broken native library raising at import
        return False
    return True


def _require_bnb():
    if not bnb_available():
        raise RuntimeError(
            "bitsandbytes is not available; install it (pip install bitsandbytes) to use coalora.quant.bnb"
        )
    import bitsandbytes

    return bitsandbytes


def _is_repacked(layer) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def guard_bnb_cpu_repack(module: torch.nn.Module) -> int:
    """Disable bitsandbytes' in-place CPU bf16 repacking on every ``Linear4bit`` inside ``module``.

    Call it right after loading/building a 4-bit model, before any eval-mode forward.

    Args:
        module: any model (or a single layer).

    Returns:
        How many ``Linear4bit`` layers were guarded (0 when bitsandbytes is not installed: then the model
        cannot hold any).

    Raises:
        RuntimeError: a layer was already repacked (its block scales were rounded to bf16, which cannot be
            undone exactly): rebuild the model and guard it before the first eval forward.
    """
    if not bnb_available():
        return 0
    from bitsandbytes.nn import Linear4bit

    touched = 0
    for name, sub in module.named_modules():
        if not isinstance(sub, Linear4bit):
            continue
        if _is_repacked(sub):
            raise RuntimeError(
                f"Linear4bit {name or '<root>'} was already repacked for CPU inference by an eval-mode forward; "
                "its scales are bf16-rounded now. Rebuild the model and call guard_bnb_cpu_repack before any forward."
            )
        sub.support_avx512bf16_for_cpu = False
        touched += 1
    return touched


def bnb_nf4_linear(linear: torch.nn.Linear, device: torch.device | str | None = None):
    """A ``bitsandbytes.nn.Linear4bit`` holding ``linear`` quantized with NF4 + double quantization.

    Blocksize 64 with compressed (double-quantized) statistics: QLoRA's spec (4, 8, fp32, 64, 256).
    The weight is quantized here (a hand-built Linear4bit only quantizes on ``.to(device)``), the
    compute dtype is the original weight dtype, the bias is copied unquantized, and the CPU repacking
    trap is guarded. The source layer is not modified.

    Args:
        linear: the full-precision layer.
        device: where to put the quantized layer (default: the layer's device).

    Returns:
        bitsandbytes.nn.Linear4bit, frozen weight (requires_grad False), bias trainable as in ``linear``.
    """
    bnb = _require_bnb()
    if not isinstance(linear, torch.nn.Linear):
        raise ValueError(f"bnb_nf4_linear expects a torch.nn.Linear, got {type(linear).__name__}")
    device = linear.weight.device if device is None else torch.device(device)
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",  # no throw-away random init; both parameters are replaced below
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().to("cpu", copy=True),
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        module=layer,
    )
    if linear.bias is not None:
        bias = linear.bias.detach().to("cpu", copy=True)
        layer.bias = torch.nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    layer = layer.to(device)  # Params4bit.to quantizes here
    guard_bnb_cpu_repack(layer)
    return layer


def bnb_nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """Quantize and dequantize ``weight`` with bitsandbytes NF4, double quantization, blocksize 64.

    Args:
        weight: float32/bf16/fp16 tensor on a device bitsandbytes supports.

    Returns:
        The dequantized tensor, same shape, dtype and device.
    """
    _require_bnb()
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(
        weight.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    return dequantize_4bit(packed, state).reshape(weight.shape)
