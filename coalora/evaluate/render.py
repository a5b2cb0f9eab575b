"""The report: markdown tables, PNG plots of each metric vs bits, and the CSV files DVC plots.

    plots/<metric>.png     the Pareto figure of the metric vs average bits (``coalora.figures``): one
                           series per method (colour) with its front as a step line; target rows as filled
                           circles, seen rows as filled squares, unseen rows hollow; full precision as a line
    dvc/<method>.csv       the method's rows (bits, set, every metric) for ``dvc plots show``
    report.md              setup, the claims table, compute, quantization damage and recovery, gaps, hypervolume,
                           seen vs unseen (every difference with its interval), the unseen set, every row

matplotlib is imported inside the figure functions with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from coalora.artifacts import write_csv
from coalora.evaluate.plan import FULL, NONE
from coalora.evaluate.table import metric_value

DVC_DIR = "dvc"
PLOTS_DIR = "plots"
DVC_COLUMNS_HEAD = ("bits", "set", "config_id")


def metric_label(metric: str, protocol: str | None = None) -> str:
    if metric == "ppl":
        return f"perplexity ({protocol})" if protocol else "perplexity"
    if metric == "acc_mean":
        return "mean accuracy"
    return f"{metric} accuracy"


def dvc_columns(metrics: Sequence[str]) -> list[str]:
    return list(DVC_COLUMNS_HEAD) + list(metrics)


def dvc_rows(rows: Sequence[dict], metrics: Sequence[str]) -> list[list]:
    """One method's rows sorted by bits, in ``dvc_columns`` order: bits, set, config id, then each metric."""
    return [[round(r["bits"], 6), r["set"], r["config_id"]] + [round(metric_value(r, m), 6) for m in metrics]
            for r in sorted(rows, key=lambda r: (r["bits"], r["config_id"]))]


def write_dvc_files(out: Path, rows: Sequence[dict], metrics: Sequence[str], methods: Sequence[str]) -> list[str]:
    """``dvc/<method>.csv`` for every method of ``methods`` (header only when it has no rows, so the plot
    definitions in dvc.yaml always find their files). Returns the paths written, relative to ``out``."""
    written = []
    for method in methods:
        rel = f"{DVC_DIR}/{method}.csv"
        write_csv(out / rel, dvc_columns(metrics), dvc_rows([r for r in rows if r["method"] == method], metrics))
        written.append(rel)
    return written


def write_plots(out: Path, rows: Sequence[dict], metrics: Sequence[str]) -> list[str]:
    """``plots/<metric>.png`` for each metric (module docstring). Returns the paths, relative to ``out``."""
    from coalora.figures import Point, lower_is_better, pareto_figure, pyplot

    protocol = rows[0]["ppl_protocol"] if rows else None
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        points = [Point(r["method"], r["set"], r["bits"], metric_value(r, metric)) for r in rows]
        fig = pareto_figure(points, metric_label(metric, protocol), lower_is_better(metric), full=FULL, baseline=NONE)
        rel = f"{PLOTS_DIR}/{metric}.png"
        # No timestamp in the PNG's metadata, so the same table gives the same file.
        fig.savefig(out / rel, metadata={"Software": None})
        pyplot().close(fig)
        written.append(rel)
    return written


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(iv: dict | None, digits: int = 3) -> str:
    """``value [low, high]``, bold when significant (the interval excludes the null value)."""
    if iv is None:
        return "–"
    text = f"{iv['value']:.{digits}f} [{iv['ci_low']:.{digits}f}, {iv['ci_high']:.{digits}f}]"
    return f"**{text}**" if iv.get("significant") else text


def _table(header: Sequence[str], lines: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in lines]
    return "\n".join(out)


def claims_table(claims: Sequence[dict]) -> str:
    lines = [[c["claim"], c["metric"], f"{c['ours']:.4g} [{c['ci_low']:.4g}, {c['ci_high']:.4g}]", c["paper"],
              f"**{c['verdict']}**", c["rule"]] for c in claims]
    return _table(["claim", "metric", "ours [95% CI]", "paper", "verdict", "rule"], lines)


def power_lines(summary: dict) -> list[str]:
    """What this evaluation can resolve (the goal: a paired accuracy gap to ±1.5 points, a 1% perplexity
    difference), and what its rows cost."""
    p = summary.get("power")
    if p is None:
        return []
    items = ", ".join(f"{t} {n}" for t, n in p["items_per_task"].items())
    return [f"Power: the {summary['confidence']:.0%} interval on the paired accuracy gap coalora − "
            f"{summary['baseline']} at the targets is ±{p['acc_gap_half_width_points']:.2f} points (goal ≤ ±1.5), "
            f"on its perplexity ratio ±{p['ppl_ratio_half_width_percent']:.2f}% (a 1% difference is resolved when "
            f"this is below 1%); items per task ({items}); {p['rows']} rows at {p['row_seconds_mean']} s each "
            f"(one process; scoring and switching).", ""]


def compute_table(summary: dict) -> str:
    k = next(iter(summary["compute"].values()))["serve_k"] if summary["compute"] else "K"
    lines = [[m, c["kind"], c["config_steps"], c["steps"], c["seconds"], c["search_seconds"],
              c["serve_config_steps"], c["serve_seconds"]] for m, c in summary["compute"].items()]
    return _table(["method", "kind", "config-steps", "steps", "train s (incl. search)", "of which search s",
                   f"serve K={k} config-steps", f"serve K={k} s"], lines)


