"""The embedded world's regime: how much quantization hurts the built-in model, and how much fine-tuning recovers.

On the default params (or a profile), in a scratch project folder:

  1. ``coalora stage data|base_model|calibrate|allocate`` (the pipeline's own stages: the world, the base
     model pretrained on ``text/pretrain.jsonl``, Fisher costs, the MILP pool);
  2. full precision, and the quantized base without an adapter at every target configuration (the pool
     config nearest each ``train.target_bits``): perplexity of the validation text under ``eval.perplexity``
     and zero-shot accuracy on every item of the four benchmarks, through lm-eval
     (``coalora.evaluate.harness.run_benchmarks``);
  3. a fresh per-configuration LoRA (method ``qlora``, ``train`` params: steps_per_config, lr, rank) trained on
     the fine-tuning text at the lowest target (``coalora.train.train_method``), scored the same way.

Reported: per row, perplexity, accuracy per task and the mean over tasks, each with its binomial standard
error; the damage at each target (none vs full precision: perplexity ratio, accuracy points) and the share of
it qlora recovers at the lowest target, on the log-perplexity scale and on mean accuracy:

    recovery = (metric_none - metric_qlora) / (metric_none - metric_fp)     (log-perplexity; -accuracy)

Machine load (``/proc/loadavg``) is recorded before and after every stage and row.

    python benchmarks/world_regime.py                          # default params → benchmarks/world_regime.json
    python benchmarks/world_regime.py --profile smoke --project /tmp/wr --out /tmp/wr.json
    python benchmarks/world_regime.py --project DIR --reuse    # stages already run in DIR: score only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("data", "base_model", "calibrate", "allocate")


def load() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_stages(project: Path, profile: str | None) -> dict:
    """Run the stages in ``project`` with the CLI of this interpreter; seconds and load per stage."""
    cli = [sys.executable, "-m", "coalora.cli", "--root", str(project)] + (["--profile", profile] if profile else [])
    record = {}
    for stage in STAGES:
        before, started = load(), time.perf_counter()
        subprocess.run(cli + ["stage", stage], check=True, stdout=subprocess.DEVNULL)
        record[stage] = {"seconds": round(time.perf_counter() - started, 1), "load_before": before,
                         "load_after": load()}
        print(f"stage {stage}: {record[stage]}", flush=True)
    return record


def score(model, tokenizer, params, data_dir: Path, work: Path, limit: int | None) -> dict:
    """Perplexity and zero-shot accuracy of one in-memory model (the eval protocol, ``limit`` items)."""
    from coalora.artifacts import read_jsonl
    from coalora.data import layout
    from coalora.evaluate.harness import run_benchmarks
    from coalora.evaluate.perplexity import perplexity

    e = params.eval
    before, started = load(), time.perf_counter()
    texts = [row["text"] for row in read_jsonl(layout.data_file(data_dir, "c4_validation"))]
    ppl = perplexity(model, tokenizer, texts, e.perplexity.seq_len, e.perplexity.max_windows, e.batch_size)
    bench = run_benchmarks(model, tokenizer, data_dir, e.tasks, limit, e.batch_size, params.seed, work)
    tasks = {t: {"acc": b["acc"], "n": b["n"], "chance": b["chance"],
                 "se": math.sqrt(b["acc"] * (1 - b["acc"]) / b["n"])} for t, b in bench.items()}
    mean = sum(t["acc"] for t in tasks.values()) / len(tasks)
    mean_se = math.sqrt(sum(t["se"] ** 2 for t in tasks.values())) / len(tasks)
    return {"ppl": ppl["ppl"], "nll": ppl["nll"], "ppl_protocol": ppl["protocol"], "ppl_tokens": ppl["n_tokens"],
            "tasks": tasks, "acc_mean": mean, "acc_mean_se": mean_se,
            "seconds": round(time.perf_counter() - started, 1), "load_before": before, "load_after": load()}


def train_qlora(params, art: Path, layers, pool, config, tokenizer, work: Path) -> tuple[dict, dict]:
    """A fresh per-config LoRA (method qlora) for ``config``: (adapter tensors, training record)."""
    from coalora.model.load import load_base
    from coalora.train.heldout import training_data
    from coalora.train import METHODS, TrainSetup, train_method

    p = params.train
    batches, eval_batch = training_data(params, tokenizer, art / "data")
    setup = TrainSetup(p, params.lora, params.seed, lambda: load_base(art / "base_model", p.dtype)[0], layers,
                       pool, [config], batches, eval_batch, progress=False)
    before, started = load(), time.perf_counter()
    run = train_method(METHODS["qlora"], setup, work).runs[0]
    record = {"steps": run.steps, "lr": p.lr, "rank": params.lora.rank, "data": p.data,
              "held_out_loss_before": run.eval_before[config.id], "held_out_loss_after": run.eval_after[config.id],
              "final_loss": run.final_loss, "seconds": round(time.perf_counter() - started, 1),
              "load_before": before, "load_after": load()}
    return run.adapter, record


def recovery(none: dict, fp: dict, tuned: dict) -> dict:
    """The share of the quantization damage an adapter removes, on log-perplexity and on mean accuracy."""
    def share(bad: float, good: float, got: float) -> float | None:
        return None if bad == good else round((bad - got) / (bad - good), 4)
    return {"nll": share(none["nll"], fp["nll"], tuned["nll"]),
            "acc_mean": share(-none["acc_mean"], -fp["acc_mean"], -tuned["acc_mean"])}


def measure(project: Path, profile: str | None, limit: int | None, reuse: bool) -> dict:
    import torch

    from coalora.artifacts import RECORD, read_json
    from coalora.model.coa import CoAModel
    from coalora.model.load import load_base
    from coalora.params import load_params
    from coalora.space import quantized_layers
    from coalora.train import load_pool, target_set

    if not reuse:
        project.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "params.yaml", project / "params.yaml")
        if profile:
            shutil.copytree(ROOT / "profiles", project / "profiles", dirs_exist_ok=True)
    stages = None if reuse else run_stages(project, profile)
    params = load_params(project, profile)
    art = project / "artifacts"
    base_summary = read_json(art / "base_model" / RECORD)["summary"]
    torch.manual_seed(params.seed)
    base, tokenizer = load_base(art / "base_model", params.model.dtype)
    work = Path(tempfile.mkdtemp(prefix="world-regime-"))
    rows = {"full precision": {"bits": 32.0, **score(base, tokenizer, params, art / "data", work / "fp", limit)}}
    print("full precision", _line(rows["full precision"]), flush=True)
    layers = quantized_layers(base, params.quant.target_modules)
    pool = load_pool(art / "allocate", layers)
    targets = target_set(pool, params.train.target_bits)
    coa = CoAModel(base, layers, params.lora, use_confignet=False)
    coa.reset_lora(params.seed)  # B = 0: the quantized base exactly
    for bits, config in zip(params.train.target_bits, targets):
        coa.set_config(config)
        name = f"none @ {bits}"
        rows[name] = {"bits": config.bits, "config": config.id,
                      **score(coa.model, tokenizer, params, art / "data", work / name.replace(" ", ""), limit)}
        print(name, _line(rows[name]), flush=True)
    low, low_bits = targets[0], params.train.target_bits[0]
    adapter, train_record = train_qlora(params, art, layers, pool, low, tokenizer, work / "qlora")
    coa.load_adapter_state_dict(adapter)
    coa.set_config(low)
    name = f"qlora @ {low_bits}"
    rows[name] = {"bits": low.bits, "config": low.id, "train": train_record,
                  **score(coa.model, tokenizer, params, art / "data", work / "qlora-eval", limit)}
    print(name, _line(rows[name]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    fp = rows["full precision"]
    damage = {f"{b}": {"ppl_ratio": round(rows[f"none @ {b}"]["ppl"] / fp["ppl"], 4),
                       "acc_points": round(100 * (fp["acc_mean"] - rows[f"none @ {b}"]["acc_mean"]), 2)}
              for b in params.train.target_bits}
    return {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "profile": profile, "limit": limit, "stages": stages,
        "world": params.world.model_dump(), "builtin": params.model.builtin.model_dump(),
        "pretrain": base_summary.get("pretrain"), "data": read_json(art / "data" / RECORD)["summary"],
        "rows": rows, "damage": damage, "recovery": {f"{low_bits}": recovery(rows[f"none @ {low_bits}"], fp,
                                                                              rows[name])},
    }


def _line(row: dict) -> str:
    return f"ppl {row['ppl']:.3f} mean acc {row['acc_mean']:.3f} " + " ".join(
        f"{t} {v['acc']:.3f}" for t, v in row["tasks"].items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=None, help="scratch project folder (default: a temp one)")
    parser.add_argument("--profile", default=None, help="params profile (default: params.yaml alone)")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--reuse", action="store_true", help="the stages already ran in --project")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "world_regime.json")
    args = parser.parse_args(argv)
    if args.reuse and args.project is None:
        parser.error("--reuse needs --project")
    project = args.project or Path(tempfile.mkdtemp(prefix="coalora-world-"))
    result = measure(project, args.profile, args.limit, args.reuse)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"damage": result["damage"], "recovery": result["recovery"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
