"""Summary statistics over the evaluation table, each with a paired bootstrap interval (METHOD.md §7).

Every number below is computed on the resampled per-item results (``bootstrap.Resampler``) and reported as
its observed value with a ``report.bootstrap.confidence`` interval; "significant" = the interval excludes the
null value (0 for differences, 1 for ratios). Rows are matched by configuration id, so every difference is
between two rows scored on the same items and windows at the same configuration.

    gap(m, b)        mean over the target configs of (acc_m − acc_b), accuracy points (×100)
    ppl ratio(m, b)  exp(mean over the targets of (nll_m − nll_b)): the geometric mean perplexity ratio
    damage(c)        what quantization costs at config c: acc_full − acc_none (points), ppl_none / ppl_full
    recovery(m, S)   share of that damage the adapter removes over the configs S:
                         ppl:  Σ_c (nll_none(c) − nll_m(c)) / Σ_c (nll_none(c) − nll_full)
                         acc:  Σ_c (acc_m(c) − acc_none(c)) / Σ_c (acc_full − acc_none(c))
                     (1 = back to full precision, 0 = no better than the quantized base, > 1 = beyond it)
    HV(m)            hypervolume of the method's rows at the targets + the unseen set (the same configurations
                     for every method), points (bits / s, 1 − acc) or (bits / s, ln ppl / ln ppl_max),
                     reference ``report.hv``; and HV differences between methods
    seen − unseen(m) the adapter's gain over the quantized base (acc_m − acc_none) averaged over the targets
                     the method drew in training, minus the same averaged over the unseen set (points); and
                     exp(mean_unseen(nll_m − nll_none) − mean_seen(nll_m − nll_none)) for perplexity. Measured
                     against the quantized base, so that unseen configs at other bits (random ones hurt more)
                     do not pass for a generalisation gap; the raw difference of mean accuracy is given too.

Compute and cost (from the train stage's records, exact, no interval): config-steps and seconds per method,
and the cost to serve K configurations: a joint method trains once (its config-steps), a per-config method K
runs (K · steps_per_config config-steps); the ratio joint / per-config is what the paper calls ≈ 0.48.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from coalora.trained import read_record
from coalora.evaluate.bootstrap import Interval, Resampler, hypervolume_batch
from coalora.evaluate.plan import FULL, NONE

HV_SETS = ("target", "unseen")  # the configurations every method is scored at


class Stats:
    """The rows of one evaluation and their resampled statistics.

    Args:
        rows: ``table.json`` rows.
        resampler: built from ``items.safetensors``.
        confidence: the intervals' level.
    """

    def __init__(self, rows: Sequence[dict], resampler: Resampler, confidence: float):
        self.rows, self.res, self.confidence = list(rows), resampler, confidence
        self.methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in (NONE, FULL)]
        self._by = {(r["method"], r["config_id"]): r for r in rows}

    def row(self, method: str, config_id: str) -> dict | None:
        return self._by.get((method, config_id))

    def configs(self, method: str, kinds: Sequence[str]) -> list[str]:
        """Config ids of the method's rows of the given kinds, in table order."""
        return [r["config_id"] for r in self.rows if r["method"] == method and r["set"] in kinds]

    def full(self) -> dict | None:
        return next((r for r in self.rows if r["method"] == FULL), None)

    def stat(self, method: str, config_id: str, metric: str) -> np.ndarray:
        """(B + 1,) resampled ``metric`` (``acc_mean``, ``nll``, a task) of one row."""
        return self.res.stat(self._by[(method, config_id)]["job"], metric)

    def interval(self, values: np.ndarray) -> Interval:
        return self.res.interval(values, self.confidence)

    # ---- differences over matched configurations --------------------------------------------------------

    def shared(self, a: str, b: str, kinds: Sequence[str]) -> list[str]:
        """Configs of kind ``kinds`` at which both methods were scored."""
        theirs = set(self.configs(b, kinds))
        return [c for c in self.configs(a, kinds) if c in theirs]

    def gap(self, a: str, b: str, kinds: Sequence[str] = ("target",), metric: str = "acc_mean") -> np.ndarray:
        """Mean over shared configs of (a − b), in points (accuracy ×100)."""
        configs = self.shared(a, b, kinds)
        if not configs:
            raise ValueError(f"no {'/'.join(kinds)} configs shared by {a} and {b}")
        return 100 * np.mean([self.stat(a, c, metric) - self.stat(b, c, metric) for c in configs], axis=0)

    def ppl_ratio(self, a: str, b: str, kinds: Sequence[str] = ("target",)) -> np.ndarray:
        """exp(mean over shared configs of (nll_a − nll_b)): a's perplexity relative to b's."""
        configs = self.shared(a, b, kinds)
        return np.exp(np.mean([self.stat(a, c, "nll") - self.stat(b, c, "nll") for c in configs], axis=0))

    # ---- quantization damage and recovery -----------------------------------------------------------------

    def damage(self, config_id: str) -> dict[str, np.ndarray]:
        """At one config: accuracy lost (points) and perplexity ratio of the quantized base vs full precision."""
        full = self.full()["job"]
        return {"acc_points": 100 * (self.res.stat(full, "acc_mean") - self.stat(NONE, config_id, "acc_mean")),
                "ppl_ratio": np.exp(self.stat(NONE, config_id, "nll") - self.res.stat(full, "nll"))}

    def recovery(self, method: str, configs: Sequence[str], metric: str) -> np.ndarray:
        """Share of the quantization damage the method removes over ``configs`` (module docstring)."""
        full = self.full()["job"]
        if metric == "nll":
            gained = sum(self.stat(NONE, c, "nll") - self.stat(method, c, "nll") for c in configs)
            lost = sum(self.stat(NONE, c, "nll") - self.res.stat(full, "nll") for c in configs)
        else:
            gained = sum(self.stat(method, c, metric) - self.stat(NONE, c, metric) for c in configs)
            lost = sum(self.res.stat(full, metric) - self.stat(NONE, c, metric) for c in configs)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(lost != 0, gained / np.where(lost != 0, lost, 1), np.nan)

    # ---- hypervolume ------------------------------------------------------------------------------------

    def hypervolume(self, method: str, metric: str, hv) -> np.ndarray:
        """(B + 1,) HV of the method's target + unseen rows (``hv``: ``report.hv``)."""
        configs = self.configs(method, HV_SETS)
        bits = np.array([self.row(method, c)["bits"] for c in configs])
        if metric == "ppl":
            p = hv.perplexity
            y = np.stack([self.stat(method, c, "nll") / math.log(p.ppl_max) for c in configs], axis=1)
            return hypervolume_batch(bits / p.bits_scale, y, p.reference)
        a = hv.accuracy
        y = np.stack([1 - self.stat(method, c, metric) for c in configs], axis=1)
        return hypervolume_batch(bits / a.bits_scale, y, a.reference)

    # ---- seen vs unseen ---------------------------------------------------------------------------------

    def seen_unseen(self, method: str, drawn: set[str]) -> dict[str, np.ndarray]:
        """Gain over the quantized base at the drawn targets minus at the unseen set (module docstring)."""
        seen = [c for c in self.configs(method, ("target",)) if c in drawn]
        unseen = self.configs(method, ("unseen",))
        if not seen or not unseen:
            raise ValueError(f"{method}: needs drawn targets and unseen rows")

        def gain(configs, metric):
            return np.mean([self.stat(method, c, metric) - self.stat(NONE, c, metric) for c in configs], axis=0)

        raw = [c for c in self.configs(method, ("target", "seen")) if c in drawn]
        return {"acc_points": 100 * (gain(seen, "acc_mean") - gain(unseen, "acc_mean")),
                "ppl_ratio": np.exp(gain(unseen, "nll") - gain(seen, "nll")),
                "raw_acc_points": 100 * (np.mean([self.stat(method, c, "acc_mean") for c in raw], axis=0)
                                         - np.mean([self.stat(method, c, "acc_mean") for c in unseen], axis=0))}


