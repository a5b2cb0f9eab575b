"""Stage ``report``: summary metrics over the evaluation table, and the report (METHOD.md §7).

Reads the evaluate stage's table, the train stage's times and the base model's scores; writes

    summary.json      hypervolume per method and metric (all / seen / unseen) with its definition, accuracy
                      gap vs qlora, seen-vs-unseen gap, training time and time to serve K configs
    metrics.json      the same, flat, for ``dvc metrics show``
    report.md         the tables and the plots below
    plots/<m>.png     each metric vs bits, one series per method, seen / unseen marked
    dvc/<method>.csv  per-method rows for ``dvc plots show`` (plot definitions: ``DVC_PLOTS``, in dvc.yaml)

A separate stage from ``evaluate`` so that changing ``report`` params (HV reference, K) re-runs in a second
without re-scoring any row.
"""

from __future__ import annotations

from pathlib import Path

from coalora.artifacts import read_json, write_json, write_text_atomic
from coalora.params import TRAIN_METHODS, Params
from coalora.stages.core import Stage, StageContext

METRICS = "metrics.json"
# Plots `dvc plots show` renders: metric vs bits, one series per method (one file each). Only metrics every
# run has (the task list is a parameter); the PNGs in plots/ cover every task.
DVC_METRICS = ("acc_mean", "ppl")


def base_scores(base_dir: Path, rows: list[dict], tasks) -> dict | None:
    """The full-precision base model's scores in the table's metric names, each only where it was measured
    as the rows were (same perplexity protocol, same number of items per task); None when unavailable."""
    path = Path(base_dir) / "metrics.json"
    if not path.is_file() or not rows:
        return None
    m = read_json(path)
    scores: dict = {}
    for t in tasks:
        same = m.get(f"{t}_n") == rows[0]["tasks"][t]["n"]
        scores[t] = m.get(f"{t}_acc") if same else None
        scores[f"{t}_norm"] = m.get(f"{t}_acc_norm") if same else None
    accs = [scores[t] for t in tasks]
    scores["acc_mean"] = sum(accs) / len(accs) if None not in accs else None
    scores["ppl"] = m.get("ppl") if m.get("ppl_protocol") == rows[0]["ppl_protocol"] else None
    return scores


def run(params: Params, ctx: StageContext) -> dict:
    """The stage function (module docstring); returns the flat metrics' headline numbers."""
    from coalora.evaluate.report import markdown, write_dvc_files, write_plots
    from coalora.evaluate.summary import flat_metrics, summarise

    table = read_json(ctx.input("evaluate") / "table.json")
    rows, tasks = table["rows"], table["tasks"]
    summary = summarise(rows, tasks, ctx.input("train"), params.report)
    base = base_scores(ctx.input("base_model"), rows, tasks)
    write_json(ctx.out / "summary.json", summary)
    flat = flat_metrics(summary)
    write_json(ctx.out / METRICS, flat)
    methods = list(TRAIN_METHODS) + sorted({r["method"] for r in rows} - set(TRAIN_METHODS))
    write_dvc_files(ctx.out, rows, summary["metrics"], methods)
    plots = write_plots(ctx.out, rows, summary["metrics"], base)
    setup = {"budgets": table["budgets"], "limit": table["limit"], "serve_k": params.report.serve_k}
    write_text_atomic(ctx.out / "report.md", markdown(rows, tasks, summary, setup, plots, base))
    return {"report": "report.md", "plots": plots,
            "hv_acc_mean": {m: v["acc_mean"]["all"] for m, v in summary["hv"].items()},
            "hv_definition": summary["hv_definition"]["acc_mean"]}


def dvc_plots() -> list[dict]:
    """Plot definitions for dvc.yaml: for each metric of ``DVC_METRICS``, y = that column of every
    ``dvc/<method>.csv`` (a series per method), x = bits, as a scatter. Paths relative to the output."""
    return [{f"{metric} vs bits": {"template": "scatter", "x": "bits",
                                   "y": {f"dvc/{method}.csv": metric for method in TRAIN_METHODS},
                                   "x_label": "average bits", "y_label": metric}}
            for metric in DVC_METRICS]


STAGE = Stage(
    name="report",
    fn=run,
    params=("report",),
    deps=("base_model", "train", "evaluate"),
    code=("coalora/evaluate", "coalora/pareto.py", "coalora/stages/report.py"),
    metrics=(METRICS,),
    plots=tuple(f"dvc/{method}.csv" for method in TRAIN_METHODS),
    description="hypervolume, gaps vs qlora and seen-vs-unseen, training and serving time; report.md with plots",
    extra={"dvc_plots": dvc_plots()},
)
