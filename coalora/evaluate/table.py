"""The evaluation table: rows (``row.score_row``) as flat CSV records, and per-method means; the one writer
and reader of the evaluate stage's ``table.json`` (every row whole, with the tasks, limit, seen budgets and
benchmark names) and ``table.csv`` (the flat records, for reading and DVC plots).

Column names: ``<task>`` is the task's accuracy, ``<task>_norm`` its length-normalised accuracy (ARC only:
lm-eval reports ``acc_norm`` for multiple-choice tasks with answers of different lengths), ``acc_mean`` the
unweighted mean accuracy over the tasks, ``ppl`` the perplexity under ``ppl_protocol``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from coalora.artifacts import read_json, write_csv, write_json

ID_COLUMNS = ("method", "config_id", "set", "bits", "layers_from_trained", "budgets", "adapter_config")
TAIL_COLUMNS = ("acc_mean", "ppl", "ppl_protocol", "switch_seconds", "eval_seconds")
TABLE_JSON, TABLE_CSV = "table.json", "table.csv"


def has_norm(task: str) -> bool:
    return task.startswith("arc")


def metric_columns(tasks: Sequence[str]) -> list[str]:
    """The accuracy columns: each task (and ``<task>_norm`` for ARC), then ``acc_mean``."""
    cols = []
    for task in tasks:
        cols.append(task)
        if has_norm(task):
            cols.append(f"{task}_norm")
    return cols + ["acc_mean"]


def flat_columns(tasks: Sequence[str]) -> list[str]:
    return list(ID_COLUMNS) + metric_columns(tasks)[:-1] + list(TAIL_COLUMNS)


def flat_row(row: dict, tasks: Sequence[str]) -> dict:
    """One row as a flat record (numbers rounded for reading; table.json keeps them whole)."""
    flat = {"method": row["method"], "config_id": row["config_id"], "set": row["set"],
            "bits": round(row["bits"], 4), "budgets": " ".join(f"{b:g}" for b in row["budgets"]),
            "layers_from_trained": "" if row["layers_from_trained"] is None else row["layers_from_trained"],
            "adapter_config": row["adapter_config"] or ""}
    for task in tasks:
        scores = row["tasks"][task]
        flat[task] = round(scores["acc"], 4)
        if has_norm(task):
            flat[f"{task}_norm"] = "" if scores["acc_norm"] is None else round(scores["acc_norm"], 4)
    flat.update({"acc_mean": round(row["acc_mean"], 4), "ppl": round(row["ppl"], 4),
                 "ppl_protocol": row["ppl_protocol"], "switch_seconds": row["switch_seconds"],
                 "eval_seconds": row["eval_seconds"]})
    return flat


def metric_value(row: dict, metric: str) -> float:
    """A row's value of a metric column: ``ppl``, ``acc_mean``, ``<task>`` or ``<task>_norm``."""
    if metric in ("ppl", "acc_mean"):
        return float(row[metric])
    if metric.endswith("_norm"):
        return float(row["tasks"][metric[:-5]]["acc_norm"])
    return float(row["tasks"][metric]["acc"])


def method_means(rows: Sequence[dict]) -> dict[str, float]:
    """``<method>.<set>.acc_mean`` (mean accuracy) and ``.ppl`` (exp of the mean per-token NLL, the geometric
    mean of the rows' perplexities) per row kind (target, seen, unseen, reference), for ``dvc metrics show``."""
    from coalora.evaluate.plan import SETS

    out: dict[str, float] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for name, subset in [(kind, [r for r in mine if r["set"] == kind]) for kind in SETS]:
            if subset:
                out[f"{method}.{name}.acc_mean"] = round(sum(r["acc_mean"] for r in subset) / len(subset), 6)
                out[f"{method}.{name}.ppl"] = round(math.exp(sum(r["nll"] for r in subset) / len(subset)), 6)
                out[f"{method}.{name}.rows"] = len(subset)
    return out


def write_table(folder: Path, rows: Sequence[dict], tasks: Sequence[str], **header) -> None:
    """``table.json`` (``header`` fields, ``tasks`` and the whole ``rows``, items left out) and ``table.csv``
    (:func:`flat_row` of each row) in ``folder``."""
    write_json(Path(folder) / TABLE_JSON, {**header, "tasks": list(tasks), "rows": list(rows)})
    write_csv(Path(folder) / TABLE_CSV, flat_columns(tasks), [flat_row(row, tasks) for row in rows])


def read_table(folder: Path) -> dict:
    """The evaluate stage's ``table.json``: ``rows``, ``tasks``, ``limit``, ``seen_budgets``, ``benchmarks``."""
    return read_json(Path(folder) / TABLE_JSON)
