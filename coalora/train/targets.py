"""The training pool and the target set every method is trained for.

The pool is the allocate stage's ``pool/<id>.json`` configs, in (bits, id) order. The **target set** holds,
for each value of ``train.target_bits``, the pool config whose bits are nearest to it (ties to the lower
bits); the same configs for every method, so methods are compared at identical per-layer configurations
(METHOD.md §6).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from coalora.errors import ArtifactError, UserError
from coalora.space import Config, Layers

FIELD = "train.target_bits"
POOL, UNSEEN = "pool", "unseen"  # the allocate stage's folders


def load_pool(allocate_dir: Path, layers: Layers, which: str = POOL) -> list[Config]:
    """The pool (or, ``which="unseen"``, the unseen) configs of an allocate stage output, validated against
    the model's layers, in (bits, id) order.

    Raises:
        ArtifactError: the folder holds no config.
        UserError: a config file that does not fit the model (naming the file).
    """
    paths = sorted((Path(allocate_dir) / which).glob("*.json"))
    if not paths:
        raise ArtifactError(f"{allocate_dir}/{which} holds no configs; run `coalora stage allocate`")
    return sorted((Config.load(path, layers) for path in paths), key=lambda c: (c.bits, c.id))


def bits_range(pool: Sequence[Config]) -> tuple[float, float]:
    """The pool's bits range rounded outward to 0.01 (a target just outside the exact range is fine)."""
    bits = [c.bits for c in pool]
    return math.floor(min(bits) * 100) / 100, math.ceil(max(bits) * 100) / 100


def target_set(pool: Sequence[Config], target_bits: Sequence[float]) -> list[Config]:
    """The pool config nearest to each target, in the order of ``target_bits``.

    Raises:
        UserError: naming ``train.target_bits`` when a target lies outside the pool's bits range, or when
            two targets select the same pool config (the pool is too coarse for them).
    """
    low, high = bits_range(pool)
    outside = [b for b in target_bits if not low <= b <= high]
    if outside:
        raise UserError(f"{FIELD}: {outside} outside the pool's bits range [{low}, {high}]; choose targets "
                        f"inside it (or widen allocate.budget_min/budget_max)")
    chosen: dict[str, float] = {}
    targets = []
    for bits in target_bits:
        config = min(pool, key=lambda c: (abs(c.bits - bits), c.bits))
        if config.id in chosen:
            raise UserError(f"{FIELD}: {chosen[config.id]} and {bits} both select pool config {config.id} "
                            f"({config.bits:.3f} bits); the pool's configs are at "
                            f"{[round(c.bits, 3) for c in pool]} bits: choose targets nearer distinct ones "
                            f"(or raise allocate.grid_size)")
        chosen[config.id] = bits
        targets.append(config)
    return targets
