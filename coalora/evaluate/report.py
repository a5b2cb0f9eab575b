"""The report: markdown tables, PNG plots of each metric vs bits, and the CSV files DVC plots.

    plots/<metric>.png     metric vs average bits, one series per method (colour), seen rows filled markers,
                           unseen rows hollow; the full-precision base model as a dotted line when known
    dvc/<method>.csv       the method's rows (bits, set, every metric) for ``dvc plots show``
    report.md              setup, summary per method (HV with its definition, gaps, times), the full table

matplotlib is imported inside :func:`write_plots` with the Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from coalora.artifacts import write_text_atomic
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


def dvc_csv(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    """One method's rows sorted by bits: bits, set, config id, then each metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(dvc_columns(metrics))
    for r in sorted(rows, key=lambda r: (r["bits"], r["config_id"])):
        writer.writerow([round(r["bits"], 6), r["set"], r["config_id"]]
                        + [round(metric_value(r, m), 6) for m in metrics])
    return buffer.getvalue()


def write_dvc_files(out: Path, rows: Sequence[dict], metrics: Sequence[str], methods: Sequence[str]) -> list[str]:
    """``dvc/<method>.csv`` for every method of ``methods`` (header only when it has no rows, so the plot
    definitions in dvc.yaml always find their files). Returns the paths written, relative to ``out``."""
    written = []
    for method in methods:
        rel = f"{DVC_DIR}/{method}.csv"
        write_text_atomic(out / rel, dvc_csv([r for r in rows if r["method"] == method], metrics))
        written.append(rel)
    return written


def write_plots(out: Path, rows: Sequence[dict], metrics: Sequence[str], base: dict | None = None) -> list[str]:
    """``plots/<metric>.png`` for each metric (module docstring). Returns the paths, relative to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab10")
    protocol = rows[0]["ppl_protocol"] if rows else None
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for i, method in enumerate(methods):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bits"])
            colour = colours(i % 10)
            xs, ys = [r["bits"] for r in mine], [metric_value(r, metric) for r in mine]
            ax.plot(xs, ys, color=colour, linewidth=1, alpha=0.5)
            for which, face in (("seen", colour), ("unseen", "none")):
                pts = [(x, y) for x, y, r in zip(xs, ys, mine) if r["set"] == which]
                if pts:
                    ax.scatter(*zip(*pts), s=36, facecolors=face, edgecolors=[colour],
                               label=f"{method} ({which})")
        if base is not None and base.get(metric) is not None:
            ax.axhline(base[metric], color="grey", linestyle=":", label="full precision")
        ax.set_xlabel("average bits per parameter")
        ax.set_ylabel(metric_label(metric, protocol))
        ax.set_title(f"{metric_label(metric, protocol)} vs bits: filled = seen, hollow = unseen", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        rel = f"{PLOTS_DIR}/{metric}.png"
        # No timestamp in the PNG's metadata, so the same table gives the same file.
        fig.savefig(out / rel, metadata={"Software": None})
        plt.close(fig)
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


def _table(header: Sequence[str], lines: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in lines]
    return "\n".join(out)


def summary_table(summary: dict) -> str:
    """One line per method: HV of mean accuracy and perplexity (all / seen / unseen), gaps, times."""
    b = summary["baseline"]
    k = next(iter(summary["times"].values()))["serve_k"] if summary["times"] else "K"
    header = ["method", "HV acc_mean", "HV acc_mean seen", "HV acc_mean unseen", "HV ppl", "HV ppl seen",
              "HV ppl unseen", f"acc gap vs {b} (pts)", "seen−unseen acc (pts)", "ppl unseen/seen",
              "train s", f"serve K={k} s"]
    lines = []
    for method, hv in summary["hv"].items():
        t, su = summary["times"][method], summary["seen_unseen_gap"][method]
        lines.append([method, hv["acc_mean"]["all"], hv["acc_mean"]["seen"], hv["acc_mean"]["unseen"],
                      hv["ppl"]["all"], hv["ppl"]["seen"], hv["ppl"]["unseen"],
                      summary[f"gap_vs_{b}"][method]["gap"], su["acc_gap"], su["ppl_ratio"],
                      t["train_seconds"], t["serve_k_seconds"]])
    return _table(header, lines)


def task_hv_table(summary: dict) -> str:
    metrics = summary["metrics"]
    lines = [[method] + [hv[m]["all"] for m in metrics] for method, hv in summary["hv"].items()]
    return _table(["method"] + [f"HV {m}" for m in metrics], lines)


def times_table(summary: dict) -> str:
    lines = [[m, t["kind"], t["train_seconds"], t["search_seconds"], t["runs"], t["run_seconds"],
              t["switch_seconds"], t["serve_k_seconds"], t["serve_rule"]] for m, t in summary["times"].items()]
    return _table(["method", "kind", "train s (incl. search)", "of which search s", "runs", "s per run",
                   "switch s (median)", "serve K s", "rule"], lines)


def rows_table(rows: Sequence[dict], tasks: Sequence[str]) -> str:
    header = ["method", "config", "set", "bits", *tasks, "acc_mean", "ppl"]
    lines = [[r["method"], r["config_id"], r["set"], r["bits"], *[r["tasks"][t]["acc"] for t in tasks],
              r["acc_mean"], r["ppl"]] for r in rows]
    return _table(header, lines)


def _items(rows: Sequence[dict], tasks: Sequence[str]) -> dict[str, int | None]:
    """Items scored per task (the same for every row: the first ``eval.limit``)."""
    return {t: rows[0]["tasks"][t]["n"] if rows else None for t in tasks}


def markdown(rows: Sequence[dict], tasks: Sequence[str], summary: dict, setup: dict, plots: Sequence[str],
             base: dict | None = None) -> str:
    """The whole report.md."""
    protocol = ", ".join(sorted({r["ppl_protocol"] for r in rows})) or "–"
    parts = [
        "# coalora evaluation report",
        "",
        f"- rows: {len(rows)} (method × config); budgets {setup['budgets']}; per budget each method's nearest "
        "seen config and the nearest held-out (unseen) config",
        f"- perplexity protocol: **{protocol}** (C4-schema validation text)",
        f"- zero-shot accuracy: lm-eval's own task definitions on the in-memory quantized model; the first "
        f"{setup['limit'] if setup['limit'] is not None else 'all'} items of each task (items per task: "
        f"{', '.join(f'{t} {n}' for t, n in _items(rows, tasks).items())})",
        "- hypervolume definitions (higher is better):",
        *[f"  - `{m}`: {d}" for m, d in summary["hv_definition"].items()],
        f"- time to serve K = {setup['serve_k']} configurations: joint methods T_train + K·t_switch; per-config "
        "methods K·(t_run + t_switch); t_switch = median time to quantize every layer to a config (and run θ)",
    ]
    if base:
        parts.append(f"- full-precision base model: mean accuracy {_fmt(base.get('acc_mean'))}, perplexity "
                     f"{_fmt(base.get('ppl'))}")
    parts += ["", "## Summary per method", "", summary_table(summary), "",
              "## Hypervolume per metric (all rows)", "", task_hv_table(summary), "",
              "## Time", "", times_table(summary), "", "## Plots", ""]
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    parts += ["", f"## Every row (perplexity: {protocol})", "", rows_table(rows, tasks), ""]
    return "\n".join(parts)