# ---------------------------------------------------------------------------------------------------------
# Compute and cost
# ---------------------------------------------------------------------------------------------------------

def method_compute(train_dir: Path, methods: Sequence[str], rows: Sequence[dict], k: int) -> dict[str, dict]:
    """method → config-steps, seconds (training loop + search rounds), and the cost to serve K configs."""
    out = {}
    for method in methods:
        record = read_record(train_dir, method)
        kind = record["runs_kind"]
        search = sum(float(r.get("seconds", 0.0)) for r in record.get("rounds") or [])
        seconds = float(record["seconds"]) + search
        runs = record.get("runs", [])
        run_steps = statistics.fmean(r["steps"] for r in runs) if runs else 0.0
        run_seconds = statistics.fmean(r["seconds"] for r in runs) if runs else seconds
        switch = statistics.median(r["switch_seconds"] for r in rows if r["method"] == method)
        if kind == "joint":
            serve_steps, serve_seconds = record["config_steps"], seconds + k * switch
        elif kind == "per_config":
            serve_steps, serve_seconds = k * run_steps, k * (run_seconds + switch)
        else:
            serve_steps = serve_seconds = None
        out[method] = {"kind": kind, "config_steps": record["config_steps"], "steps": record["steps"],
                       "seconds": round(seconds, 3), "search_seconds": round(search, 3),
                       "run_config_steps": run_steps, "run_seconds": round(run_seconds, 3),
                       "switch_seconds": round(switch, 4), "serve_k": k, "serve_config_steps": serve_steps,
                       "serve_seconds": None if serve_seconds is None else round(serve_seconds, 3)}
    return out


