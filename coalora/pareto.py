"""Pareto fronts of (bits, metric) points: dominance, hypervolume, and the segmented pool rule (METHOD.md §5, §7).

Every objective is MINIMISED: a point is ``(f2, f1)`` = (average bits, loss or 1 − accuracy), after whatever
normalisation the caller applies (``normalise``: bits/8 and the metric as is, by default).

    p dominates q  ⇔  p ≤ q in every objective and p < q in at least one
    HV(P; r) = area of ⋃_{p ∈ P, p ≤ r} [p₁, r₁] × [p₂, r₂]        (2-D, r the reference point)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_points(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """(N, 2) float64 array; an empty input gives shape (0, 2)."""
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(arr).all():
        raise ValueError("pareto: points must be finite (got NaN or inf)")
    return arr


def non_dominated(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Mask (N,) of the points no other point dominates. Duplicates of a non-dominated point all stay."""
    p = _as_points(points)
    le = (p[:, None, :] <= p[None, :, :]).all(-1)  # le[i, j]: i ≤ j everywhere
    lt = (p[:, None, :] < p[None, :, :]).any(-1)   # lt[i, j]: i < j somewhere
    dominated = (le & lt).any(0)                   # some i dominates j
    return ~dominated


def hypervolume(points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float]) -> float:
    """The 2-D hypervolume dominated by ``points`` and bounded by ``reference`` (minimisation).

    Points not strictly better than the reference in both objectives add nothing. Sweep: sort the front by
    the first objective; each point adds the rectangle from it to the next point's first objective (or the
    reference), up to the reference in the second objective.
    """
    p = _as_points(points)
    r = np.asarray(reference, dtype=np.float64)
    p = p[(p < r).all(1)]
    if len(p) == 0:
        return 0.0
    front = p[non_dominated(p)]
    front = front[np.lexsort((front[:, 1], front[:, 0]))]
    xs = np.append(front[1:, 0], r[0])
    return float(((xs - front[:, 0]) * (r[1] - front[:, 1])).sum())


def normalise(bits: Sequence[float], metric: Sequence[float], bits_scale: float = 8.0,
              metric_kind: str = "error") -> np.ndarray:
    """(N, 2) points ``(bits / bits_scale, m)``, where m is the metric as given (``error``: 1 − accuracy,
    or a loss) or, for ``metric_kind="accuracy"``, 1 − accuracy."""
    b = np.asarray(bits, dtype=np.float64) / bits_scale
    m = np.asarray(metric, dtype=np.float64)
    if metric_kind == "accuracy":
        m = 1.0 - m
    elif metric_kind != "error":
        raise ValueError(f"pareto.normalise: metric_kind must be 'error' or 'accuracy' (got {metric_kind!r})")
    return np.stack([b, m], axis=1)


def segment_edges(bits: Sequence[float], n_segments: int) -> np.ndarray:
    """U + 1 equal-width edges over the WHOLE range of ``bits`` [min, max] (the reference stopped at 6.5)."""
    if n_segments < 1:
        raise ValueError(f"pareto: n_segments must be ≥ 1 (got {n_segments})")
    b = np.asarray(bits, dtype=np.float64)
    return np.linspace(b.min(), b.max(), n_segments + 1)


def segmented_pool(bits: Sequence[float], f1: Sequence[float], n_segments: int) -> list[int]:
    """Indices kept by the segmented rule: split by average bits into U equal-width segments covering every
    point (the last segment includes its upper edge), keep the non-dominated points of each (in (bits, f1)).

    Returns the kept indices in ascending order.
    """
    b = np.asarray(bits, dtype=np.float64)
    f = np.asarray(f1, dtype=np.float64)
    if b.shape != f.shape or b.ndim != 1:
        raise ValueError(f"pareto: bits and f1 must be 1-D of equal length (got {b.shape} and {f.shape})")
    if len(b) == 0:
        return []
    edges = segment_edges(b, n_segments)
    seg = np.clip(np.searchsorted(edges, b, side="right") - 1, 0, n_segments - 1)
    kept: list[int] = []
    for s in np.unique(seg):
        idx = np.flatnonzero(seg == s)
        mask = non_dominated(np.stack([b[idx], f[idx]], axis=1))
        kept.extend(int(i) for i in idx[mask])
    return sorted(kept)
