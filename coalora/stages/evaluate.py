"""Stage ``evaluate``: every method at the targets, its seen configs and the common unseen set, plus the
reference rows (METHOD.md §7); one row per (method, config), with per-item results.

The rows are independent jobs, so an orchestrator can fan them out (one Prefect task each):

    jobs(params, ctx)             → stable job ids ``<method>__<config id>`` (``coalora.evaluate.plan``)
    run_job(params, ctx, job_id)  → scores one row (``coalora.evaluate.row``), writes
                                    ``ctx.work/rows/<job id>.json`` atomically and returns the row; an
                                    intact row made under the same key is reused, not re-scored
    evaluate_rows(params, ctx)    → the stage: every job not yet done, then the table

Writes

    table.csv, table.json   one row per (method, config): set (target | seen | unseen | reference), bits,
                            layers_from_trained (unseen rows), perplexity (with its protocol), accuracy (and
                            acc_norm) per task, mean accuracy, seconds
    items.safetensors       per-item results of every row (``coalora.evaluate.items``)
    jobs.json               the plan: which config, adapter and set each row comes from
    metrics.json            flat means per method and set (``dvc metrics show``)

Planning asserts that no method drew an unseen config. Rows live in ``artifacts/.work/evaluate/rows/`` until
the stage succeeds, so an interrupted evaluation resumes where it stopped. A row's key covers its job, the
params that change its numbers and the digests of the input artifacts: a row made from other inputs is
re-scored, never reused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from coalora import interrupt
from coalora.artifacts import content_id, folder_digest, read_json, write_json
from coalora.data.summary import BENCHMARK_NAMES
from coalora.errors import UserError
from coalora.params import Params
from coalora.stages.core import Stage, StageContext
from coalora.trained import read_targets

log = logging.getLogger("coalora.stages.evaluate")
_WORKER: tuple | None = None  # (params, ctx, scorer) of a scoring process (``_worker_init``)

DEPS = ("data", "base_model", "allocate", "train")
ROWS = "rows"
METRICS = "metrics.json"


def _plan(params: Params, ctx: StageContext):
    from coalora.evaluate.plan import plan

    return plan({name: ctx.input(name) for name in DEPS}, params.evaluate.seen_budgets, params.evaluate.sets)


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


class _Scorer:
    """Scores jobs in this process: lm-eval's task objects are built once, on first use, and reused."""

    def __init__(self, params: Params, ctx: StageContext):
        self.params, self.ctx, self._benchmarks = params, ctx, None

    def __call__(self, job) -> dict:
        from coalora.evaluate.harness import Benchmarks
        from coalora.evaluate.row import RowInputs, score_row

        p = self.params
        if self._benchmarks is None:
            # one scratch folder per process: Benchmarks clears its folder, and scoring processes run at once
            self._benchmarks = Benchmarks(self.ctx.input("data"), p.eval.tasks, p.eval.limit,
                                          self.ctx.work / "lm_eval" / str(os.getpid()))
        dtype = read_targets(self.ctx.input("train"))["dtype"]  # what the methods trained in
        inputs = RowInputs({name: self.ctx.input(name) for name in DEPS}, p.eval, p.lora,
                           tuple(p.quant.target_modules), p.seed, dtype)
        return score_row(job, inputs, self._benchmarks)


def run_job(params: Params, ctx: StageContext, job_id: str, scorer: _Scorer | None = None) -> dict:
    """Score one row (or reuse its intact saved result); returns the row."""
    planned = {job.id: job for job in _plan(params, ctx)}
    if job_id not in planned:
        raise UserError(f"evaluate: unknown job {job_id!r}; planned: {', '.join(planned) or 'none'}")
    return _score(params, ctx, planned[job_id], scorer or _Scorer(params, ctx))


def _score(params: Params, ctx: StageContext, job, scorer: _Scorer) -> dict:
    key = row_key(params, ctx, job)
    path = ctx.work / ROWS / f"{job.id}.json"
    if (row := _intact(path, key)) is not None:
        return row
    interrupt.check()  # a stop request ends the stage between rows; finished rows stay in the work folder
    row = scorer(job)
    write_json(path, {"key": key, "row": row})
    log.info("evaluate %s: %.3f bits %s, ppl %.3f, acc %.4f (%.1f s)", job.id, row["bits"], row["set"],
             row["ppl"], row["acc_mean"], row["eval_seconds"])
    return row


WORKERS_ENV = "COALORA_EVAL_WORKERS"
ROWS_PER_WORKER = 8  # a scoring process costs seconds to start (imports, lm-eval tasks): only for enough rows


