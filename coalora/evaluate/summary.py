"""Summary metrics over the evaluation table (METHOD.md §7): hypervolume, gaps, training and serving time.

Hypervolume (``coalora.pareto.hypervolume``; every objective minimised), with the normalisation and the
reference point of ``report.hv``, written next to every value (:func:`hv_definition`):

    accuracy metrics   p = (bits / s, 1 − acc),                 reference r = report.hv.accuracy.reference
    perplexity         p = (bits / s, ln(ppl) / ln(ppl_max)),   reference r = report.hv.perplexity.reference

so with r = (1, 1) a config scores nothing when it is at 8 bits (s = 8), has zero accuracy, or a perplexity of
ppl_max or worse. A method's HV is over its rows (all, seen only, unseen only).

Gaps: ``gap_vs_<baseline>`` = mean over the configs both methods were scored at of (acc_m − acc_baseline)
(accuracy points ×100); ``seen_unseen_gap`` = mean acc over seen rows − mean acc over unseen rows (both sets
chosen nearest to the same budgets), and the perplexity ratio exp(mean NLL unseen − mean NLL seen).

Time to serve K configurations (seconds, from the train stage's records and the rows' ``switch_seconds``;
T_train = the training loop's seconds plus the seconds of the Pareto search rounds, if any):

    joint methods (coalora family, shared)   T_train + K · t_switch           (one run serves every config)
    per-config methods (qlora, lqlora)       K · (t_run + t_switch)           (t_run: mean seconds per run)
    qlora-bnb                                 None: it serves only its uniform config

t_switch is the median over the method's rows of quantizing every layer to a config (and evaluating θ).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from coalora.evaluate.table import metric_value
from coalora.pareto import hypervolume, normalise

SETS = ("all", "seen", "unseen")


def hv_definition(metric: str, hv) -> str:
    """The normalisation and reference of a metric's hypervolume, in words (written next to each value)."""
    if metric == "ppl":
        p = hv.perplexity
        return (f"points (bits/{p.bits_scale:g}, ln(ppl)/ln({p.ppl_max:g})), reference "
                f"({p.reference[0]:g}, {p.reference[1]:g}), minimised")
    a = hv.accuracy
    return f"points (bits/{a.bits_scale:g}, 1 - {metric}), reference ({a.reference[0]:g}, {a.reference[1]:g}), minimised"


def hv_points(rows: Sequence[dict], metric: str, hv) -> tuple[np.ndarray, list[float]]:
    """(N, 2) normalised points of the rows for ``metric``, and the reference point."""
    bits = [r["bits"] for r in rows]
    if metric == "ppl":
        p = hv.perplexity
        y = [math.log(metric_value(r, "ppl")) / math.log(p.ppl_max) for r in rows]
        return normalise(bits, y, p.bits_scale, "error"), list(p.reference)
    a = hv.accuracy
    return normalise(bits, [metric_value(r, metric) for r in rows], a.bits_scale, "accuracy"), list(a.reference)


def _subset(rows: Sequence[dict], which: str) -> list[dict]:
    return list(rows) if which == "all" else [r for r in rows if r["set"] == which]


