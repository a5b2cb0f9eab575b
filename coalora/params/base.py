"""The base of every params section, and the bits range every budget must lie in."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every section: unknown keys and silent type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# The cheapest and richest specs' bits per parameter: 2 + 2/64 + 16/(64·256) and 8 + 8/16 + 32/(16·16).
MIN_BITS, MAX_BITS = 2.0322265625, 8.625


def distinct_bits(bits: list[float]) -> list[float]:
    """Average-bits values: each within the feasible range of any config, none repeated."""
    bad = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
    if bad:
        raise ValueError(f"{bad} out of range; allowed: {MIN_BITS} to {MAX_BITS} bits")
    if len(set(bits)) != len(bits):
        raise ValueError(f"{bits} repeats a value; each must be distinct")
    return bits
