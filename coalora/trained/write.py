"""The train stage's files, written (the layout, and their readers: :mod:`coalora.trained`)."""

from __future__ import annotations

from pathlib import Path

from coalora.artifacts import write_csv, write_json
from coalora.model.adapter import write_adapter
from coalora.trained import DRAWN, JOINT_RUNS, adapter_file, LOSS_CSV, METRICS, POOL, ROUNDS_CSV, TARGETS, TRAIN_JSON

COMPUTE_RULE = ("config-step = one forward+backward of one configuration on one batch; per-config methods: "
                "steps_per_config for each target; joint methods (coalora family, shared): "
                "joint_compute x steps_per_config x targets config-steps, taken K per step")


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
        from coalora.model.bnb_lora import uniform_config

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
    write_csv(folder / LOSS_CSV, ("step", "run", "loss"), rows)
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
    write_csv(folder / ROUNDS_CSV, ("round", "id", "bits", "f1", "in_pool", "on_front"), rows)


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
