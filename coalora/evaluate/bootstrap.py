"""Paired bootstrap over benchmark items and perplexity windows: an interval for every stated difference.

Every row of one evaluation is scored on the same items of each task and the same perplexity windows, so a
resample is ONE draw of item indices per task (and of window indices) applied to every row alike: the
resampled rows stay paired, and a difference between two rows (or any function of many rows) is resampled
as a whole. A draw is stored as counts, how often each item is drawn:

    C_t (B, n_t)  multinomial(n_t; 1/n_t, …): resample b draws item i of task t C_t[b, i] times
    C_w (B, W)    likewise for the perplexity windows

and a row's resampled statistics are matrix products with its per-item results x_t (n_t,), ν (W,):

    acc_t[b]    = C_t[b] · x_t / n_t                          accuracy of task t
    acc_mean[b] = (1/|T|) Σ_t acc_t[b]                       the unweighted mean over tasks
    nll[b]      = C_w[b] · ν / (W · (T − 1))                  mean per-token NLL (ν: each window's summed NLL)

Index 0 of every statistic is the observed value (all counts 1); 1..B are the resamples. A statistic is any
vectorised function of these (B + 1,) arrays; its interval is the percentile interval of the resamples at
``confidence``, and it is *significant* when the interval excludes the null value (0 for a difference, 1 for
a ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A statistic's observed value and its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def significant(self, null: float = 0.0) -> bool:
        """The interval excludes ``null``."""
        return not self.low <= null <= self.high

    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self, digits: int = 6) -> dict[str, float]:
        return {"value": round(self.value, digits), "ci_low": round(self.low, digits),
                "ci_high": round(self.high, digits)}


def counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B + 1, n) float64 draw counts: row 0 all ones (the observed sample), rows 1..B multinomial."""
    drawn = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # (B, n)
    return np.vstack([np.ones((1, n)), drawn])


class Resampler:
    """Resampled statistics of every row of one evaluation (module docstring).

    Args:
        items: job → ``{"<task>": (n_t,), "<task>_norm": (n_t,), "ppl": (W,)}`` (``items.read_items``).
        tasks: the tasks whose accuracies form ``acc_mean``.
        tokens_per_window: T − 1.
        resamples: B.
        seed: the generator's seed (the same seed gives the same intervals).
    """

    def __init__(self, items: Mapping[str, Mapping[str, np.ndarray]], tasks: Sequence[str], tokens_per_window: int,
                 resamples: int, seed: int):
        self.tasks, self.resamples = list(tasks), resamples
        rng = np.random.default_rng(seed)
        any_row = next(iter(items.values()))
        self._counts = {t: counts(len(any_row[t]), resamples, rng) for t in self.tasks}
        self._counts["ppl"] = counts(len(any_row["ppl"]), resamples, rng)
        self._denominator = {t: len(any_row[t]) for t in self.tasks}
        self._denominator["ppl"] = len(any_row["ppl"]) * tokens_per_window
        self._items, self._cache = items, {}

    def items_of_first_row(self) -> dict[str, np.ndarray]:
        """One row's per-item arrays (every row has the same sizes): the items and windows resampled."""
        return dict(next(iter(self._items.values())))

    def stat(self, job: str, metric: str) -> np.ndarray:
        """(B + 1,) resampled ``metric`` of a row: ``acc_mean``, ``nll``, ``<task>`` or ``<task>_norm``."""
        key = (job, metric)
        if key not in self._cache:
            self._cache[key] = self._compute(job, metric)
        return self._cache[key]

    def _compute(self, job: str, metric: str) -> np.ndarray:
        if metric == "acc_mean":
            return np.mean([self.stat(job, t) for t in self.tasks], axis=0)
        field = "ppl" if metric == "nll" else metric          # the per-item array this metric reads
        source = "ppl" if metric == "nll" else metric.removesuffix("_norm")  # whose draw counts apply
        values = np.asarray(self._items[job][field], dtype=np.float64)
        return self._counts[source] @ values / self._denominator[source]

    def interval(self, values: np.ndarray, confidence: float) -> Interval:
        """The observed value (index 0) and the percentile interval of the resamples (1..B)."""
        alpha = (1 - confidence) / 2
        low, high = np.quantile(values[1:], [alpha, 1 - alpha])
        return Interval(float(values[0]), float(low), float(high))


def hypervolume_batch(x: np.ndarray, y: np.ndarray, reference: Sequence[float]) -> np.ndarray:
    """2-D hypervolume (both minimised) of N points with fixed x and resampled y, for every resample.

    With the points sorted by x, the region dominated over [x_i, x_{i+1}) reaches down to the best y among
    the first i points, so

        HV = Σ_i (x'_{i+1} − x'_i) · max(0, r_y − min_{j ≤ i} y_j),    x' = min(x, r_x), x'_{N+1} = r_x

    (equal to ``coalora.pareto.hypervolume`` for each resample).

    Args:
        x: (N,) first objective of each point (the same in every resample: bits are exact).
        y: (B, N) second objective per resample.
        reference: (r_x, r_y).

    Returns:
        (B,) hypervolumes.
    """
    order = np.argsort(x, kind="stable")
    xs = np.minimum(np.asarray(x, dtype=np.float64)[order], reference[0])
    widths = np.diff(np.append(xs, reference[0]))                       # (N,) ≥ 0
    best = np.minimum.accumulate(np.asarray(y, dtype=np.float64)[:, order], axis=1)  # (B, N)
    return (widths * np.clip(reference[1] - best, 0, None)).sum(axis=1)


Statistic = Callable[[Resampler], np.ndarray]
