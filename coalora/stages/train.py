"""Stage ``train``: CoA-LoRA and the baselines, each trained for the same target configs (METHOD.md §4, §6).

Reads the base model (``base_model``), the fine-tuning data (``data``), the pool and the common unseen set
(``allocate``; the search never proposes an unseen config); for each method of ``train.methods`` (the table
in ``coalora.train.methods``) writes

    <method>/adapter.safetensors              joint methods (coalora family, shared): the one adapter (+ θ)
    <method>/<config id>/adapter.safetensors  per-config methods (qlora, lqlora, qlora-bnb): one per config
    <method>/train.json                       steps, config-steps, seconds, losses, configs, K, target bits,
                                              compute rule, ``config_draws`` (config id → steps trained under it:
                                              a config is *seen* by a method iff it is drawn here);
                                              pool methods: ``rounds`` (per search round: step, pool with
                                              bits and f1, front, hypervolume and its reference, proposals)
    <method>/configs/<config id>.json         every config the method drew (``Config.save`` files)
    <method>/pool/<config id>.json            pool methods (coalora, coalora-frozen, coalora-random): the
                                              FINAL pool, each a ``Config.save`` file
    <method>/rounds.csv                       pool methods: round, id, bits, f1, in_pool, on_front
    <method>/loss.csv                         step, run, loss (per-config runs follow each other)
    targets.json                              the target set (id, bits, target bits), pool and unseen sizes,
                                              the training dtype and seed
    metrics.json                              flat: final loss, held-out loss before/after, seconds per method

Adapter files are ``CoAModel.adapter_state_dict()`` (peft's format for qlora-bnb) with a JSON header
(``coalora.model.coa.ADAPTER_META``: LoRA settings, θ vocabularies, layers, method, config ids).
Checkpoints live in ``artifacts/.work/train/<method>/``, which survives a failed attempt: a re-run resumes
there (finished methods and runs are loaded, not retrained). Checkpoints made from other inputs or params are
discarded, never resumed.

Data-parallel: ``accelerate launch --multi_gpu --num_processes N -m coalora.cli stage train`` runs this stage on N
ranks (``coalora.parallel``): each trains on its share of every batch, the main process writes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from pathlib import Path

from coalora import parallel
from coalora.artifacts import content_id, folder_digest, read_json, read_jsonl, write_json, write_text_atomic
from coalora.errors import UserError
from coalora.params import Params
from coalora.stages.core import Stage, StageContext

log = logging.getLogger("coalora.stages.train")

ADAPTER = "adapter.safetensors"
DRAWN = "configs"
INPUTS = "inputs.json"
METRICS = "metrics.json"


def training_data(params: Params, tokenizer, data_dir: Path):
    """(training batches, fixed held-out batch) for ``train.data``.

    text: random windows of the C4-schema training text; held out: the first ``eval_sequences`` windows of
    the validation text. instruct: the instruction rows minus the last ``eval_sequences``, which are held out.
    """
    from coalora.data import layout
    from coalora.train.batches import instruct_table, text_batches, text_windows

    p = params.train
    if p.data == "text":
        train = [row["text"] for row in read_jsonl(layout.data_file(data_dir, "c4_train"))]
        held = [row["text"] for row in read_jsonl(layout.data_file(data_dir, "c4_validation"))]
        return (text_batches(tokenizer, train, p.seq_len, p.batch_size),
                text_windows(tokenizer, held, p.seq_len, p.eval_sequences))
    rows = read_jsonl(layout.data_file(data_dir, "instruct"))
    if len(rows) <= p.eval_sequences:
        raise UserError(f"train.eval_sequences: {p.eval_sequences} held-out rows, but the instruction data has "
                        f"only {len(rows)}; lower it")
    train_rows, held_rows = rows[:-p.eval_sequences], rows[-p.eval_sequences:]
    return (instruct_table(tokenizer, train_rows, p.seq_len, p.batch_size),
            instruct_table(tokenizer, held_rows, p.seq_len, p.batch_size).all())


def f1_slice(params: Params, tokenizer, data_dir: Path) -> dict | None:
    """The fixed held-out slice search rounds measure f1 on (None when no method has a pool).

    text: the LAST ``search.f1_sequences`` windows of the validation text (apart from the held-out batch
    and the perplexity windows, which take the first ones); instruct: the first ``f1_sequences`` held-out
    rows (the same rows the held-out batch holds: the instruction data has no other held-out part).
    """
    from coalora.data import layout
    from coalora.train import METHODS
    from coalora.train.batches import instruct_table, tail_windows

    if not any(METHODS[name].has_pool for name in params.train.methods):
        return None
    p, n = params.train, params.search.f1_sequences
    if p.data == "text":
        held = [row["text"] for row in read_jsonl(layout.data_file(data_dir, "c4_validation"))]
        return tail_windows(tokenizer, held, p.seq_len, n, head=p.eval_sequences)
    if n > p.eval_sequences:
        raise UserError(f"search.f1_sequences: {n} rows, but instruction data holds out only "
                        f"train.eval_sequences = {p.eval_sequences}; lower it")
    rows = read_jsonl(layout.data_file(data_dir, "instruct"))[-p.eval_sequences:][:n]
    return instruct_table(tokenizer, rows, p.seq_len, p.batch_size).all()


def check_k(params: Params, pool_size: int) -> None:
    """Pool methods draw ``train.k`` distinct pool configs per step: fail before any training when they cannot."""
    from coalora.train import METHODS

    if any(METHODS[name].has_pool for name in params.train.methods) and params.train.k > pool_size:
        raise UserError(f"train.k: {params.train.k} configs per step, but the pool holds only {pool_size}; "
                        f"lower train.k or enlarge the pool (allocate.grid_size)")


def check_rounds(params: Params, n_targets: int) -> None:
    """Pool methods need a step for every search round: fail before any training when they have fewer."""
    from coalora.search import round_steps
    from coalora.train import METHODS

    for name in params.train.methods:
        if METHODS[name].has_pool:
            round_steps(METHODS[name].steps(params.train, n_targets), params.search.rounds)


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


def run(params: Params, ctx: StageContext) -> dict:
    """Train every method of ``train.methods``; returns the summary."""
    from coalora.model.load import load_base
    from coalora.space import quantized_layers
    from coalora.train import METHODS, TrainSetup, load_pool, target_set, train_method
    from coalora.train.targets import UNSEEN

    p = params.train
    base_dir = ctx.input("base_model")
    base, tokenizer = load_base(base_dir, p.dtype)
    layers = quantized_layers(base, params.quant.target_modules)
    del base
    pool = load_pool(ctx.input("allocate"), layers)
    unseen = load_pool(ctx.input("allocate"), layers, UNSEEN)
    targets = target_set(pool, p.target_bits)
    check_k(params, len(pool))
    check_rounds(params, len(targets))
    if parallel.launched():
        parallel.check_batch_size(p.batch_size)
    batches, eval_batch = training_data(params, tokenizer, ctx.input("data"))
    setup = TrainSetup(p, params.lora, params.train_seed, lambda: load_base(base_dir, p.dtype)[0], layers, pool,
                       targets, batches, eval_batch, ctx.progress, search=params.search,
                       f1_batch=f1_slice(params, tokenizer, ctx.input("data")), unseen=unseen)
    target_rows = [{"id": c.id, "bits": c.bits, "target_bits": b} for c, b in zip(targets, p.target_bits)]
    write_json(ctx.out / "targets.json", {"targets": target_rows, "pool": len(pool), "unseen": len(unseen),
                                          "dtype": p.dtype, "seed": params.train_seed,
                                          "steps_per_config": p.steps_per_config})
    records = {}
    for name in p.methods:
        started = time.perf_counter()
        result = train_method(METHODS[name], setup, method_work(ctx, params, name))
        records[name] = write_method(ctx.out / name, result, setup, target_rows, time.perf_counter() - started)
        log.info("train %s: %s", name, _line(records[name]))
    metrics = flat_metrics(records)
    write_json(ctx.out / METRICS, metrics)
    return {"targets": target_rows, "pool": len(pool), "methods": {n: _brief(r) for n, r in records.items()}}


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------

def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def method_record(result, setup, target_rows: list[dict], wall: float) -> dict:
    """train.json of one method."""
    m, p = result.method, setup.params
    runs = result.runs
    before = {cid: v for r in runs for cid, v in r.eval_before.items()}
    after = {cid: v for r in runs for cid, v in r.eval_after.items()}
    draws: dict[str, int] = {}
    for r in runs:
        for cid, n in r.draws.items():
            draws[cid] = draws.get(cid, 0) + n
    return {
        "method": m.name, "description": m.description, "backend": m.backend, "confignet": m.confignet,
        "runs_kind": m.runs,
        "init": m.init, "skipped": result.skipped,
        "k": m.k(p), "target_bits": p.target_bits, "targets": target_rows,
        "configs": [cid for r in runs for cid in r.configs],
        "config_bits": _config_bits(result, setup),
        "compute": {"steps_per_config": p.steps_per_config, "joint_compute": p.joint_compute,
                    "n_targets": len(setup.targets), "planned_config_steps": m.config_steps(p, len(setup.targets)),
                    "rule": "config-step = one forward+backward of one configuration on one batch; per-config "
                            "methods: steps_per_config for each target; joint methods (coalora family, shared): "
                            "joint_compute x steps_per_config x targets config-steps, taken K per step"},
        "steps_per_run": {r.name: r.steps for r in runs},
        "config_draws": draws,
        "steps": sum(r.steps for r in runs),
        "config_steps": sum(draws.values()),
        "seed": setup.seed,
        "seconds": round(sum(r.seconds for r in runs), 3),
        "wall_seconds": round(wall, 3),
        "final_loss": _mean(r.final_loss for r in runs),
        "eval_loss_before": before, "eval_loss_after": after,
        "eval_loss_before_mean": _mean(before.values()), "eval_loss_after_mean": _mean(after.values()),
        "runs": [{"name": r.name, "configs": r.configs, "steps": r.steps, "seconds": r.seconds,
                  "final_loss": r.final_loss} for r in runs],
        "train": {"data": p.data, "lr": p.lr, "batch_size": p.batch_size, "seq_len": p.seq_len,
                  "dtype": p.dtype, "grad_clip": p.grad_clip, "eval_sequences": p.eval_sequences},
    }


def _config_bits(result, setup) -> dict[str, float]:
    """Average bits of each config the method trained for (qlora-bnb: the uniform NF4 config, 4.127)."""
    configs = list(setup.targets)
    if result.method.runs == "uniform":
        from coalora.train.bnb import uniform_config

        configs.append(uniform_config(setup.layers))
    bits = {c.id: c.bits for c in configs}
    return {cid: bits[cid] for r in result.runs for cid in r.configs}


def write_method(folder: Path, result, setup, target_rows: list[dict], wall: float) -> dict:
    """The method's adapter file(s), train.json and loss.csv; returns the train.json record."""
    folder.mkdir()
    joint = result.method.runs == "joint"
    offset = 0
    rows = []
    for r in result.runs:
        path = folder / ADAPTER if joint else folder / r.name / ADAPTER
        write_adapter(path, r.adapter, {**result.header, "method": result.method.name, "config_ids": r.configs})
        rows += [(offset + step, r.name, loss) for step, loss in r.losses]
        offset += r.steps
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("step", "run", "loss"))
    writer.writerows((step, run, f"{loss:.6f}") for step, run, loss in rows)
    write_text_atomic(folder / "loss.csv", buffer.getvalue())
    record = method_record(result, setup, target_rows, wall)
    write_drawn(folder, result, setup, record["config_draws"])
    if result.method.has_pool and result.runs:
        write_search(folder, result.runs[0].search, setup.layers, record)
    write_json(folder / "train.json", record)
    return record


