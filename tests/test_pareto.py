"""Pareto fronts: dominance, 2-D hypervolume against brute force, and the segmented pool rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from coalora.pareto import hypervolume, non_dominated, normalise, segment_edges, segmented_pool


def brute_non_dominated(points: np.ndarray) -> np.ndarray:
    """Mask by the definition, pair by pair."""
    keep = []
    for i, p in enumerate(points):
        keep.append(not any((q <= p).all() and (q < p).any() for j, q in enumerate(points) if j != i))
    return np.array(keep, dtype=bool)


def inclusion_exclusion_hv(points: np.ndarray, reference) -> float:
    """|⋃ boxes| = Σ_{∅≠S} (−1)^{|S|+1} |⋂_S boxes|; ⋂ of [p, r] boxes is [max p, r]."""
    r = np.asarray(reference, dtype=np.float64)
    boxes = [p for p in points if (p < r).all()]
    total = 0.0
    for size in range(1, len(boxes) + 1):
        for subset in itertools.combinations(boxes, size):
            corner = np.max(subset, axis=0)
            total += (-1) ** (size + 1) * float(np.prod(r - corner))
    return total


def grid_hv(points: np.ndarray, reference, n: int = 400) -> float:
    """Area by counting cell centres of an n × n grid over [0, r] dominated by some point (points on a
    lattice of the grid make this exact)."""
    r = np.asarray(reference, dtype=np.float64)
    cx = (np.arange(n) + 0.5) * r[0] / n
    cy = (np.arange(n) + 0.5) * r[1] / n
    gx, gy = np.meshgrid(cx, cy, indexing="ij")
    covered = np.zeros_like(gx, dtype=bool)
    for p in points:
        covered |= (gx >= p[0]) & (gy >= p[1])
    return covered.sum() * (r[0] / n) * (r[1] / n)


@pytest.mark.parametrize("seed", range(8))
def test_hypervolume_equals_inclusion_exclusion(seed):
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1.2, size=(int(rng.integers(1, 10)), 2))  # some beyond the reference
    ref = [1.0, 1.1]
    assert hypervolume(points, ref) == pytest.approx(inclusion_exclusion_hv(points, ref), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_equals_a_grid_count_on_lattice_points(seed):
    rng = np.random.default_rng(100 + seed)
    points = rng.integers(0, 40, size=(12, 2)) / 40.0  # on the 400-grid's lattice: the count is exact
    assert hypervolume(points, [1.0, 1.0]) == pytest.approx(grid_hv(points, [1.0, 1.0]), abs=1e-9)


def test_hypervolume_known_values_and_edge_cases():
    assert hypervolume([[0.5, 0.5]], [1, 1]) == pytest.approx(0.25)
    assert hypervolume([[0.0, 0.5], [0.5, 0.0]], [1, 1]) == pytest.approx(0.75)
    assert hypervolume([], [1, 1]) == 0.0
    assert hypervolume([[1.0, 0.2], [0.2, 1.0]], [1, 1]) == 0.0  # on the reference: nothing
    assert hypervolume([[0.5, 0.5], [0.6, 0.6], [0.5, 0.5]], [1, 1]) == pytest.approx(0.25)  # dominated, duplicate
    with pytest.raises(ValueError, match="finite"):
        hypervolume([[np.nan, 0.1]], [1, 1])


@pytest.mark.parametrize("seed", range(6))
def test_non_dominated_matches_the_definition(seed):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(30, 2)).astype(float)  # many ties and duplicates
    assert (non_dominated(points) == brute_non_dominated(points)).all()


def brute_segmented(bits: np.ndarray, f1: np.ndarray, n_segments: int) -> list[int]:
    """Per segment [lo + s·w, lo + (s+1)·w) (the last closed), the non-dominated by the definition."""
    lo, hi = bits.min(), bits.max()
    width = (hi - lo) / n_segments
    kept = []
    for s in range(n_segments):
        upper = lo + (s + 1) * width
        inside = [i for i, b in enumerate(bits)
                  if b >= lo + s * width and (b < upper or (s == n_segments - 1 and b <= hi))]
        pts = np.stack([bits[inside], f1[inside]], axis=1) if inside else np.zeros((0, 2))
        kept += [i for i, keep in zip(inside, brute_non_dominated(pts)) if keep]
    return sorted(kept)


@pytest.mark.parametrize("seed, n_segments", [(0, 1), (1, 3), (2, 5), (3, 40), (4, 7)])
def test_segmented_pool_keeps_exactly_each_segments_non_dominated(seed, n_segments):
    rng = np.random.default_rng(seed)
    bits = np.round(rng.uniform(2.0, 8.6, size=60), 2)  # rounded: points on segment edges occur
    f1 = rng.uniform(1.0, 3.0, size=60)
    kept = segmented_pool(bits, f1, n_segments)
    assert kept == brute_segmented(bits, f1, n_segments)
    assert set(np.flatnonzero(non_dominated(np.stack([bits, f1], 1)))) <= set(kept)  # the global front stays


def test_segments_cover_the_whole_bits_range():
    """METHOD.md defect (c): the reference dropped everything above 6.5 bits; ours keeps the top too."""
    bits = np.array([2.2, 3.0, 4.0, 6.4, 6.9, 7.5, 8.6])
    f1 = np.array([3.0, 2.5, 2.0, 1.5, 1.4, 1.3, 1.2])  # one front: every config is non-dominated
    assert segmented_pool(bits, f1, 4) == list(range(7))
    edges = segment_edges(bits, 4)
    assert edges[0] == 2.2 and edges[-1] == 8.6
    # each segment keeps only its own front; a config alone in its segment stays even when poor
    f1_worse = f1.copy()
    f1_worse[-1] = 9.0  # 8.6 bits now dominated by 7.5 bits at 1.3, which shares its segment [7.0, 8.6]
    kept = segmented_pool(bits, f1_worse, 4)
    assert 6 not in kept and 5 in kept
    kept_alone = segmented_pool(bits, f1_worse, 40)  # fine segments: 8.6 is alone in the last one
    assert 6 in kept_alone


def test_normalise():
    pts = normalise([4.0, 8.0], [0.2, 0.6], metric_kind="accuracy")
    assert np.allclose(pts, [[0.5, 0.8], [1.0, 0.4]])
    with pytest.raises(ValueError, match="metric_kind"):
        normalise([4.0], [0.2], metric_kind="loss")
