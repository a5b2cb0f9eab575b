"""Stage ``report``: summary statistics with intervals, the claims table, and the report (METHOD.md §7).

Reads the evaluate stage's table and per-item results, and the train stage's records; writes

    summary.json      every statistic of ``coalora.evaluate.statistics`` with its paired bootstrap interval:
                      hypervolume per method and metric (over the target + unseen configs, definition beside
                      it), gaps vs ``report.baseline`` and coalora vs every method, quantization damage and
                      recovery, seen vs unseen, compute (config-steps, seconds) and the cost to serve K configs
    claims.json       the claims table (``coalora.evaluate.claims``): claim, metric, ours, ci_low, ci_high,
                      paper, verdict
    metrics.json      observed values, flat, for ``dvc metrics show``
    report.md         the tables and the plots below
    plots/<m>.png     each metric vs bits, one series per method; target / seen / unseen markers
    dvc/<method>.csv  per-method rows for ``dvc plots show`` (plot definitions: ``dvc_plots``, in dvc.yaml)

A separate stage from ``evaluate`` so that changing ``report`` params (HV reference, K, margins, bootstrap)
re-runs in seconds without re-scoring any row.
"""

from __future__ import annotations

from coalora.artifacts import write_json, write_text_atomic
from coalora.params import TRAIN_METHODS, Params
from coalora.stages.core import Stage, StageContext
from coalora.trained import read_targets

METRICS = "metrics.json"
# Plots `dvc plots show` renders: metric vs bits, one series per method (one file each). Only metrics every
# run has (the task list is a parameter); the PNGs in plots/ cover every task.
DVC_METRICS = ("acc_mean", "ppl")
PLOT_METHODS = ("none", *TRAIN_METHODS)


def write_report(params: Params, ctx: StageContext) -> dict:
    """The stage function (module docstring); returns the claims' verdicts and the headline numbers."""
    from coalora.evaluate.bootstrap import Resampler
    from coalora.evaluate.claims import build_claims, check_claims
    from coalora.evaluate.items import FILE, read_items
    from coalora.evaluate.render import markdown, write_dvc_files, write_plots
    from coalora.evaluate.statistics import Stats, flat_metrics, summarise
    from coalora.evaluate.table import read_table

    p = params.report
    table = read_table(ctx.input("evaluate"))
    rows, tasks = table["rows"], table["tasks"]
    items, meta = read_items(ctx.input("evaluate") / FILE)
    stats = Stats(rows, Resampler(items, tasks, meta["tokens_per_window"], p.bootstrap.resamples, p.bootstrap.seed),
                  p.bootstrap.confidence)
    summary = summarise(stats, tasks, ctx.input("train"), p)
    targets = read_targets(ctx.input("train"))
    claims = build_claims(summary, p.claims, p.serve_k, targets["steps_per_config"])
    check_claims(claims)
    write_json(ctx.out / "summary.json", summary)
    write_json(ctx.out / "claims.json", claims)
    write_json(ctx.out / METRICS, flat_metrics(summary))
    write_dvc_files(ctx.out, rows, summary["metrics"], PLOT_METHODS)
    plots = write_plots(ctx.out, rows, summary["metrics"])
    write_text_atomic(ctx.out / "report.md", markdown(rows, tasks, summary, claims, plots, table, targets))
    return {"report": "report.md", "plots": plots,
            "claims": [{"claim": c["claim"], "verdict": c["verdict"]} for c in claims],
            "hv_acc_mean": {m: v["acc_mean"]["value"] for m, v in summary["hv"].items()}}


def dvc_plots() -> list[dict]:
    """Plot definitions for dvc.yaml: for each metric of ``DVC_METRICS``, y = that column of every
    ``dvc/<method>.csv`` (a series per method), x = bits, as a scatter. Paths relative to the output."""
    return [{f"{metric} vs bits": {"template": "scatter", "x": "bits",
                                   "y": {f"dvc/{method}.csv": metric for method in PLOT_METHODS},
                                   "x_label": "average bits", "y_label": metric}}
            for metric in DVC_METRICS]


STAGE = Stage(
    name="report",
    fn=write_report,
    params=("report",),
    deps=("train", "evaluate"),
    metrics=(METRICS,),
    plots=tuple(f"dvc/{method}.csv" for method in PLOT_METHODS),
    description="statistics with paired bootstrap intervals, the claims table, report.md with plots",
    extra={"dvc_plots": dvc_plots()},
)