def drawn_configs(train_dir: Path, method: str) -> set[str]:
    """The configs the method drew in training (its seen configs)."""
    return set(read_record(train_dir, method).get("config_draws", {}))


# ---------------------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------------------

def hv_definition(metric: str, hv) -> str:
    """The normalisation and reference of a metric's hypervolume, in words (written next to each value)."""
    if metric == "ppl":
        p = hv.perplexity
        return (f"points (bits/{p.bits_scale:g}, ln(ppl)/ln({p.ppl_max:g})), reference "
                f"({p.reference[0]:g}, {p.reference[1]:g}), minimised, over the target and unseen configs")
    a = hv.accuracy
    return (f"points (bits/{a.bits_scale:g}, 1 - {metric}), reference ({a.reference[0]:g}, {a.reference[1]:g}), "
            f"minimised, over the target and unseen configs")


def interval_of(stats: Stats, values: np.ndarray, null: float = 0.0) -> dict:
    interval = stats.interval(values)
    return {**interval.to_dict(), "significant": interval.significant(null)}


def _recovery(stats: Stats, method: str, configs: Sequence[str], metric: str) -> dict | None:
    """The recovery interval, or None when the damage it divides by is not significant (its interval holds
    0: the quantized base is not measurably worse than full precision there, so no share can be stated)."""
    full = stats.full()["job"]
    sign = 1.0 if metric == "nll" else -1.0
    lost = sign * sum(stats.stat(NONE, c, metric) - stats.res.stat(full, metric) for c in configs)
    if not stats.interval(lost).low > 0:
        return None
    return interval_of(stats, stats.recovery(method, configs, metric))


def _safe(fn, *args):
    """fn(*args), or None when the rows it needs are missing (a method skipped, a set empty)."""
    try:
        return fn(*args)
    except (ValueError, KeyError, TypeError):
        return None


def comparison(stats: Stats, a: str, b: str) -> dict:
    """a vs b at the targets, and over targets + unseen: accuracy gap (points) and perplexity ratio."""
    out = {}
    for name, kinds in (("target", ("target",)), ("all", HV_SETS)):
        configs = stats.shared(a, b, kinds)
        if configs:
            out[name] = {"acc_points": interval_of(stats, stats.gap(a, b, kinds)),
                         "ppl_ratio": interval_of(stats, stats.ppl_ratio(a, b, kinds), 1.0), "configs": len(configs)}
    return out


