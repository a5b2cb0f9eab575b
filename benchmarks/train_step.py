"""One training step of CoA-LoRA (K = 1, θ on) against plain peft LoRA on the same fake-quantized base.

Both methods start from the same seeded Llama, quantized with the same config (one seeded random spec per
target layer), the same batch, rank, alpha and target modules; a step is forward + backward + gradient
clipping (1.0) + AdamW. Reported per model size:

  * time: ONE worker process builds both models and alternates their steps (peft, coalora, peft, …) so that
    both see the same machine load (our machines are shared: a single method's step time drifts by 2× within
    a minute). After ``--warmup`` pairs, ``--steps`` pairs are timed; reported are each method's median
    step and the median of the per-pair ratios coalora / peft.
  * memory: one fresh worker process per method (``--rounds`` each, median). The base is saved once and
    loaded with ``from_pretrained``, as the pipeline loads it: transformers maps the safetensors file, so
    weights that are never written stay clean file-backed pages (the kernel can drop and re-read them),
    while written ones (peft's W̃, copied over W) and new tensors (CoA-LoRA's W̃) are anonymous memory.
      - RSS peak  = VmHWM − VmRSS before the model was loaded: weights + adapter + optimizer + step peak;
      - anon peak = the same in anonymous memory only (what cannot be reclaimed without swap);
      - step peak = VmHWM − VmRSS after setup, the high-water mark reset (``/proc/self/clear_refs``) right
                    before the first step: optimizer state + activations + gradients.
    Why RSS and not tracemalloc/torch.profiler: tracemalloc does not see torch's C++ allocations; the
    profiler's memory events need a timeline reconstruction of every op. RSS sees every byte, and with
    ``MALLOC_MMAP_THRESHOLD_=65536`` (set for every worker) glibc serves tensor-sized blocks from mmap and
    returns them on free, so RSS follows live tensor memory instead of the allocator's retained heap.
    Separate processes keep one method's peak from hiding the other's.

The first loss of both methods is printed: with B = 0 both are the quantized base model, so they must agree.

    python benchmarks/train_step.py                            # every size → benchmarks/train_step.md
    python benchmarks/train_step.py --sizes builtin --steps 5 --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # the built-in default (params.yaml model.builtin at train.batch_size × train.seq_len) and a larger
    # model at a small batch (weights weigh most) and at train.batch_size
    "builtin": dict(vocab=2048, hidden=128, inter=352, layers=4, heads=4, kv=4, batch=16, seq=128),
    "large": dict(vocab=2048, hidden=512, inter=1376, layers=4, heads=8, kv=8, batch=4, seq=256),
    "large-b16": dict(vocab=2048, hidden=512, inter=1376, layers=4, heads=8, kv=8, batch=16, seq=256),
}
RANK, ALPHA, LR = 16, 16.0, 1e-3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NOTES = "<!-- notes: kept across re-runs -->"
MEMORY_STEPS = 3  # the first step allocates AdamW's state; the peak is reached by the second


def proc_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: VmHWM := VmRSS


def build(size: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["inter"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv"], max_position_embeddings=size["seq"],
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def seeded_config(layers):
    import random

    from coalora.quant import all_specs
    from coalora.space import Config

    rng = random.Random(0)
    return Config({n: rng.choice(all_specs()) for n in layers}, layers)


def setup_peft(model, layers, config):
    import torch
    from peft import LoraConfig, get_peft_model

    from coalora.quant import fake_quantize

    with torch.no_grad():
        for name in layers:
            weight = model.get_submodule(name).weight
            weight.copy_(fake_quantize(weight, config[name]))  # the same W̃ CoAModel computes
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                                  target_modules=list(layers), task_type="CAUSAL_LM"))
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def setup_coalora(model, layers, config):
    from coalora.model.coa import CoAModel
    from coalora.params import ConfigNetParams, LoraParams

    lora = LoraParams(rank=RANK, alpha=ALPHA, dropout=0.0, cache_mb=512,
                      confignet=ConfigNetParams(embed_dim=8, hidden=128, init_std=1e-3))
    coa = CoAModel(model, layers, lora)
    coa.set_config(config)
    return coa, coa.trainable_parameters()


def save_base(size_name: str, folder: Path) -> Path:
    """The seeded base model saved as a Hugging Face folder (the pipeline's base stage output)."""
    path = folder / size_name
    if not (path / "config.json").is_file():
        build(SIZES[size_name]).save_pretrained(path)
    return path


def prepare(method: str, size: dict, base: Path | None = None):
    """(module, trainable params, optimizer, tokens, config bits) of one method on the seeded base.

    With ``base`` the model is loaded by ``from_pretrained`` as the pipeline loads it (transformers maps the
    safetensors file: the weights are clean file-backed pages until written); without, built in memory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from coalora.space import quantized_layers

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if base else build(size)
    layers = quantized_layers(model, TARGETS)
    config = seeded_config(layers)
    net, params = (setup_peft if method == "peft" else setup_coalora)(model, layers, config)
    net.train()
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq"]),
                           generator=torch.Generator().manual_seed(1))
    return net, params, torch.optim.AdamW(params, lr=LR), tokens, config.bits


def step(net, params, optimizer, tokens) -> tuple[float, float]:
    """One training step; (seconds, loss)."""
    import torch

    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = net(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return time.perf_counter() - started, float(loss)


def time_worker(size_name: str, steps: int, warmup: int, base: Path) -> dict:
    """Both methods in this process, steps alternated; per-method median and median pair ratio."""
    runs = {m: prepare(m, SIZES[size_name], base) for m in ("peft", "coalora")}
    times: dict[str, list[float]] = {m: [] for m in runs}
    first = {}
    for i in range(warmup + steps):
        for m, (net, params, optimizer, tokens, _) in runs.items():
            seconds, loss = step(net, params, optimizer, tokens)
            first.setdefault(m, loss)
            if i >= warmup:
                times[m].append(seconds)
    ratios = [c / p for c, p in zip(times["coalora"], times["peft"])]
    return {"size": size_name, "step_s": {m: statistics.median(t) for m, t in times.items()},
            "ratio": statistics.median(ratios), "first_loss": first,
            "trainable": {m: sum(p.numel() for p in runs[m][1]) for m in runs}, "bits": runs["peft"][4]}


def memory_worker(method: str, size_name: str, steps: int, base: Path) -> dict:
    """One method in this (fresh) process: peak memory over setup + ``steps`` steps, in MiB.

    total: peak RSS; anon: peak anonymous memory (RSS less file-backed and shared pages; no file is read
    during the steps, so the file part is constant and the peak's anonymous part is VmHWM − RssFile −
    RssShmem at the end); step: peak RSS over the steps above RSS after setup.
    """
    import gc

    gc.collect()
    rss_start, anon_start = proc_kib("VmRSS"), proc_kib("RssAnon")
    net, params, optimizer, tokens, _ = prepare(method, SIZES[size_name], base)
    rss_setup = proc_kib("VmRSS")
    reset_peak()
    for _ in range(steps):
        step(net, params, optimizer, tokens)
    peak = proc_kib("VmHWM")
    anon_peak = peak - proc_kib("RssFile") - proc_kib("RssShmem")
    return {"method": method, "total_mib": (peak - rss_start) / 1024, "anon_mib": (anon_peak - anon_start) / 1024,
            "step_mib": (peak - rss_setup) / 1024}


def warm_up_code() -> None:
    """Run both methods once on a toy model, so that every worker has the same libraries imported and the
    same lazy initialisations done before its memory baseline: the measured deltas are data, not code."""
    toy = dict(vocab=64, hidden=16, inter=32, layers=1, heads=2, kv=2, batch=2, seq=8)
    for method in ("peft", "coalora"):
        step(*prepare(method, toy)[:4])


def worker(kind: str, size_name: str, steps: int, warmup: int, threads: int, base: Path) -> dict:
    import torch

    torch.set_num_threads(threads)
    warm_up_code()
    if kind == "time":
        return time_worker(size_name, steps, warmup, base)
    return memory_worker(kind, size_name, MEMORY_STEPS, base)


def run_worker(kind: str, size: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", kind, "--sizes", size, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--base", str(args.base)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {kind} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(size: str, args) -> dict:
    """The time worker once, then the memory workers alternately ``--rounds`` times."""
    timing = run_worker("time", size, args)
    print(f"{size:8} time: peft {timing['step_s']['peft']:.4f} s, coalora {timing['step_s']['coalora']:.4f} s, "
          f"median pair ratio {timing['ratio']:.3f}; first loss {timing['first_loss']}", flush=True)
    memory: dict[str, list[dict]] = {"peft": [], "coalora": []}
    for _ in range(args.rounds):
        for method in memory:
            memory[method].append(run_worker(method, size, args))
            r = memory[method][-1]
            print(f"{size:8} memory {method:8} total {r['total_mib']:.1f} MiB, anon {r['anon_mib']:.1f} MiB, "
                  f"step {r['step_mib']:.1f} MiB", flush=True)
    keys = ("total_mib", "anon_mib", "step_mib")
    mem = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in memory.items()}
    return {"timing": timing, "memory": mem,
            "ratio": {"step_s": timing["ratio"], **{k: mem["coalora"][k] / mem["peft"][k] for k in keys}}}


def versions() -> str:
    import peft
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, " \
           f"Python {platform.python_version()}"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def markdown(rows: dict, args, load: tuple[float, float]) -> str:
    lines = [
        "# One training step: CoA-LoRA (K = 1, θ on) vs peft LoRA on the same fake-quantized base", "",
        f"- command: `{' '.join(['python benchmarks/train_step.py', *sys.argv[1:]])}`",
        f"- date: {datetime.date.today().isoformat()}; machine: {cpu_model()}, {os.cpu_count()} cores (shared "
        f"with other jobs), {args.threads} torch thread(s); load average before/after: {load[0]:.1f} / {load[1]:.1f}",
        f"- versions: {versions()}",
        f"- r = {RANK}, α = {ALPHA:g}, AdamW lr {LR:g}, clip 1.0, dropout 0, float32, targets "
        f"{', '.join(TARGETS)}; θ: embed 8, hidden 128",
        f"- time: {args.steps} alternated step pairs after {args.warmup} warm-up pairs, one process; ratio = median "
        f"of per-pair ratios",
        f"- memory: a fresh process per method, median of {args.rounds} rounds, `MALLOC_MMAP_THRESHOLD_=65536`; "
        "the base loaded by `from_pretrained` as in the pipeline; RSS peak and anonymous peak from before the "
        "model was loaded, step peak from after setup (high-water mark reset before the first step)", "",
        "| model | method | step (s) | RSS peak (MiB) | anon peak (MiB) | step peak (MiB) | trainable | first loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, row in rows.items():
        s = SIZES[size]
        label = f"{size} (h{s['hidden']}, {s['layers']} layers, batch {s['batch']}×{s['seq']})"
        t = row["timing"]
        for m in ("peft", "coalora"):
            mem = row["memory"][m]
            lines.append(f"| {label} | {m} | {t['step_s'][m]:.4f} | {mem['total_mib']:.1f} | {mem['anon_mib']:.1f} | "
                         f"{mem['step_mib']:.1f} | {t['trainable'][m]:,} | {t['first_loss'][m]:.6f} |")
        q = row["ratio"]
        lines.append(f"| {label} | **coalora / peft** | **{q['step_s']:.3f}** | **{q['total_mib']:.3f}** | "
                     f"**{q['anon_mib']:.3f}** | **{q['step_mib']:.3f}** | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--steps", type=int, default=10, help="timed step pairs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed step pairs first")
    parser.add_argument("--rounds", type=int, default=2, help="memory workers per method")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable on a shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "train_step.md")
    parser.add_argument("--worker", choices=("time", "peft", "coalora"), help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes, args.steps, args.warmup, args.threads, args.base)))
        return
    load_before = os.getloadavg()[0]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="train_step-") as tmp:
        for size in args.sizes.split(","):
            args.base = save_base(size, Path(tmp))
            rows[size] = measure(size, args)
    text = markdown(rows, args, (load_before, os.getloadavg()[0]))
    print(text)
    # Hand-written analysis below the marker survives re-runs.
    old = args.out.read_text() if args.out.is_file() else ""
    args.out.write_text(text + ("\n" + NOTES + old.split(NOTES, 1)[1] if NOTES in old else ""))


if __name__ == "__main__":
    main()
