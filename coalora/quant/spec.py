"""Quantization specs: one layer's 5-tuple ``(b0, b1, b2, B0, B1)`` (METHOD.md §2).

A spec fixes how one weight matrix is stored:

    b0  ``weight_bits``   bits of each weight's NF code
    b1  ``scale_bits``    bits of each first-level (per block) scale, unsigned integer code
    b2  ``scale2_dtype``  float format of the second-level (per super-block) scale
    B0  ``block0``        weights per first-level block
    B1  ``block1``        first-level scales per second-level block (super-block)

Two storage measures are provided and must not be confused:

* ``QuantSpec.bits_per_param`` is the asymptotic rate ``b0 + b1/B0 + b2/(B0·B1)``, the number the
  paper uses for a configuration's average bits.
* ``storage_bits(spec, shape)`` is the exact count for one concrete matrix, including a partial last
  block/super-block and the per-matrix fp32 offset.
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch

# The allowed values of every field, in the order that defines ``all_specs()``. Declarative on purpose:
# validation, enumeration and error messages all read this one table.
SPEC_FIELDS: dict[str, tuple] = {
    "weight_bits": (2, 3, 4, 8),
    "scale_bits": (2, 3, 4, 8),
    "scale2_dtype": ("bf16", "fp16", "fp32"),
    "block0": (16, 32, 64),
    "block1": (16, 64, 256),
}

# Second-level scale formats: storage bits and the torch dtype used to round a value to the format.
SCALE2_BITS: dict[str, int] = {"bf16": 16, "fp16": 16, "fp32": 32}
SCALE2_TORCH_DTYPE: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

# Bits of the one fp32 offset o = min(s1) stored per matrix.
OFFSET_BITS = 32

_KEY_RE = re.compile(r"^b(\d+)-s(\d+)-(bf16|fp16|fp32)-(\d+)-(\d+)$")


def _check_field(name: str, value: Any) -> Any:
    """Return ``value`` normalised (integral numbers become ``int``) or raise a ValueError naming the field."""
    allowed = SPEC_FIELDS[name]
    if isinstance(allowed[0], int):
        # numpy/torch integers from tables are fine; bools and floats (4.0) are not spec values.
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        value = int(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok or value not in allowed:
        raise ValueError(f"QuantSpec.{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True, order=True)
class QuantSpec:
    """One layer's quantization setting; validated on construction, hashable and ordered.

    Ordering compares the fields as a tuple in declaration order; since "bf16" < "fp16" < "fp32"
    lexicographically, ``sorted(all_specs()) == list(all_specs())``.

    Attributes:
        weight_bits: b0 ∈ {2, 3, 4, 8}.
        scale_bits: b1 ∈ {2, 3, 4, 8}.
        scale2_dtype: b2 ∈ {"bf16", "fp16", "fp32"}.
        block0: B0 ∈ {16, 32, 64}.
        block1: B1 ∈ {16, 64, 256}.
    """

    weight_bits: int
    scale_bits: int
    scale2_dtype: str
    block0: int
    block1: int

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _check_field(f.name, getattr(self, f.name)))

    @property
    def scale2_bits(self) -> int:
        """Storage bits of one second-level scale (16 for bf16/fp16, 32 for fp32)."""
        return SCALE2_BITS[self.scale2_dtype]

    @property
    def scale2_torch_dtype(self) -> torch.dtype:
        """The torch dtype whose rounding defines the second-level scale format."""
        return SCALE2_TORCH_DTYPE[self.scale2_dtype]

    @property
    def bits_per_param(self) -> float:
        """Asymptotic storage rate ``b0 + b1/B0 + b2/(B0·B1)`` in bits per weight.

        This ignores partial blocks and the per-matrix offset; see ``storage_bits`` for the exact count.
        """
        return self.weight_bits + self.scale_bits / self.block0 + self.scale2_bits / (self.block0 * self.block1)

    @property
    def key(self) -> str:
        """Short stable string, e.g. ``"b4-s8-fp32-64-256"``; inverse of ``from_key``."""
        return f"b{self.weight_bits}-s{self.scale_bits}-{self.scale2_dtype}-{self.block0}-{self.block1}"

    @classmethod
    def from_key(cls, key: str) -> "QuantSpec":
        """Parse a ``key`` string; raises ValueError on a malformed key or a disallowed value."""
        m = _KEY_RE.match(key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(
                f"QuantSpec key must look like 'b<weight_bits>-s<scale_bits>-<bf16|fp16|fp32>-<block0>-<block1>' "
                f"(e.g. 'b4-s8-fp32-64-256'), got {key!r}"
            )
        b0, b1, b2, B0, B1 = m.groups()
        return cls(int(b0), int(b1), b2, int(B0), int(B1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with exactly the five field names."""
        return {name: getattr(self, name) for name in SPEC_FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantSpec":
        """Build a spec from ``to_dict()`` output; unknown or missing keys raise a ValueError naming them."""
        if not isinstance(d, Mapping):
            raise ValueError(f"QuantSpec.from_dict expects a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SPEC_FIELDS))
        missing = [name for name in SPEC_FIELDS if name not in d]
        if unknown or missing:
            raise ValueError(
                f"QuantSpec dict has unknown keys {unknown} and missing keys {missing}; "
                f"expected exactly {list(SPEC_FIELDS)}"
            )
        return cls(**{name: d[name] for name in SPEC_FIELDS})

    def __str__(self) -> str:
        return self.key


QLORA_SPEC = QuantSpec(4, 8, "fp32", 64, 256)
"""QLoRA's NF4 with double quantization: 4 + 8/64 + 32/16384 = 4.127 bits per parameter."""

_ALL_SPECS: tuple[QuantSpec, ...] = tuple(QuantSpec(*values) for values in itertools.product(*SPEC_FIELDS.values()))


def all_specs() -> tuple[QuantSpec, ...]:
    """All 432 specs, in ``itertools.product`` order over ``SPEC_FIELDS`` (weight_bits slowest, block1 fastest).

    The order is part of the API: index ``i`` of this tuple is a stable integer id of a spec.
    """
    return _ALL_SPECS


def _numel(shape: Sequence[int]) -> int:
    shape = tuple(shape)
    if len(shape) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in shape):
        raise ValueError(f"shape must be (rows, cols) with positive sizes, got {shape}")
    return int(shape[0]) * int(shape[1])


def block_counts(spec: QuantSpec, numel: int) -> tuple[int, int]:
    """Numbers of (first-level blocks, super-blocks) of ``numel`` weights, partial last ones included.

    n_blocks = ceil(n / B0); n_super = ceil(n_blocks / B1).
    """
    n_blocks = math.ceil(numel / spec.block0)
    return n_blocks, math.ceil(n_blocks / spec.block1)


def storage_bits(spec: QuantSpec, shape: Sequence[int]) -> int:
    """Exact storage of a (rows, cols) matrix quantized with ``spec``, in bits.

    With n = rows·cols:  n·b0 + ceil(n/B0)·b1 + ceil(ceil(n/B0)/B1)·b2 + 32 (the fp32 offset).
    ``spec.bits_per_param`` is the asymptotic rate of this count as n grows.
    """
    n = _numel(shape)
    n_blocks, n_super = block_counts(spec, n)
    return n * spec.weight_bits + n_blocks * spec.scale_bits + n_super * spec.scale2_bits + OFFSET_BITS
