"""Stage ``train``: CoA-LoRA and the baselines, each trained for the same target configs (METHOD.md §4, §6).

Reads the base model (``base_model``), the fine-tuning data (``data``, split by ``coalora.train.heldout``),
the pool and the common unseen set (``allocate``; the search never proposes an unseen config); trains each
method of ``train.methods`` (the table in ``coalora.train.methods``) and writes, for each, its adapter file(s),
train.json, drawn configs and losses, plus targets.json and metrics.json: the layout and every file's writer
and reader are ``coalora.trained`` (the writers: ``coalora.trained.write``).

Checkpoints live in ``artifacts/.work/train/<method>/``, which survives a failed attempt: a re-run resumes
there (finished methods and runs are loaded, not retrained). Checkpoints made from other inputs or params are
discarded, never resumed.

Data-parallel: ``accelerate launch --multi_gpu --num_processes N -m coalora.cli stage train`` runs this stage on N
ranks (``coalora.parallel``): each trains on its share of every batch, the main process writes.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from coalora import parallel
from coalora.artifacts import content_id, folder_digest, read_json, write_json
from coalora.params import Params
from coalora.stages.core import Stage, StageContext
from coalora.trained import METRICS
from coalora.trained.write import write_method, write_metrics, write_targets

log = logging.getLogger("coalora.stages.train")

INPUTS = "inputs.json"


def method_work(ctx: StageContext, params: Params, method: str) -> Path:
    """``ctx.work/<method>``, emptied first when its checkpoints were made from other inputs or params."""
    fingerprint = content_id({
        "method": method, "seed": params.train_seed,
        "sections": params.sections(("quant", "lora", "search")),
        "train": {k: v for k, v in params.sections(("train",))["train"].items() if k != "methods"},
        "inputs": {name: folder_digest(path) for name, path in sorted(ctx.inputs.items())},
    }, length=64)
    work = ctx.work / method
    if parallel.is_main():  # launched: the main process alone writes checkpoints; the others wait for it
        if (work / INPUTS).is_file() and read_json(work / INPUTS).get("fingerprint") != fingerprint:
            log.warning("train %s: discarding checkpoints made from other inputs or params (%s)", method, work)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / INPUTS, {"fingerprint": fingerprint})
    parallel.wait()
    return work


def train_methods(params: Params, ctx: StageContext) -> dict:
    """Train every method of ``train.methods``; returns the summary."""
    from coalora.model.load import load_base
    from coalora.space import quantized_layers
    from coalora.train import METHODS, TrainSetup, load_pool, target_set, train_method
    from coalora.train.heldout import f1_slice, training_data
    from coalora.train.methods import check_pool_methods
    from coalora.train.targets import UNSEEN

    p = params.train
    base_dir = ctx.input("base_model")
    base, tokenizer = load_base(base_dir, p.dtype)
    layers = quantized_layers(base, params.quant.target_modules)
    del base
    pool = load_pool(ctx.input("allocate"), layers)
    unseen = load_pool(ctx.input("allocate"), layers, UNSEEN)
    targets = target_set(pool, p.target_bits)
    check_pool_methods(p, params.search.rounds, len(pool), len(targets))
    if parallel.launched():
        parallel.check_batch_size(p.batch_size)
    batches, eval_batch = training_data(params, tokenizer, ctx.input("data"))
    setup = TrainSetup(p, params.lora, params.train_seed, lambda: load_base(base_dir, p.dtype)[0], layers, pool,
                       targets, batches, eval_batch, ctx.progress, search=params.search,
                       f1_batch=f1_slice(params, tokenizer, ctx.input("data")), unseen=unseen)
    target_rows = [{"id": c.id, "bits": c.bits, "target_bits": b} for c, b in zip(targets, p.target_bits)]
    write_targets(ctx.out, target_rows, len(pool), len(unseen), p.dtype, params.train_seed, p.steps_per_config)
    records = {}
    for name in p.methods:
        started = time.perf_counter()
        result = train_method(METHODS[name], setup, method_work(ctx, params, name))
        records[name] = write_method(ctx.out / name, result, setup, target_rows, time.perf_counter() - started)
        log.info("train %s: %s", name, _line(records[name]))
    write_metrics(ctx.out, records)
    return {"targets": target_rows, "pool": len(pool), "methods": {n: _brief(r) for n, r in records.items()}}


def _brief(r: dict) -> dict:
    if r["skipped"]:
        return {"skipped": r["skipped"]}
    return {"steps": r["steps"], "config_steps": r["config_steps"], "seconds": r["seconds"],
            "final_loss": round(r["final_loss"], 4),
            "eval_loss_before": round(r["eval_loss_before_mean"], 4),
            "eval_loss_after": round(r["eval_loss_after_mean"], 4)}


def _line(r: dict) -> str:
    b = _brief(r)
    return ", ".join(f"{k} {v}" for k, v in b.items())


STAGE = Stage(
    name="train",
    fn=train_methods,
    params=("seed", "quant", "lora", "train", "search"),
    deps=("data", "base_model", "allocate"),
    metrics=(METRICS,),
    description="CoA-LoRA and the baselines trained for the same target configs (checkpointed, resumable)",
    extra={"data_parallel": True},  # runs under `accelerate launch` (coalora.parallel)
)
