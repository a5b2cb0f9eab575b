"""Budgeted allocation (METHOD.md §5): the least-cost config within a bits budget, and random configs at one.

    solve_budget / allocate_budget   the integer program, solved with SciPy's HiGHS (``scipy.optimize.milp``)
    pareto_options                   per layer, the specs no other spec beats in both bits and cost
    random_at_budget                 a random config repaired to just under a budget (held-out "random")
    budget_range / check_budget      the feasible budgets of a storage table

The integer program, for L layers, C specs, cost (L, C), bpp (C,), numel (L,), budget β:

    min_x  Σ_{i,c} cost[i,c]·x[i,c]
    s.t.   Σ_c x[i,c] = 1                                  for every layer i   (one spec per layer)
           Σ_{i,c} bpp[c]·numel[i]·x[i,c] ≤ β·Σ_i numel[i]                     (the storage budget)
           x[i,c] ∈ {0, 1}

It is a multiple-choice knapsack. Two EXACT reductions shrink it before HiGHS sees it: dominated specs
(:func:`pareto_options`) and reduced-cost fixing with a Lagrangian bound (:class:`Relaxation`). What is left
is still a real knapsack: with ~80 non-dominated specs per layer and layers of similar cost (an untrained
model's squared error is nearly the same for every layer of a shape) HiGHS can need many thousands of nodes
to PROVE optimality of a solution it found at the root. So each solve accepts a relative gap of ``MIP_GAP``
and stops after ``NODE_LIMIT`` nodes (a deterministic effort cap; a time limit would make the answer depend
on the machine), and :class:`Allocation` reports the proven gap.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from coalora.errors import UserError
from coalora.space import average_bits

BUDGET_FIELD = "budget"
MIP_GAP = 1e-4      # HiGHS' relative gap: a config within 0.01 % of the least cost is accepted
NODE_LIMIT = 100    # branch-and-bound nodes per HiGHS call
RANDOM_TRIES = 20   # draws of a random config before settling for the closest under its budget
RETIGHTEN = 3       # re-solves with a budget tightened by HiGHS' overshoot, before the greedy repair


# ---------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------

def _arrays(cost, bpp, numel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cost = np.asarray(cost, dtype=np.float64)
    bpp = np.asarray(bpp, dtype=np.float64)
    numel = np.asarray(numel, dtype=np.int64)
    if cost.ndim != 2 or cost.shape != (len(numel), len(bpp)):
        raise ValueError(f"cost must be (n_layers, n_specs) = ({len(numel)}, {len(bpp)}), got {cost.shape}")
    if not np.isfinite(cost).all() or (cost < 0).any():
        raise ValueError("cost must be finite and non-negative")
    return cost, bpp, numel


def config_bits(idx: Sequence[int], bpp: np.ndarray, numel: np.ndarray) -> float:
    """The bits of the config choosing spec ``idx[i]`` for layer ``i`` (the same formula as ``Config.bits``)."""
    return average_bits([float(bpp[c]) for c in idx], [int(n) for n in numel])


def budget_range(bpp, numel) -> tuple[float, float]:
    """(cheapest, richest) config bits: every layer at the smallest / largest bpp."""
    bpp, numel = np.asarray(bpp, dtype=np.float64), np.asarray(numel, dtype=np.int64)
    return (config_bits([int(bpp.argmin())] * len(numel), bpp, numel),
            config_bits([int(bpp.argmax())] * len(numel), bpp, numel))


def check_budget(budget: float, bpp, numel) -> None:
    """UserError naming ``budget``, its value and the feasible range, unless it is feasible."""
    low, high = budget_range(bpp, numel)
    if not (isinstance(budget, (int, float, np.floating)) and np.isfinite(budget) and low <= budget <= high):
        raise UserError(f"{BUDGET_FIELD}: {budget!r} bits is not feasible; allowed: {low:.4f} … {high:.4f} "
                        f"(every layer at the cheapest / richest spec)")


# ---------------------------------------------------------------------------------------------------------
# Exact reductions
# ---------------------------------------------------------------------------------------------------------

def pareto_options(cost_row: np.ndarray, bpp: np.ndarray) -> np.ndarray:
    """The specs of one layer that no other spec dominates, by increasing bits (and decreasing cost).

    Spec c is dominated when some c' has bpp[c'] ≤ bpp[c] and cost[c'] ≤ cost[c], one strictly. Dropping
    dominated specs is an EXACT reduction of the integer program: in any feasible solution using c, swapping
    in c' keeps one spec per layer, does not raise the storage (so stays within the budget) and does not
    raise the objective; hence some optimal solution uses only non-dominated specs. Of specs equal in both
    bits and cost one is kept, the lowest index: they are interchangeable.

    Returns:
        indices into the C specs, bits strictly increasing, cost strictly decreasing.
    """
    order = np.lexsort((np.arange(len(bpp)), cost_row, bpp))  # by bits, then cost, then index
    keep, best = [], np.inf
    for c in order:
        if cost_row[c] < best:  # cheaper than everything with fewer or equal bits: not dominated
            keep.append(c)
            best = cost_row[c]
    return np.asarray(keep, dtype=np.int64)


class Relaxation:
    """The Lagrangian relaxation of the budget row, for bounds and reduced-cost fixing (EXACT).

    With s[i,k] = bpp·numel_i/N the bits option k of layer i adds, and any λ ≥ 0, every feasible x obeys
    Σ c·x ≥ Σ c·x + λ(Σ s·x − β) ≥ L(λ) + r[i,k] whenever x picks option k in layer i, where

        L(λ) = Σ_i min_k (c[i,k] + λ·s[i,k]) − λ·β,    r[i,k] = c[i,k] + λ·s[i,k] − min_k' (c[i,k'] + λ·s[i,k']).

    So ``lower = L(λ)`` bounds the optimum from below, and an option with L(λ) + r[i,k] above the cost T of a
    known feasible config is in no solution cheaper than T (:meth:`keep`). λ comes from bisection on the
    storage of the Lagrangian minimiser (L is largest where that storage crosses β: the LP dual of the
    budget row); ``upper`` is the minimiser at the feasible end, improved greedily.

    Attributes:
        options: per layer, the spec indices considered.
        lower: L(λ), a lower bound on the optimum.
        upper_idx: (L,) spec indices of a config within the budget (``Config.bits`` ≤ β); ``upper`` its cost.
        exact: True when the least-cost option of every layer fits (then upper_idx is optimal).
    """

    def __init__(self, options: list[np.ndarray], cost: np.ndarray, bpp: np.ndarray, numel: np.ndarray,
                 budget: float):
        self.options = options
        width = max(len(o) for o in options)
        costs, bits = np.full((len(options), width), np.inf), np.zeros((len(options), width))  # (L, K)
        share = numel / numel.sum()
        for i, o in enumerate(options):
            costs[i, :len(o)], bits[i, :len(o)] = cost[i, o], bpp[o] * share[i]
        rows = np.arange(len(options))
        pick = lambda lam: np.argmin(costs + lam * bits, axis=1)  # noqa: E731  (L,) Lagrangian minimiser
        # λ only steers the bound (any λ ≥ 0 gives a valid one), so "fits" may be a hair lenient; the
        # feasibility of the upper config is checked exactly below.
        fits = lambda lam: bits[rows, pick(lam)].sum() <= budget * (1 + 1e-12)  # noqa: E731
        lo, hi = 0.0, 0.0
        if not fits(0.0):
            hi = 1.0
            for _ in range(1000):  # finite λ up to 2^1000: large enough for every layer's fewest bits
                if fits(hi):
                    break
                lo, hi = hi, hi * 2
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if not fits(mid) else (lo, mid)
        lam = max((lo, hi), key=lambda x: (costs + x * bits).min(axis=1).sum() - x * budget)
        values = costs + lam * bits  # (L, K)
        self.lower = float(values.min(axis=1).sum() - lam * budget)
        # L(λ) is a difference of two sums that may nearly cancel: its rounding error scales with them
        self._rounding = 1e-12 * float(values.min(axis=1).sum() + lam * budget)
        self._reduced = values - values.min(axis=1, keepdims=True)  # (L, K) r[i, k]
        choice = _improve(pick(hi), costs, bits, budget)
        idx = np.array([o[k] for o, k in zip(options, choice)], dtype=np.int64)
        self.upper_idx = _step_down(idx, options, cost, bpp, numel, budget)  # exact check: Config.bits ≤ β
        self.upper = _total(cost, self.upper_idx)
        self.exact = hi == 0.0 and np.array_equal(idx, self.upper_idx)

    def keep(self, threshold: float) -> list[np.ndarray]:
        """Per layer, the options that can be in a config costing at most ``threshold``."""
        slack = threshold * (1 + 1e-9) + self._rounding - self.lower  # a hair of slack against rounding
        return [o[self._reduced[i, :len(o)] <= slack] for i, o in enumerate(self.options)]


def _improve(choice: np.ndarray, costs: np.ndarray, bits: np.ndarray, budget: float) -> np.ndarray:
    """Greedy local search on a feasible choice (L,) of option positions: apply the single-layer move that
    lowers the cost most while staying under the budget, until none does."""
    rows = np.arange(len(choice))
    while True:
        current = bits[rows, choice]
        slack = budget - current.sum() - 1e-12 * budget
        gain = costs[rows, choice][:, None] - costs  # (L, K) cost saved by each move
        gain[bits - current[:, None] > slack] = -np.inf
        i, k = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[i, k] > 0:
            return choice
        choice[i] = k


# ---------------------------------------------------------------------------------------------------------
# HiGHS
# ---------------------------------------------------------------------------------------------------------

@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 for a HiGHS call: some builds print debug lines from C++ straight to it."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _milp(options: list[np.ndarray], cost: np.ndarray, bpp: np.ndarray, numel: np.ndarray,
          rhs: float) -> tuple[np.ndarray | None, float]:
    """One HiGHS solve over the given options per layer.

    Returns:
        (idx, bound): the chosen spec per layer (None when HiGHS found no feasible config), and HiGHS' lower
        bound on the optimum over these options (in cost units).
    """
    if all(len(o) == 1 for o in options):  # nothing left to decide
        idx = np.array([o[0] for o in options], dtype=np.int64)
        return idx, float(cost[np.arange(len(idx)), idx].sum())
    layer_of = np.concatenate([np.full(len(o), i) for i, o in enumerate(options)])  # (V,)
    spec_of = np.concatenate(options)  # (V,)
    n_vars = len(spec_of)
    # Scale the objective so the least achievable total (every layer at its least-cost spec) is 1: HiGHS'
    # absolute tolerances then act relatively, whatever the units of the Fisher weighting.
    scale = float(cost.min(axis=1).sum()) or 1.0
    one_each = csr_array((np.ones(n_vars), (layer_of, np.arange(n_vars))), shape=(len(options), n_vars))
    storage = (bpp[spec_of] * (numel / numel.sum())[layer_of])[None, :]  # (1, V) bits
    with _quiet_stdout():
        result = milp(cost[layer_of, spec_of] / scale, integrality=np.ones(n_vars), bounds=Bounds(0, 1),
                      constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(storage, -np.inf, rhs)],
                      options={"mip_rel_gap": MIP_GAP, "node_limit": NODE_LIMIT})
    dual = getattr(result, "mip_dual_bound", None)
    bound = -np.inf if dual is None or not np.isfinite(dual) else float(dual) * scale
    if result.x is None:
        return None, bound
    starts = np.cumsum([0] + [len(o) for o in options[:-1]])
    x = result.x
    return np.array([o[int(np.argmax(x[s:s + len(o)]))] for s, o in zip(starts, options)], dtype=np.int64), bound


# ---------------------------------------------------------------------------------------------------------
# Solving a budget
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    """The answer for one budget.

    Attributes:
        idx: (L,) int64 spec index per layer (columns of the cost table).
        objective: Σ_i cost[i, idx[i]].
        bound: a proven lower bound on the least cost within the budget.
        bits: the config's bits (≤ budget, always).
    """

    idx: np.ndarray
    objective: float
    bound: float
    bits: float

    @property
    def gap(self) -> float:
        """(objective − bound) / objective: 0 when proven optimal, at most MIP_GAP unless the node limit hit."""
        return max(0.0, (self.objective - self.bound) / self.objective) if self.objective > 0 else 0.0


def _total(cost: np.ndarray, idx: np.ndarray) -> float:
    return float(cost[np.arange(len(idx)), idx].sum())


def _feasible_milp(options, cost, bpp, numel, budget) -> tuple[np.ndarray | None, float]:
    """HiGHS on ``options``, re-solved with a tightened budget row if its answer overshoots by tolerance."""
    rhs, bound = float(budget), -np.inf
    for _ in range(RETIGHTEN):
        idx, bound = _milp(options, cost, bpp, numel, rhs)
        if idx is None:
            return None, bound
        over = config_bits(idx, bpp, numel) - budget
        if over <= 0:
            return idx, bound
        rhs -= over + 1e-12 * budget  # HiGHS accepted a hair of violation: ask for a hair less
    return None, bound


def allocate_budget(cost, bpp, numel, budget: float) -> Allocation:
    """The least-cost config whose bits do not exceed ``budget`` (the integer program above), with its gap.

    1. keep each layer's non-dominated specs (exact);
    2. the Lagrangian bound, a greedy feasible config, and reduced-cost fixing against it (exact: every
       config cheaper than the greedy one, the optimum included, uses only the options kept);
    3. HiGHS on what is left; the better of its answer and the greedy config is returned.

    Raises:
        UserError: naming ``budget`` when it lies outside the feasible range.
    """
    cost, bpp, numel = _arrays(cost, bpp, numel)
    check_budget(budget, bpp, numel)
    options = [pareto_options(row, bpp) for row in cost]
    relax = Relaxation(options, cost, bpp, numel, budget)
    best = relax.upper_idx
    if relax.exact:
        return Allocation(best, _total(cost, best), _total(cost, best), config_bits(best, bpp, numel))
    idx, milp_bound = _feasible_milp(relax.keep(_total(cost, best)), cost, bpp, numel, budget)
    if idx is not None and _total(cost, idx) < _total(cost, best):
        best = idx
    objective = _total(cost, best)
    return Allocation(best, objective, min(max(relax.lower, milp_bound), objective), config_bits(best, bpp, numel))


def solve_budget(cost, bpp, numel, budget: float) -> tuple[np.ndarray, float]:
    """The least-cost config within ``budget``: :func:`allocate_budget` without the bound.

    Args:
        cost: (L, C) non-negative cost of layer i under spec c.
        bpp: (C,) bits per parameter of each spec.
        numel: (L,) weights per layer.
        budget: β, average bits over the L layers.

    Returns:
        (idx, objective): (L,) int64 chosen spec per layer and Σ_i cost[i, idx[i]]. Guaranteed:
        ``config_bits(idx) ≤ budget`` in the same float arithmetic as ``Config.bits``.
    """
    result = allocate_budget(cost, bpp, numel, budget)
    return result.idx, result.objective


def _step_down(idx: np.ndarray, options: list[np.ndarray], cost: np.ndarray, bpp: np.ndarray,
               numel: np.ndarray, budget: float) -> np.ndarray:
    """Move layers to their next option down, least cost increase per bit saved first, until within budget.

    A safety net for configs that float rounding put a hair over the budget; a no-op otherwise.
    """
    idx = idx.copy()
    while config_bits(idx, bpp, numel) > budget:
        moves = []
        for i, opts in enumerate(options):
            lower = opts[bpp[opts] < bpp[idx[i]]]
            if len(lower):  # options are by increasing bits: the last lower one is the next down
                c = lower[-1]
                moves.append(((cost[i, c] - cost[i, idx[i]]) / ((bpp[idx[i]] - bpp[c]) * numel[i]), i, c))
        _, i, c = min(moves)
        idx[i] = c
    return idx


# ---------------------------------------------------------------------------------------------------------
# Random configs
# ---------------------------------------------------------------------------------------------------------

def random_at_budget(bpp, numel, budget: float, tolerance: float, rng: np.random.Generator) -> np.ndarray:
    """A random config whose bits lie in (budget − tolerance, budget], or as close under it as found.

    One draw:
    1. every layer's spec uniformly from all C specs;
    2. while over the budget, a random layer gets a uniformly random spec with fewer bits;
    3. while more than ``tolerance`` under it, a random layer gets a random spec with more bits among those
       that still fit (each move strictly raises the bits and never crosses β).
    With few layers the reachable bits are coarse and step 3 can stall short of the tolerance; then the
    draw is repeated (up to RANDOM_TRIES) and the closest one kept. The result never exceeds the budget.

    Returns:
        (L,) int64 spec indices.
    """
    bpp, numel = np.asarray(bpp, dtype=np.float64), np.asarray(numel, dtype=np.int64)
    check_budget(budget, bpp, numel)
    best, best_bits = None, -np.inf
    for _ in range(RANDOM_TRIES):
        idx, bits = _random_draw(bpp, numel, budget, tolerance, rng)
        if bits > best_bits:
            best, best_bits = idx, bits
        if budget - bits <= tolerance:
            break
    if best_bits > budget:  # cannot happen with the margin in _random_draw; never hand out a config over it
        raise AssertionError(f"random config at {best_bits} bits exceeds its budget {budget}")
    return best


def _random_draw(bpp: np.ndarray, numel: np.ndarray, budget: float, tolerance: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Steps 1–3 of :func:`random_at_budget`: (idx, bits)."""
    share = numel / numel.sum()  # (L,)
    idx = rng.integers(len(bpp), size=len(numel))
    while (bits := config_bits(idx, bpp, numel)) > budget:
        layer = rng.choice(np.flatnonzero(bpp[idx] > bpp.min()))
        idx[layer] = rng.choice(np.flatnonzero(bpp < bpp[idx[layer]]))
    while budget - bits > tolerance:
        gain = (bpp[None, :] - bpp[idx][:, None]) * share[:, None]  # (L, C) bits added by each move
        fits = (gain > 0) & (gain <= budget - bits - 1e-9)  # the margin: rounding never crosses β
        if not fits.any():
            break
        layer = rng.choice(np.flatnonzero(fits.any(axis=1)))
        idx[layer] = rng.choice(np.flatnonzero(fits[layer]))
        bits = config_bits(idx, bpp, numel)
    return idx.astype(np.int64), bits