def hypervolumes(rows: Sequence[dict], metrics: Sequence[str], hv) -> dict[str, dict[str, dict]]:
    """method → metric → {"all", "seen", "unseen"} → HV (None when the subset is empty)."""
    out: dict[str, dict[str, dict]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {}
        for metric in metrics:
            values = {}
            for which in SETS:
                subset = _subset(mine, which)
                if subset:
                    points, ref = hv_points(subset, metric, hv)
                    values[which] = round(hypervolume(points, ref), 6)
                else:
                    values[which] = None
            out[method][metric] = values
    return out


def gap_vs(rows: Sequence[dict], baseline: str, metric: str = "acc_mean") -> dict[str, dict]:
    """method → {"gap": mean (m − baseline) over shared config ids ×100 (points), "n": shared configs}."""
    base = {r["config_id"]: metric_value(r, metric) for r in rows if r["method"] == baseline}
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pairs = [(metric_value(r, metric), base[r["config_id"]]) for r in rows
                 if r["method"] == method and r["config_id"] in base]
        out[method] = {"gap": round(100 * sum(a - b for a, b in pairs) / len(pairs), 4) if pairs else None,
                       "n": len(pairs)}
    return out


def seen_unseen_gap(rows: Sequence[dict]) -> dict[str, dict]:
    """method → {"acc_gap": (mean acc seen − mean acc unseen) ×100, "ppl_ratio": unseen / seen (geometric)}."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        seen = [r for r in rows if r["method"] == method and r["set"] == "seen"]
        unseen = [r for r in rows if r["method"] == method and r["set"] == "unseen"]
        if not seen or not unseen:
            out[method] = {"acc_gap": None, "ppl_ratio": None}
            continue
        acc = statistics.fmean(r["acc_mean"] for r in seen) - statistics.fmean(r["acc_mean"] for r in unseen)
        nll = statistics.fmean(r["nll"] for r in unseen) - statistics.fmean(r["nll"] for r in seen)
        out[method] = {"acc_gap": round(100 * acc, 4), "ppl_ratio": round(math.exp(nll), 6)}
    return out


def method_times(train_dir: Path, rows: Sequence[dict], k: int) -> dict[str, dict]:
    """method → training seconds, per-run seconds, median switch seconds, and the time to serve K configs."""
    from coalora.artifacts import read_json
    from coalora.evaluate.plan import method_kind

    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        record = read_json(Path(train_dir) / method / "train.json")
        kind = method_kind(Path(train_dir) / method, record)
        runs = [r["seconds"] for r in record.get("runs", [])]
        switch = statistics.median(r["switch_seconds"] for r in rows if r["method"] == method)
        # The training loop's seconds exclude the Pareto search rounds between steps: add them.
        search = sum(float(r.get("seconds", 0.0)) for r in record.get("rounds") or [])
        train = float(record["seconds"]) + search
        per_run = statistics.fmean(runs) if runs else train
        if kind == "joint":
            serve, rule = train + k * switch, "T_train + K * t_switch"
        elif kind == "per_config":
            serve, rule = k * (per_run + switch), "K * (t_run + t_switch)"
        else:
            serve, rule = None, "serves only its uniform config"
        out[method] = {"kind": kind, "train_seconds": round(train, 3), "search_seconds": round(search, 3),
                       "run_seconds": round(per_run, 3),
                       "runs": len(runs), "wall_seconds": record.get("wall_seconds"),
                       "switch_seconds": round(switch, 4), "serve_k": k,
                       "serve_k_seconds": None if serve is None else round(serve, 3), "serve_rule": rule}
    return out


def summarise(rows: Sequence[dict], tasks: Sequence[str], train_dir: Path, report, baseline: str = "qlora") -> dict:
    """Every summary metric (module docstring) for the table's rows.

    Returns:
        ``{"hv": method → metric → set → value, "hv_definition": metric → words, "gap_vs_<baseline>",
        "seen_unseen_gap", "times", "metrics": [...]}``.
    """
    metrics = ["acc_mean", *tasks, "ppl"]
    return {
        "metrics": metrics,
        "hv": hypervolumes(rows, metrics, report.hv),
        "hv_definition": {m: hv_definition(m, report.hv) for m in metrics},
        "baseline": baseline,
        f"gap_vs_{baseline}": gap_vs(rows, baseline),
        "seen_unseen_gap": seen_unseen_gap(rows),
        "times": method_times(train_dir, rows, report.serve_k),
    }


def flat_metrics(summary: dict) -> dict[str, float | int | str | None]:
    """``<method>.<name>`` → value for ``dvc metrics show``; HV definitions as ``hv_definition.<metric>``."""
    flat: dict = {f"hv_definition.{m}": d for m, d in summary["hv_definition"].items()}
    baseline = summary["baseline"]
    for method, per_metric in summary["hv"].items():
        for metric, values in per_metric.items():
            for which, value in values.items():
                if value is not None:
                    flat[f"{method}.hv_{metric}" + ("" if which == "all" else f"_{which}")] = value
        gap = summary[f"gap_vs_{baseline}"][method]["gap"]
        su = summary["seen_unseen_gap"][method]
        t = summary["times"][method]
        for key, value in ((f"gap_vs_{baseline}", gap), ("seen_unseen_acc_gap", su["acc_gap"]),
                           ("seen_unseen_ppl_ratio", su["ppl_ratio"]), ("train_seconds", t["train_seconds"]),
                           (f"serve_{t['serve_k']}_seconds", t["serve_k_seconds"])):
            if value is not None:
                flat[f"{method}.{key}"] = value
    return flat