def eval_workers(n_jobs: int) -> int:
    """Processes scoring rows at once: ``$COALORA_EVAL_WORKERS``, else one per CPU core; at most one per
    ``ROWS_PER_WORKER`` rows (one process, the stage's own, below that).

    Every row runs on one torch thread, loads its own model and is scored on its own, so its numbers do not
    depend on how many run beside it: this is an execution setting, not a parameter of the results.
    """
    raw = os.environ.get(WORKERS_ENV)
    try:
        wanted = int(raw) if raw else (os.cpu_count() or 1)
    except ValueError:
        raise UserError(f"{WORKERS_ENV}: {raw!r} is not a whole number of processes") from None
    if wanted < 1:
        raise UserError(f"{WORKERS_ENV}: {wanted}; allowed: 1 or more processes")
    from coalora.parallel import compute_device

    if compute_device().type != "cpu" and not raw:
        return 1  # one process drives the GPU; CPU cores would only queue behind it
    return max(1, min(wanted, n_jobs // ROWS_PER_WORKER))


def _worker_init(params: dict, ctx: dict) -> None:
    """A scoring process: params and context rebuilt from JSON-able values (nothing pickled but those).

    It ignores Ctrl-C: the terminal sends it to the whole process group, and the stage's own process stops
    the scoring (coalora.interrupt), which ends these processes; each would otherwise print a traceback.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _WORKER
    params_ = Params.model_validate(params)
    context = StageContext(root=Path(ctx["root"]), out=Path(ctx["out"]), work=Path(ctx["work"]),
                           inputs={k: Path(v) for k, v in ctx["inputs"].items()}, progress=False)
    _WORKER = (params_, context, _Scorer(params_, context))


def _worker_score(job_id: str) -> str:
    params, ctx, scorer = _WORKER
    job = {j.id: j for j in _plan(params, ctx)}[job_id]
    row = _score(params, ctx, job, scorer)
    return f"{job.id}: {row['bits']:.3f} bits {row['set']}, ppl {row['ppl']:.3f}, acc {row['acc_mean']:.4f}"


def _score_in_processes(params: Params, ctx: StageContext, jobs: list, workers: int) -> None:
    """Score ``jobs`` in ``workers`` spawned processes; each writes its rows into the work folder."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    state = {"root": str(ctx.root), "out": str(ctx.out), "work": str(ctx.work),
             "inputs": {k: str(v) for k, v in ctx.inputs.items()}}
    log.info("evaluate: %d rows on %d processes", len(jobs), workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(params.model_dump(mode="json"), state)) as pool:
        try:
            for done, line in enumerate(pool.map(_worker_score, [job.id for job in jobs]), 1):
                log.info("evaluate %d/%d %s", done, len(jobs), line)
                interrupt.check()  # stopped: the rows scored so far stay in the work folder
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # rows not yet started are not started
            raise


def evaluate_rows(params: Params, ctx: StageContext) -> dict:
    """The stage: every row (reusing finished ones), then table.csv, table.json, items.safetensors,
    jobs.json, metrics.json."""
    from coalora.evaluate.items import FILE, write_items
    from coalora.evaluate.table import flat_columns, method_means, write_table

    planned = _plan(params, ctx)
    todo = [job for job in planned if _intact(ctx.work / ROWS / f"{job.id}.json", row_key(params, ctx, job)) is None]
    workers = eval_workers(len(todo))
    if workers > 1:
        _score_in_processes(params, ctx, todo, workers)
    scorer = _Scorer(params, ctx)
    rows = [_score(params, ctx, job, scorer) for job in planned]  # finished rows are read back, not re-scored
    write_items(ctx.out / FILE, rows, params.eval.tasks)
    rows = [{k: v for k, v in row.items() if k != "items"} for row in rows]
    write_json(ctx.out / "jobs.json", [job.to_dict() for job in planned])
    write_table(ctx.out, rows, params.eval.tasks, limit=params.eval.limit,
                seen_budgets=params.evaluate.seen_budgets,
                benchmarks=benchmark_names(ctx.input("data"), params.eval.tasks))
    metrics = method_means(rows)
    write_json(ctx.out / METRICS, metrics)
    protocols = sorted({row["ppl_protocol"] for row in rows})
    return {"rows": len(rows), "methods": sorted({row["method"] for row in rows}), "ppl_protocol": protocols,
            "eval_seconds_per_row": round(sum(r["eval_seconds"] + r["switch_seconds"] for r in rows)
                                          / max(1, len(rows)), 3),
            "columns": flat_columns(params.eval.tasks)}




def benchmark_names(data_dir: Path, tasks) -> dict[str, str]:
    """task → what its items are, for the report: the data stage's own description when it gives one
    (``benchmarks`` in its summary: a string, or an object with a ``name``), else the task's name and the
    data source."""
    summary = read_json(data_dir / "stage.json")["summary"]
    given = summary.get("benchmarks") if isinstance(summary.get("benchmarks"), dict) else {}
    source = summary.get("source", "?")
    fallback = {"embedded": "{name}-format questions about the embedded world's facts"}.get(
        source, "{name} (" + source + " data)")
    names = {}
    for t in tasks:
        description = given.get(t)
        if isinstance(description, dict):
            description = description.get("name")
        names[t] = description if isinstance(description, str) else fallback.format(
            name=BENCHMARK_NAMES.get(t, t))
    return names


STAGE = Stage(
    name="evaluate",
    fn=evaluate_rows,
    params=("seed", "quant", "lora", "eval", "evaluate"),
    deps=DEPS,
    metrics=(METRICS,),
    description="every method and the quantized base at the targets, seen and unseen configs, and the reference "
                "rows: perplexity (named protocol) and lm-eval zero-shot accuracy with per-item results",
)
