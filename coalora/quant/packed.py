"""The packed storage format: bit-packed codes plus scales, saveable as safetensors (no pickle).

A ``QuantizedTensor`` holds exactly the pieces of ``coalora.quant.quantizer.QuantParts``:

    weight_codes  uint8 (ceil(n·b0 / 8),)        the n NF codes as a little-endian bit stream of b0 bits each
    scale_codes   uint8 (ceil(n_blocks·b1 / 8),) the first-level scale codes q, b1 bits each
    scale2        b2 dtype (n_super,)            the second-level scales s3 in their own format
    offset        float32 ()                     the per-matrix offset o

so its ``nbytes`` is within 2 bytes of ``storage_bits(spec, shape) / 8`` (each bit stream rounds up to
a whole byte). ``dequantize()`` reads the streams directly (``coalora.quant.dequant``, table lookups, no
unpacked codes); it equals ``dequantize_parts(parts())`` and so ``fake_quantize``, bitwise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .dequant import dequantize_streams
from .quantizer import QuantParts, quantize_parts
from .spec import QuantSpec, block_counts

FORMAT = "coalora.quant.packed/1"
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
_TENSOR_KEYS = ("weight_codes", "scale_codes", "scale2", "offset")


def _layout(bits: int) -> tuple[int, int, torch.dtype]:
    """(codes per group, bytes per group, integer dtype) for packing ``bits``-bit codes.

    A group of g = 8 / gcd(bits, 8) codes fills exactly g·bits / 8 whole bytes (2 bits: 4 codes → 1 byte,
    3 bits: 8 codes → 3 bytes, 4 bits: 2 → 1, 8 bits: 1 → 1); its g·bits-bit value must fit the dtype.
    """
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    g = 8 // math.gcd(bits, 8)
    return g, g * bits // 8, torch.int32 if g * bits <= 31 else torch.int64


def _n_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a little-endian bit stream of ``bits`` bits per code.

    Code i occupies stream bits [i·bits, (i+1)·bits); stream bit j is bit (j mod 8) of byte j // 8.
    Vectorised over groups of g codes that fill whole bytes (see ``_layout``):

        value_t = Σ_j code_{g·t+j} << (bits·j)        # shifted codes occupy disjoint bits: sum == or
        byte_{t·(g·bits/8) + k} = (value_t >> 8k) & 0xFF

    Args:
        codes: (n,) integer tensor with values in [0, 2^bits).
        bits: 1..8.

    Returns:
        (ceil(n·bits / 8),) uint8 on ``codes.device``; the zero bytes that pad the last group are dropped.
    """
    g, per_group, work = _layout(bits)
    n = codes.numel()
    groups = -(-n // g)
    c = codes.reshape(-1).to(work)
    if g == 1:  # 8-bit codes are their own bytes
        return c.to(torch.uint8)
    c = (F.pad(c, (0, groups * g - n)) if groups * g > n else c).view(groups, g)  # (groups, g)
    shifts = torch.arange(g, device=codes.device, dtype=work) * bits  # (g,)
    value = (c << shifts).sum(dim=1, dtype=work)  # (groups,)
    if per_group == 1:  # 1, 2, 4 bits: a group is one byte
        return value.to(torch.uint8)
    byte_shifts = torch.arange(per_group, device=codes.device, dtype=work) * 8  # (per_group,)
    packed = ((value[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).view(-1)  # (groups·per_group,)
    # A slice would share the larger buffer; own storage keeps safetensors (no shared tensors) happy.
    return packed[: _n_bytes(n, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the ``n`` codes of the stream as int32, shape (n,)."""
    g, per_group, work = _layout(bits)
    if packed.dtype != torch.uint8 or packed.numel() != _n_bytes(n, bits):
        raise ValueError(
            f"packed stream must be uint8 with {_n_bytes(n, bits)} bytes for {n} codes of {bits} bits, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    groups = -(-n // g)
    p = packed.reshape(-1).to(work)
    if per_group == 1:  # 1, 2, 4, 8 bits: one byte per group
        value = p  # (groups,)
    else:
        p = F.pad(p, (0, groups * per_group - p.numel())).view(groups, per_group)  # (groups, per_group)
        byte_shifts = torch.arange(per_group, device=packed.device, dtype=work) * 8
        value = (p << byte_shifts).sum(dim=1, dtype=work)  # (groups,)
    if g == 1:
        return value.to(torch.int32)
    shifts = torch.arange(g, device=packed.device, dtype=work) * bits
    codes = (value[:, None] >> shifts) & (2**bits - 1)  # (groups, g)
    return codes.view(-1)[:n].to(torch.int32)


@dataclass(frozen=True, eq=False)  # holds tensors: compare them explicitly
class QuantizedTensor:
    """A weight matrix stored with a QuantSpec: bit-packed codes, scales, offset, shape and spec.

    Attributes:
        weight_codes: uint8 bit stream of the n NF codes (b0 bits each).
        scale_codes: uint8 bit stream of the n_blocks first-level scale codes (b1 bits each).
        scale2: (n_super,) second-level scales in the spec's b2 dtype.
        offset: () float32 per-matrix offset.
        shape: (rows, cols).
        spec: the QuantSpec.
        dtype: dtype ``dequantize()`` returns by default (the original weight's).
    """

    weight_codes: torch.Tensor
    scale_codes: torch.Tensor
    scale2: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, int]
    spec: QuantSpec
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored buffers (codes, scales, offset); header not counted."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def device(self) -> torch.device:
        return self.weight_codes.device

    def parts(self) -> QuantParts:
        """Unpack into the QuantParts that ``quantize_parts`` produced (codes padded to whole blocks)."""
        spec = self.spec
        n_blocks, _ = block_counts(spec, self.numel)
        codes = unpack_bits(self.weight_codes, spec.weight_bits, self.numel)  # (n,)
        pad = n_blocks * spec.block0 - self.numel
        codes = F.pad(codes, (0, pad)) if pad else codes  # padding is dropped on dequantization
        q = unpack_bits(self.scale_codes, spec.scale_bits, n_blocks)  # (n_blocks,)
        return QuantParts(codes, q, self.scale2.to(torch.float32), self.offset, self.shape, spec)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ of shape ``shape`` in ``dtype`` (default: the original weight's dtype); equals ``fake_quantize``."""
        return dequantize_streams(self.weight_codes, self.scale_codes, self.scale2, self.offset, self.spec,
                                  self.shape, self.dtype if dtype is None else dtype)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """A copy with every buffer on ``device``."""
        moved = {k: v.to(device) for k, v in self.state_dict().items()}
        return QuantizedTensor.from_state_dict(moved, self.header())

    def header(self) -> dict[str, Any]:
        """JSON-able description (format, spec, shape, dtype) that goes with ``state_dict()``."""
        return {
            "format": FORMAT,
            "spec": self.spec.to_dict(),
            "shape": list(self.shape),
            "dtype": _DTYPE_NAMES[self.dtype],
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The four buffers as plain tensors (safetensors-ready)."""
        return {k: getattr(self, k) for k in _TENSOR_KEYS}

    def safetensors_metadata(self) -> dict[str, str]:
        """``header()`` as safetensors metadata (string values only)."""
        return {FORMAT: json.dumps(self.header(), sort_keys=True)}

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any] | str) -> "QuantizedTensor":
        """Rebuild from ``state_dict()`` and ``header()`` (or its JSON string / safetensors metadata).

        Raises:
            ValueError: wrong format, missing/extra tensors, or buffers whose sizes do not match the header.
        """
        header = _parse_header(header)
        if header.get("format") != FORMAT:
            raise ValueError(f"QuantizedTensor header format must be {FORMAT!r}, got {header.get('format')!r}")
        if set(tensors) != set(_TENSOR_KEYS):
            raise ValueError(f"QuantizedTensor tensors must be exactly {list(_TENSOR_KEYS)}, got {sorted(tensors)}")
        spec = QuantSpec.from_dict(header["spec"])
        shape = tuple(int(s) for s in header["shape"])
        if header.get("dtype") not in _DTYPES_BY_NAME:
            raise ValueError(
                f"QuantizedTensor header dtype must be one of {list(_DTYPES_BY_NAME)}, got {header.get('dtype')!r}"
            )
        dtype = _DTYPES_BY_NAME[header["dtype"]]
        qt = cls(**{k: tensors[k] for k in _TENSOR_KEYS}, shape=shape, spec=spec, dtype=dtype)
        qt._check_sizes()
        return qt

    def _check_sizes(self) -> None:
        spec, n = self.spec, self.numel
        n_blocks, n_super = block_counts(spec, n)
        expected = {
            "weight_codes": (torch.uint8, _n_bytes(n, spec.weight_bits)),
            "scale_codes": (torch.uint8, _n_bytes(n_blocks, spec.scale_bits)),
            "scale2": (spec.scale2_torch_dtype, n_super),
            "offset": (torch.float32, 1),
        }
        for key, (dtype, numel) in expected.items():
            t = getattr(self, key)
            if t.dtype != dtype or t.numel() != numel:
                raise ValueError(
                    f"QuantizedTensor.{key} must be {dtype} with {numel} elements for spec {spec.key} and shape "
                    f"{self.shape}, got {t.dtype} with {t.numel()}"
                )


def _parse_header(header: Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(header, str):
        header = json.loads(header)
    if isinstance(header, Mapping) and FORMAT in header and isinstance(header[FORMAT], str):
        header = json.loads(header[FORMAT])  # safetensors metadata
    if not isinstance(header, Mapping):
        raise ValueError(f"QuantizedTensor header must be a mapping or JSON string, got {type(header).__name__}")
    return dict(header)


def quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize a 2-D weight with ``spec`` into packed storage (same math as ``fake_quantize``).

    Args:
        weight: (rows, cols) floating tensor, finite; any device (buffers stay on it).
        spec: the QuantSpec.
    """
    parts = quantize_parts(weight, spec)
    return QuantizedTensor(
        weight_codes=pack_bits(parts.codes[: parts.numel], spec.weight_bits),
        scale_codes=pack_bits(parts.q, spec.scale_bits),
        scale2=parts.s3.to(spec.scale2_torch_dtype),  # exact: s3 was already rounded to this format
        offset=parts.offset.reshape(()).clone(),
        shape=parts.shape,
        spec=spec,
        dtype=weight.dtype,
    )
