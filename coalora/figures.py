"""The figures the report and the MLflow runs share (matplotlib with the Agg backend; never mlflow).

    pareto_figure   a metric vs average bits: every method's rows (marker by row kind, colour by method)
                    and each method's Pareto front as a step line; full precision as a horizontal line
    rounds_figure   a search's pool (dots) and front (line) per round, from train.json's ``rounds``

matplotlib is imported inside the functions, so the library imports where it is not installed. A module of
its own, outside ``coalora.track``: the report stage's code (its cache key, its dvc.yaml deps) is what it
imports, and the MLflow logging is no part of it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

# Metric names where lower is better; every other metric (accuracy, f1, ...) is higher-better.
LOWER_BETTER = re.compile(r"loss|ppl|perplexity|error|nll", re.IGNORECASE)
# Row kind (the table's ``set`` column) → (marker, filled). Other kinds (the allocate stage's ``pool``) are
# filled circles.
MARKERS = {"target": ("o", True), "seen": ("s", True), "unseen": ("o", False), "reference": ("D", True)}
OTHER_KIND = ("o", True)
METHOD_SERIES = "all"  # the one series of a table without a method column


@dataclass(frozen=True)
class Point:
    """One row of a configuration table as drawn: ``value`` of the metric at ``bits``."""

    method: str
    kind: str
    bits: float
    value: float


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def lower_is_better(metric: str) -> bool:
    return bool(LOWER_BETTER.search(metric))


def front_indices(xs: list[float], ys: list[float], lower_better: bool) -> list[int]:
    """Indices of the non-dominated points (fewer bits better; metric by ``lower_better``), by bits."""
    from coalora.pareto import non_dominated

    sign = 1.0 if lower_better else -1.0
    keep = non_dominated([(x, sign * y) for x, y in zip(xs, ys)])
    return sorted((i for i in range(len(xs)) if keep[i]), key=lambda i: (xs[i], sign * ys[i]))


LOG_SPAN = 100.0  # max / min of a figure's values beyond which its y axis is logarithmic


def pareto_figure(points: Sequence[Point], label: str, lower_better: bool, *, full: str | None = None,
                  baseline: str | None = None):
    """``label`` vs bits, one colour per method, each method's front drawn as a step line.

    Args:
        points: the rows to draw (any order).
        label: the metric's name on the y axis.
        lower_better: the metric's direction (the front keeps fewer bits and a better metric).
        full: the method drawn as a horizontal line (full precision: its bits are the weights' own, far
            right of every quantized row), not as points.
        baseline: the method drawn black and dashed (the quantized base without adapter).

    Row kinds: target filled circles, seen filled squares, unseen hollow circles, reference diamonds. A
    marker size per method, earlier methods larger: methods that score the same config alike (common on
    small models) stay visible instead of hiding under the last one drawn. The y axis is logarithmic when
    the values are positive and span more than ``LOG_SPAN`` (a 2-bit config's perplexity can be 10⁶ times
    full precision's: on a linear axis every other row would sit on zero).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=100)
    methods = [m for m in dict.fromkeys(p.method for p in points) if m != full]
    colours = plt.get_cmap("tab10")
    for index, method in enumerate(methods):
        mine = [p for p in points if p.method == method]
        colour = "black" if method == baseline else colours(index % 10)
        size = max(14, 70 - 8 * index)
        for kind in dict.fromkeys(p.kind for p in mine):
            marker, filled = MARKERS.get(kind, OTHER_KIND)
            xs, ys = zip(*[(p.bits, p.value) for p in mine if p.kind == kind])
            ax.scatter(xs, ys, s=size, marker=marker, facecolors=colour if filled else "none", edgecolors=[colour])
        xs, ys = [p.bits for p in mine], [p.value for p in mine]
        front = front_indices(xs, ys, lower_better)
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color=colour, alpha=0.8,
                linestyle="--" if method == baseline else "-", label=method)
    for p in points:
        if p.method == full:
            ax.axhline(p.value, color="grey", linestyle=":", label="full precision")
            break
    kinds = [k for k in dict.fromkeys(p.kind for p in points if p.method != full) if k]
    for kind in kinds:  # legend entries for the row kinds: grey markers, no data
        marker, filled = MARKERS.get(kind, OTHER_KIND)
        ax.scatter([], [], marker=marker, facecolors="grey" if filled else "none", edgecolors="grey", label=kind)
    values = [p.value for p in points]
    log_axis = bool(values) and min(values) > 0 and max(values) > LOG_SPAN * min(values)
    if log_axis:
        ax.set_yscale("log")
    ax.set_xlabel("average bits per parameter")
    ax.set_ylabel(f"{label} ({'lower' if lower_better else 'higher'} is better{', log scale' if log_axis else ''})")
    ax.set_title(f"Pareto front: {label} vs bits", fontsize=9)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def round_points(record: dict) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(pool points, front points) as (bits, f1) from one ``rounds`` entry of train.json.

    The entry is ``coalora.search.rounds.round_log``'s: ``pool`` a list of ``{"id", "bits", "f1"}``, ``front``
    the ids of its non-dominated members.
    """
    pool = {p["id"]: (float(p["bits"]), float(p["f1"])) for p in record["pool"]}
    return sorted(pool.values()), sorted(pool[i] for i in record["front"])


def rounds_figure(method: str, rounds: list[dict], upto: int | None = None):
    """The pool (dots) and its front (line) of each search round up to ``upto``, later rounds darker."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    shown = [r for r in rounds if upto is None or r["round"] <= upto]
    cmap = plt.get_cmap("viridis")
    for i, record in enumerate(shown):
        colour = cmap(i / max(1, len(shown) - 1))
        points, front = round_points(record)
        label = f"round {record['round']}"
        if is_number(record.get("hypervolume")):
            label += f" (HV {record['hypervolume']:.4g})"
        if points:
            ax.scatter(*zip(*points), color=colour, s=14, alpha=0.6)
        if front:
            ax.step(*zip(*front), where="post", color=colour, label=label)
        elif points:
            ax.plot([], [], color=colour, label=label)
    ax.set_xlabel("average bits per parameter")
    ax.set_ylabel("f1 (lower is better)")
    ax.set_title(f"{method}: configuration pool and Pareto front per search round")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