def summarise(stats: Stats, tasks: Sequence[str], train_dir: Path, report) -> dict:
    """Every summary statistic (module docstring) with its interval.

    Args:
        stats: the rows and their resampler.
        tasks: ``eval.tasks``.
        train_dir: the train stage's output (compute records, draws).
        report: ``ReportParams``.
    """
    base, metrics = report.baseline, ["acc_mean", *tasks, "ppl"]
    methods = stats.methods
    out: dict = {"baseline": base, "confidence": stats.confidence, "resamples": stats.res.resamples,
                 "metrics": metrics, "hv_definition": {m: hv_definition(m, report.hv) for m in metrics}}
    hv = {m: {metric: stats.hypervolume(m, metric, report.hv) for metric in metrics}
          for m in methods if stats.configs(m, HV_SETS)}
    out["hv"] = {m: {metric: interval_of(stats, v) for metric, v in per.items()} for m, per in hv.items()}
    out["hv_vs_coalora"] = {m: {metric: interval_of(stats, hv["coalora"][metric] - v) for metric, v in per.items()}
                            for m, per in hv.items() if m != "coalora" and "coalora" in hv}
    out["gap"] = {m: {"acc_points": interval_of(stats, g), "ppl_ratio": interval_of(stats, stats.ppl_ratio(m, base), 1.0),
                      "configs": len(stats.shared(m, base, ("target",)))}
                  for m in methods if m != base and (g := _safe(stats.gap, m, base)) is not None}
    out["gap_all"] = {m: interval_of(stats, g) for m in methods if m != base
                      and (g := _safe(stats.gap, m, base, HV_SETS)) is not None}
    out["coalora_vs"] = {m: comparison(stats, "coalora", m) for m in methods if m != "coalora"
                         and "coalora" in methods}
    if stats.full() is not None:
        out["damage"] = {c: {"set": stats.row(NONE, c)["set"], "bits": stats.row(NONE, c)["bits"],
                             **{k: interval_of(stats, v, 0.0 if k == "acc_points" else 1.0)
                                for k, v in stats.damage(c).items()}}
                         for c in stats.configs(NONE, HV_SETS)}
        out["recovery"] = {m: {kind: {metric: _recovery(stats, m, configs, metric) for metric in ("nll", "acc_mean")}
                               for kind in HV_SETS if (configs := stats.shared(m, NONE, (kind,)))}
                           for m in methods}
    out["seen_unseen"] = {}
    for m in methods:
        su = _safe(stats.seen_unseen, m, drawn_configs(train_dir, m))
        if su is not None:
            out["seen_unseen"][m] = {"acc_points": interval_of(stats, su["acc_points"]),
                                     "ppl_ratio": interval_of(stats, su["ppl_ratio"], 1.0),
                                     "raw_acc_points": interval_of(stats, su["raw_acc_points"])}
    out["compute"] = method_compute(train_dir, methods, stats.rows, report.serve_k)
    out["power"] = power(out, stats)
    return out


def power(summary: dict, stats: Stats) -> dict | None:
    """How finely this evaluation resolves a difference: the half-widths of the intervals on coalora vs the
    baseline at the targets (accuracy points; perplexity ratio, in %), and what the rows cost to score."""
    target = summary.get("coalora_vs", {}).get(summary["baseline"], {}).get("target")
    if target is None:
        return None
    acc, ppl = target["acc_points"], target["ppl_ratio"]
    seconds = [r["eval_seconds"] + r["switch_seconds"] for r in stats.rows if "eval_seconds" in r]
    return {"acc_gap_half_width_points": round((acc["ci_high"] - acc["ci_low"]) / 2, 4),
            "ppl_ratio_half_width_percent": round(100 * (ppl["ci_high"] - ppl["ci_low"]) / 2, 4),
            "items_per_task": {t: len(v) for t, v in stats.res.items_of_first_row().items()},
            "rows": len(stats.rows), "row_seconds_mean": round(sum(seconds) / len(seconds), 3) if seconds else None}


def flat_metrics(summary: dict) -> dict[str, float | int | str | None]:
    """``<method>.<name>`` → value for ``dvc metrics show`` (observed values; intervals in summary.json)."""
    flat: dict = {f"hv_definition.{m}": d for m, d in summary["hv_definition"].items()}
    for method, per in summary["hv"].items():
        for metric, iv in per.items():
            flat[f"{method}.hv_{metric}"] = iv["value"]
    for method, g in summary["gap"].items():
        flat[f"{method}.gap_vs_{summary['baseline']}_points"] = g["acc_points"]["value"]
        flat[f"{method}.ppl_ratio_vs_{summary['baseline']}"] = g["ppl_ratio"]["value"]
    for method, kinds in summary.get("recovery", {}).items():
        for kind, r in kinds.items():
            for metric, name in (("nll", "ppl"), ("acc_mean", "acc")):
                if r[metric] is not None:
                    flat[f"{method}.recovery_{name}_{kind}"] = r[metric]["value"]
    for method, su in summary["seen_unseen"].items():
        flat[f"{method}.seen_minus_unseen_points"] = su["acc_points"]["value"]
    for method, c in summary["compute"].items():
        flat[f"{method}.config_steps"] = c["config_steps"]
        flat[f"{method}.train_seconds"] = c["seconds"]
    return flat