def damage_table(summary: dict) -> str:
    lines = [[c[:12], d["set"], f"{d['bits']:.3f}", _ci(d["acc_points"], 2), _ci(d["ppl_ratio"])]
             for c, d in summary.get("damage", {}).items()]
    return _table(["config", "set", "bits", "accuracy lost vs full precision (pts)", "perplexity ratio none / full"],
                  lines)


def recovery_table(summary: dict) -> str:
    lines = []
    for m, kinds in summary.get("recovery", {}).items():
        t, u = kinds.get("target", {}), kinds.get("unseen", {})
        lines.append([m, _ci(t.get("nll")), _ci(t.get("acc_mean")), _ci(u.get("nll")), _ci(u.get("acc_mean"))])
    return _table(["method", "ppl recovery, targets", "acc recovery, targets", "ppl recovery, unseen",
                   "acc recovery, unseen"], lines)


def gap_table(summary: dict) -> str:
    b = summary["baseline"]
    lines = [[m, _ci(g["acc_points"], 2), _ci(g["ppl_ratio"]), g["configs"], _ci(summary["gap_all"].get(m), 2)]
             for m, g in summary["gap"].items()]
    return _table(["method", f"acc gap vs {b} at the targets (pts)", f"ppl ratio vs {b} at the targets",
                   "targets", f"acc gap vs {b}, targets + unseen (pts)"], lines)


def hv_table(summary: dict) -> str:
    diff = summary.get("hv_vs_coalora", {})
    lines = [[m, _ci(per["acc_mean"]), _ci(per["ppl"]), _ci(diff.get(m, {}).get("acc_mean")),
              _ci(diff.get(m, {}).get("ppl"))] for m, per in summary["hv"].items()]
    return _table(["method", "HV acc_mean", "HV ppl", "HV acc_mean: coalora − method", "HV ppl: coalora − method"],
                  lines)


def seen_unseen_table(summary: dict) -> str:
    lines = [[m, _ci(s["acc_points"], 2), _ci(s["ppl_ratio"]), _ci(s["raw_acc_points"], 2)]
             for m, s in summary["seen_unseen"].items()]
    return _table(["method", "gain over none: drawn targets − unseen (pts)", "ppl ratio to none: unseen / targets",
                   "raw mean acc: seen − unseen (pts)"], lines)


def unseen_table(rows: Sequence[dict]) -> str:
    lines = [[r["config_id"], r.get("source") or "–", f"{r['bits']:.3f}", r["layers_from_trained"]]
             for r in rows if r["method"] == NONE and r["set"] == "unseen"]
    return _table(["config", "source", "bits", "layers differing from the nearest drawn config"], lines)


def rows_table(rows: Sequence[dict], tasks: Sequence[str]) -> str:
    header = ["method", "config", "set", "bits", *tasks, "acc_mean", "ppl"]
    lines = [[r["method"], r["config_id"][:12], r["set"], r["bits"], *[r["tasks"][t]["acc"] for t in tasks],
              r["acc_mean"], r["ppl"]] for r in rows]
    return _table(header, lines)


def _setup(rows: Sequence[dict], tasks: Sequence[str], summary: dict, table: dict, targets: dict) -> list[str]:
    protocol = ", ".join(sorted({r["ppl_protocol"] for r in rows})) or "–"
    counts = {kind: sum(r["set"] == kind for r in rows) for kind in ("target", "seen", "unseen", "reference")}
    n = {t: rows[0]["tasks"][t]["n"] for t in tasks} if rows else {}
    names = table.get("benchmarks", {})
    return [
        f"- rows: {len(rows)} ({', '.join(f'{v} {k}' for k, v in counts.items())}); target configs at "
        f"{[round(t['bits'], 3) for t in targets['targets']]} bits; every method and `none` (the quantized base "
        f"without adapter) at every target and unseen config",
        "- benchmarks (zero-shot, lm-eval's own task definitions on local files): "
        + "; ".join(f"{t}: {names.get(t, t)}, {n.get(t)} items" for t in tasks),
        f"- perplexity protocol: **{protocol}** (the validation text)",
        f"- intervals: {summary['confidence']:.0%} paired bootstrap over items and windows, "
        f"{summary['resamples']} resamples; **bold** = significant (excludes 0, or 1 for ratios)",
        "- hypervolume definitions (higher is better):",
        *[f"  - `{m}`: {d}" for m, d in summary["hv_definition"].items()],
        "- compute in config-steps (one forward+backward of one configuration on one batch); serving K "
        "configurations: a joint method trains once, a per-config method K runs",
    ]


def markdown(rows: Sequence[dict], tasks: Sequence[str], summary: dict, claims: Sequence[dict],
             plots: Sequence[str], table: dict, targets: dict) -> str:
    """The whole report.md."""
    protocol = ", ".join(sorted({r["ppl_protocol"] for r in rows})) or "–"
    parts = ["# coalora evaluation report", "", *_setup(rows, tasks, summary, table, targets), "",
             "## Claims", "", claims_table(claims), "", *power_lines(summary),
             "## Compute", "", compute_table(summary), "",
             "## Quantization damage (quantized base without adapter vs full precision)", "", damage_table(summary), "",
             "## Recovery: share of that damage each adapter removes (1 = back to full precision; – where the "
             "damage itself is not significant)", "",
             recovery_table(summary), "",
             f"## Gaps vs {summary['baseline']}", "", gap_table(summary), "",
             "## Hypervolume (target + unseen configs, the same for every method)", "", hv_table(summary), "",
             "## Seen vs unseen", "", seen_unseen_table(summary), "",
             "## The unseen set", "", unseen_table(rows), "",
             "## Plots", ""]
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    parts += ["", f"## Every row (perplexity: {protocol})", "", rows_table(rows, tasks), ""]
    return "\n".join(parts)
