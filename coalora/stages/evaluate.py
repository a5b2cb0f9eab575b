"""Stage ``evaluate``: every method at seen and unseen configs (METHOD.md §7), one row per (method, config).

The rows are independent jobs, so an orchestrator can fan them out (one Prefect task each):

    jobs(params, ctx)             → stable job ids ``<method>__<config id>`` (``coalora.evaluate.plan``)
    run_job(params, ctx, job_id)  → scores one row (``coalora.evaluate.row``), writes
                                    ``ctx.work/rows/<job id>.json`` atomically and returns the row; an
                                    intact row made under the same key is reused, not re-scored
    run(params, ctx)              → the stage: every job not yet done, then the table

Writes

    table.csv, table.json   one row per (method, config): bits, seen/unseen, perplexity (with its protocol),
                            accuracy (and acc_norm) per task, mean accuracy, seconds
    jobs.json               the plan: which config, adapter and budgets each row comes from
    metrics.json            flat means per method and set (``dvc metrics show``)

Rows live in ``artifacts/.work/evaluate/rows/`` until the stage succeeds, so an interrupted evaluation
resumes where it stopped. A row's key covers its job, the params that change its numbers and the digests of
the input artifacts: a row made from other inputs is re-scored, never reused.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from coalora.artifacts import content_id, folder_digest, read_json, write_json, write_text_atomic
from coalora.errors import UserError
from coalora.params import Params
from coalora.stages.core import Stage, StageContext

log = logging.getLogger("coalora.stages.evaluate")

DEPS = ("data", "base_model", "allocate", "train")
ROWS = "rows"
METRICS = "metrics.json"
TABLE = "table.csv"


def _plan(params: Params, ctx: StageContext):
    from coalora.evaluate.plan import plan

    return plan(ctx.input("train"), ctx.input("allocate"), params.evaluate.budgets)


def jobs(params: Params, ctx: StageContext) -> list[str]:
    """The stable ids of every row to score, in table order."""
    return [job.id for job in _plan(params, ctx)]


def row_key(params: Params, ctx: StageContext, job) -> str:
    """What a row's numbers depend on: its job, seed, quant/lora/eval params and the input digests."""
    return content_id({
        "job": job.to_dict(), "params": params.sections(("seed", "quant", "lora", "eval")),
        "inputs": {name: folder_digest(ctx.input(name)) for name in DEPS},
    }, length=64)


def _intact(path: Path, key: str) -> dict | None:
    """The saved row when it parses and was made under ``key``; else None (it is then re-scored)."""
    try:
        saved = read_json(path)
    except (OSError, ValueError):
        return None
    return saved.get("row") if isinstance(saved, dict) and saved.get("key") == key else None


def run_job(params: Params, ctx: StageContext, job_id: str) -> dict:
    """Score one row (or reuse its intact saved result); returns the row."""
    from coalora.evaluate.row import RowInputs, score_row

    planned = {job.id: job for job in _plan(params, ctx)}
    if job_id not in planned:
        raise UserError(f"evaluate: unknown job {job_id!r}; planned: {', '.join(planned) or 'none'}")
    job = planned[job_id]
    key = row_key(params, ctx, job)
    path = ctx.work / ROWS / f"{job_id}.json"
    if (row := _intact(path, key)) is not None:
        return row
    inputs = RowInputs({name: ctx.input(name) for name in DEPS}, params.eval, params.lora,
                       tuple(params.quant.target_modules), params.seed)
    row = score_row(job, inputs, ctx.work / "lm_eval" / job_id)
    write_json(path, {"key": key, "row": row})
    log.info("evaluate %s: %.3f bits %s, ppl %.3f, acc %.4f (%.1f s)", job_id, row["bits"], row["set"],
             row["ppl"], row["acc_mean"], row["eval_seconds"])
    return row


def run(params: Params, ctx: StageContext) -> dict:
    """The stage: every row (reusing finished ones), then table.csv, table.json, jobs.json, metrics.json."""
    from coalora.evaluate.table import flat_columns, method_means

    planned = _plan(params, ctx)
    rows = [run_job(params, ctx, job.id) for job in planned]
    write_json(ctx.out / "jobs.json", [job.to_dict() for job in planned])
    write_json(ctx.out / "table.json", {"tasks": list(params.eval.tasks), "budgets": params.evaluate.budgets,
                                        "limit": params.eval.limit, "rows": rows})
    write_text_atomic(ctx.out / TABLE, _csv(rows, params.eval.tasks))
    metrics = method_means(rows)
    write_json(ctx.out / METRICS, metrics)
    protocols = sorted({row["ppl_protocol"] for row in rows})
    return {"rows": len(rows), "methods": sorted({row["method"] for row in rows}), "ppl_protocol": protocols,
            "eval_seconds_per_row": round(sum(r["eval_seconds"] + r["switch_seconds"] for r in rows)
                                          / max(1, len(rows)), 3),
            "columns": flat_columns(params.eval.tasks)}


def _csv(rows: list[dict], tasks) -> str:
    from coalora.evaluate.table import flat_columns, flat_row

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=flat_columns(tasks), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat_row(row, tasks) for row in rows)
    return buffer.getvalue()


STAGE = Stage(
    name="evaluate",
    fn=run,
    params=("seed", "quant", "lora", "eval", "evaluate"),
    deps=DEPS,
    code=("coalora/evaluate", "coalora/model", "coalora/quant", "coalora/space.py", "coalora/train/bnb.py",
          "coalora/data/layout.py", "coalora/stages/evaluate.py"),
    metrics=(METRICS,),
    description="every method at seen and unseen configs: perplexity (named protocol) and lm-eval zero-shot "
                "accuracy, one row per (method, config)",
)
