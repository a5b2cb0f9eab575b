"""The train stage's output folder: its layout, and the one writer and reader of each of its files.

    <method>/adapter.safetensors              joint methods (coalora family, shared): the one adapter (+ θ)
    <method>/<config id>/adapter.safetensors  per-config methods (qlora, lqlora, qlora-bnb): one per config
    <method>/train.json                       :func:`method_record`: how the method's model was built (backend,
                                              confignet, init, seed: ``coalora.model.rebuild.Recipe``),
                                              steps, config-steps, seconds, losses, configs, K, target bits,
                                              compute rule, ``config_draws`` (config id → steps trained under
                                              it: a config is *seen* by a method iff it is drawn here); pool
                                              methods: ``rounds`` (per search round: step, pool with bits
                                              and f1, front, hypervolume and its reference, proposals)
    <method>/configs/<config id>.json         every config the method drew (``Config.save`` files)
    <method>/pool/<config id>.json            pool methods (coalora, coalora-frozen, coalora-random): the
                                              FINAL pool, each a ``Config.save`` file
    <method>/rounds.csv                       pool methods: round, id, bits, f1, in_pool, on_front
    <method>/loss.csv                         step, run, loss (per-config runs follow each other)
    targets.json                              the target set (id, bits, target bits), pool and unseen sizes,
                                              the training dtype and seed, steps per config
    metrics.json                              flat: final loss, held-out loss before/after, seconds per method

Adapter files are written and read by ``coalora.model.adapter``. Writers take the training package's results
(``coalora.train.runner.MethodResult``, ``TrainSetup``) without importing it, so that evaluation, which
reads these files, does not load the training package.
"""

from __future__ import annotations

from pathlib import Path

from coalora.artifacts import read_json, write_csv, write_json
from coalora.model.adapter import ADAPTER_FILE, write_adapter

TRAIN_JSON = "train.json"
TARGETS = "targets.json"
METRICS = "metrics.json"
DRAWN = "configs"   # <method>/configs/: every config the method drew
POOL = "pool"       # <method>/pool/: a pool method's final pool
JOINT_RUNS = "joint"
COMPUTE_RULE = ("config-step = one forward+backward of one configuration on one batch; per-config methods: "
                "steps_per_config for each target; joint methods (coalora family, shared): "
                "joint_compute x steps_per_config x targets config-steps, taken K per step")


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

def adapter_file(method: str, run: str | None = None) -> str:
    """An adapter file, relative to the train stage's output: the one adapter of a joint method (``run``
    None), else the adapter of the method's run for config id ``run``."""
    return f"{method}/{ADAPTER_FILE}" if run is None else f"{method}/{run}/{ADAPTER_FILE}"


def read_record(train_dir: Path, method: str) -> dict:
    """The method's train.json."""
    return read_json(Path(train_dir) / method / TRAIN_JSON)


def read_targets(train_dir: Path) -> dict:
    """targets.json: ``targets`` (id, bits, target_bits), ``pool``, ``unseen``, ``dtype``, ``seed``,
    ``steps_per_config``."""
    return read_json(Path(train_dir) / TARGETS)


def trained_methods(train_dir: Path) -> dict[str, dict]:
    """method → its train.json, for the methods the train stage trained (skipped ones left out), in the
    order of ``TRAIN_METHODS``, then any other by name."""
    from coalora.params import TRAIN_METHODS

    names = sorted(p.parent.name for p in Path(train_dir).glob(f"*/{TRAIN_JSON}"))
    ordered = [n for n in TRAIN_METHODS if n in names] + [n for n in names if n not in TRAIN_METHODS]
    records = {name: read_record(train_dir, name) for name in ordered}
    return {name: r for name, r in records.items() if not r.get("skipped")}


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------

def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def write_targets(out: Path, target_rows: list[dict], pool: int, unseen: int, dtype: str, seed: int,
                  steps_per_config: int) -> None:
    """targets.json (:func:`read_targets`)."""
    write_json(Path(out) / TARGETS, {"targets": target_rows, "pool": pool, "unseen": unseen, "dtype": dtype,
                                     "seed": seed, "steps_per_config": steps_per_config})


