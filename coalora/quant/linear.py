"""``PackedLinear``: a linear layer that holds only the packed storage of its weight and dequantizes it on the fly.

It is what a deployed model (``coalora adapt``) is built from. Its state is exactly the packed pieces of one
QuantSpec (``coalora.quant.packed``), as buffers:

    weight        uint8 (ceil(n·b0 / 8),)        the n = out·in NF codes, b0 bits each (QuantizedTensor.weight_codes)
    scale_codes   uint8 (ceil(n_blocks·b1 / 8),) the first-level scale codes, b1 bits each
    scale2        int16 / int32 (n_super,)       the bit patterns of the second-level scales (b2 = bf16/fp16: int16,
                                                 fp32: int32)
    offset        int32 ()                       the bit pattern of the float32 offset
    bias          (out,) in the compute dtype, when the layer has one

so ``buffer bytes = storage_bits(spec, (out, in)) / 8`` up to the rounding of each stream to whole bytes. The
float scales are kept as integer bit patterns on purpose: ``model.to(torch.bfloat16)``, ``model.half()`` and
transformers' loader cast every floating tensor of a model, and a bf16 copy of an fp32 scale is a different
scale; integer buffers are never cast, only moved.

forward(x) = x·Ŵᵀ + bias with Ŵ (in x's dtype) bitwise the ``fake_quantize`` of the original weight; on the CPU
Ŵ is dequantized and multiplied a few rows at a time (``packed_linear``), so it never exists whole.

The packed codes are the layer's ``weight``, as bitsandbytes' 4-bit layers keep their packed codes in ``weight``:
code that reads a layer's device reads it there, and — what matters most — a transformers without coalora
refuses a packed folder (a 1-D uint8 ``weight`` where an (out, in) matrix belongs is a size mismatch, an error)
instead of silently building those layers with random weights. It subclasses ``nn.Linear`` (without calling its
``__init__``, which would allocate the dense weight) so that code that dispatches on ``nn.Linear`` — peft's LoRA
layers above all — wraps it as it wraps a linear layer: peft's ``lora.Linear`` calls ``base_layer(x)`` and adds
its own low-rank term; ``compute_dtype`` (bitsandbytes' name, which peft reads) is the float dtype the adapter
should use. Merging an adapter into the weight is not possible (there is no dense weight to merge into).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .dequant import dequantize_streams, packed_linear
from .packed import QuantizedTensor, _n_bytes
from .spec import QuantSpec, block_counts

PACKED_BUFFERS = ("weight", "scale_codes", "scale2", "offset")
BITS_DTYPE = {16: torch.int16, 32: torch.int32}  # integer dtype holding a float of that many bits


def buffer_layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name → (dtype, shape) of each packed buffer of a (out, in) weight stored with ``spec``."""
    n = shape[0] * shape[1]
    n_blocks, n_super = block_counts(spec, n)
    return {
        "weight": (torch.uint8, (_n_bytes(n, spec.weight_bits),)),
        "scale_codes": (torch.uint8, (_n_bytes(n_blocks, spec.scale_bits),)),
        "scale2": (BITS_DTYPE[spec.scale2_bits], (n_super,)),
        "offset": (torch.int32, ()),
    }


def packed_buffers(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """A QuantizedTensor's pieces in ``PackedLinear``'s buffer layout (the float scales as their bit patterns)."""
    return {
        "weight": qt.weight_codes,
        "scale_codes": qt.scale_codes,
        "scale2": qt.scale2.contiguous().view(BITS_DTYPE[qt.spec.scale2_bits]),
        "offset": qt.offset.reshape(()).contiguous().view(torch.int32),
    }


class PackedLinear(nn.Linear):
    """y = x·Ŵᵀ + b with Ŵ dequantized in every forward from packed storage (module docstring).

    Args:
        in_features, out_features: the layer's shape; the weight is (out_features, in_features).
        spec: the QuantSpec its weight is stored with.
        bias: whether the layer has a bias.
        dtype: the compute dtype (of the bias, and what ``compute_dtype`` reports).
        device: where the buffers are allocated (``"meta"`` while transformers builds a model skeleton).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate the dense weight
        self.in_features, self.out_features, self.spec = int(in_features), int(out_features), spec
        self._compute_dtype = dtype
        for name, (buf_dtype, shape) in buffer_layout(spec, self.shape).items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features): the shape of the weight it stands for."""
        return (self.out_features, self.in_features)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype the layer computes in: its bias's, else the one it was built with."""
        return self.bias.dtype if self.bias is not None else self._compute_dtype

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> "PackedLinear":
        """The layer holding ``qt`` (and ``bias``), computing in ``dtype`` (default: ``qt.dtype``)."""
        dtype = qt.dtype if dtype is None else dtype
        layer = cls(qt.shape[1], qt.shape[0], qt.spec, bias=bias is not None, dtype=dtype, device=qt.device)
        for name, t in packed_buffers(qt).items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def quantized(self) -> QuantizedTensor:
        """The QuantizedTensor the buffers hold (float scales viewed back from their bit patterns)."""
        return QuantizedTensor(self.weight, self.scale_codes, self.scale2.view(self.spec.scale2_torch_dtype),
                               self.offset.view(torch.float32), self.shape, self.spec, self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ (out, in) in ``dtype`` (default ``compute_dtype``), bitwise ``fake_quantize`` of the original W."""
        return dequantize_streams(self.weight, self.scale_codes, self.scale2.view(self.spec.scale2_torch_dtype),
                                  self.offset.view(torch.float32), self.spec, self.shape,
                                  self.compute_dtype if dtype is None else dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out) in x's dtype."""
        return packed_linear(x, self.weight, self.scale_codes, self.scale2.view(self.spec.scale2_torch_dtype),
                             self.offset.view(torch.float32), self.spec, self.shape, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"spec={self.spec.key}"