def write_drawn(folder: Path, result, setup, draws: dict[str, int]) -> None:
    """``configs/<id>.json`` for every config the method drew at least once (its seen configs)."""
    from coalora.search.rounds import configs_by_id

    known = {c.id: c for c in [*setup.pool, *setup.targets]}
    if result.method.runs == "uniform":
        from coalora.train.bnb import uniform_config

        known[uniform_config(setup.layers).id] = uniform_config(setup.layers)
    for run in result.runs:
        if run.search is not None:
            known.update(configs_by_id(run.search, setup.layers))
    missing = sorted(set(draws) - set(known))
    if missing:  # a programming error: training drew a config nobody can name
        raise AssertionError(f"{result.method.name} drew configs {missing[:3]} that are neither pool nor search configs")
    for cid in sorted(draws):
        known[cid].save(folder / DRAWN / f"{cid}.json")


def write_search(folder: Path, state: dict, layers, record: dict) -> None:
    """A pool method's final pool (``pool/<id>.json``), its rounds (into ``record``) and ``rounds.csv``."""
    from coalora.search import pool_configs

    for config in pool_configs(state, layers):
        config.save(folder / "pool" / f"{config.id}.json")
    record["search"] = {"seen": len(state["seen"]), "f1_scale": state["f1_scale"], "pool": state["pool"],
                        "hypervolume": [r["hypervolume"] for r in state["rounds"]]}
    record["rounds"] = [{k: v for k, v in r.items() if k != "measured"} for r in state["rounds"]]  # all: rounds.csv
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("round", "id", "bits", "f1", "in_pool", "on_front"))
    for r in state["rounds"]:
        pool, front = set(p["id"] for p in r["pool"]), set(r["front"])
        writer.writerows((r["round"], m["id"], f"{m['bits']:.6f}", f"{m['f1']:.6f}", int(m["id"] in pool),
                          int(m["id"] in front)) for m in r["measured"])
    write_text_atomic(folder / "rounds.csv", buffer.getvalue())