def method_record(result, setup, target_rows: list[dict], wall: float) -> dict:
    """train.json of one method (``result``: a ``MethodResult``, ``setup``: the ``TrainSetup``)."""
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
                    "rule": COMPUTE_RULE},
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


def _known_configs(result, setup) -> dict:
    """id → Config of every config the method can have drawn: pool, targets, the uniform NF4 config of
    qlora-bnb, and the configs its search rounds proposed."""
    from coalora.search.rounds import configs_by_id

    known = {c.id: c for c in [*setup.pool, *setup.targets]}
    if result.method.runs == "uniform":
        from coalora.model.bnb import uniform_config

        uniform = uniform_config(setup.layers)
        known[uniform.id] = uniform
    for run in result.runs:
        if run.search is not None:
            known.update(configs_by_id(run.search, setup.layers))
    return known


def _config_bits(result, setup) -> dict[str, float]:
    """Average bits of each config the method trained for (qlora-bnb: the uniform NF4 config, 4.127)."""
    bits = {c.id: c.bits for c in _known_configs(result, setup).values()}
    return {cid: bits[cid] for r in result.runs for cid in r.configs}


def write_method(folder: Path, result, setup, target_rows: list[dict], wall: float) -> dict:
    """The method's adapter file(s), train.json, loss.csv, drawn configs (and a pool method's final pool and
    rounds.csv); returns the train.json record."""
    folder.mkdir()
    joint = result.method.runs == JOINT_RUNS
    offset = 0
    rows = []
    for r in result.runs:
        path = folder.parent / adapter_file(folder.name, None if joint else r.name)
        write_adapter(path, r.adapter, {**result.header, "method": result.method.name, "config_ids": r.configs})
        rows += [(offset + step, r.name, f"{loss:.6f}") for step, loss in r.losses]
        offset += r.steps
    write_csv(folder / "loss.csv", ("step", "run", "loss"), rows)
    record = method_record(result, setup, target_rows, wall)
    write_drawn(folder, result, setup, record["config_draws"])
    if result.method.has_pool and result.runs:
        write_search(folder, result.runs[0].search, setup.layers, record)
    write_json(folder / TRAIN_JSON, record)
    return record


def write_drawn(folder: Path, result, setup, draws: dict[str, int]) -> None:
    """``configs/<id>.json`` for every config the method drew at least once (its seen configs)."""
    known = _known_configs(result, setup)
    missing = sorted(set(draws) - set(known))
    if missing:  # a programming error: training drew a config nobody can name
        raise AssertionError(f"{result.method.name} drew configs {missing[:3]} that are neither pool nor search configs")
    for cid in sorted(draws):
        known[cid].save(folder / DRAWN / f"{cid}.json")


def write_search(folder: Path, state: dict, layers, record: dict) -> None:
    """A pool method's final pool (``pool/<id>.json``), its rounds (into ``record``) and ``rounds.csv``."""
    from coalora.search import pool_configs

    for config in pool_configs(state, layers):
        config.save(folder / POOL / f"{config.id}.json")
    record["search"] = {"seen": len(state["seen"]), "f1_scale": state["f1_scale"], "pool": state["pool"],
                        "hypervolume": [r["hypervolume"] for r in state["rounds"]]}
    record["rounds"] = [{k: v for k, v in r.items() if k != "measured"} for r in state["rounds"]]  # all: rounds.csv
    rows = []
    for r in state["rounds"]:
        pool, front = set(p["id"] for p in r["pool"]), set(r["front"])
        rows += [(r["round"], m["id"], f"{m['bits']:.6f}", f"{m['f1']:.6f}", int(m["id"] in pool),
                  int(m["id"] in front)) for m in r["measured"]]
    write_csv(folder / "rounds.csv", ("round", "id", "bits", "f1", "in_pool", "on_front"), rows)


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


def write_metrics(out: Path, records: dict[str, dict]) -> None:
    """metrics.json (:func:`flat_metrics`)."""
    write_json(Path(out) / METRICS, flat_metrics(records))