def write_adapter(path: Path, tensors: dict, header: dict) -> None:
    """safetensors with the JSON header under the key CoAModel's ``read_adapter`` reads."""
    from safetensors.torch import save_file

    from coalora.model.coa import ADAPTER_META

    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key only: safetensors writes metadata in hash-map order, so two keys give run-dependent
    # bytes, and the stage's output digest (its downstream cache keys) would change on every run.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={ADAPTER_META: json.dumps(header, sort_keys=True)})


def flat_metrics(records: dict[str, dict]) -> dict[str, float]:
    """``<method>.<name>`` → number, for ``dvc metrics show`` (skipped methods: ``<method>.skipped`` = 1)."""
    metrics: dict[str, float] = {}
    for name, r in records.items():
        if r["skipped"]:
            metrics[f"{name}.skipped"] = 1
            continue
        for key in ("final_loss", "eval_loss_before_mean", "eval_loss_after_mean", "seconds", "steps",
                    "config_steps"):
            metrics[f"{name}.{key}"] = round(r[key], 6) if isinstance(r[key], float) else r[key]
    return metrics


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
    fn=run,
    params=("seed", "quant", "lora", "train", "search"),
    deps=("data", "base_model", "allocate"),
    metrics=(METRICS,),
    description="CoA-LoRA and the baselines trained for the same target configs (checkpointed, resumable)",
    extra={"data_parallel": True},  # runs under `accelerate launch` (coalora.parallel)
)
