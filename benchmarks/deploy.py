"""A deployed model: memory and speed of the packed folder against the dense one, and packed dequantization
against bitsandbytes, on CPU.

For each model (the built-in default at its params.yaml size, and a SmolLM2-135M-shaped Llama: 30 layers,
hidden 576, 9 heads / 3 KV heads, FFN 1536, vocab 49152, tied embeddings; both with random weights, built from
their config, no download) it makes a project in a temporary folder — the base model, a synthetic cost table
(error ∝ numel·4^−bpp), a CoA-LoRA adapter with perturbed factors — and runs ``coalora adapt --budget B`` twice:
packed (the default) and ``--dense``. Then:

  * memory: one fresh process per folder (``--rounds`` each, alternated): import torch/transformers/peft/coalora,
    ``from_pretrained`` + ``PeftModel.from_pretrained``, one prompt forward and a short ``generate``; reported are
    the process's peak RSS (VmHWM) and the bytes the target layers hold (PackedLinear buffers / nn.Linear
    weights), the latter against the configuration's bits accounting (bits × parameters / 8, and the exact
    storage: partial blocks, per-matrix offsets);
  * speed: ONE process loads both folders (+ adapters) and alternates them: prompt processing (a forward of
    ``--prompt`` tokens, batch 1) and decoding (``generate`` of ``--new`` tokens minus ``generate`` of 1, greedy,
    batch 1); medians over ``--repeats`` alternated rounds;
  * dequantize: a 4096×4096 float32 matrix, QLoRA's spec b4-s8-fp32-64-256 (and b2/b3/b8), our
    ``QuantizedTensor.dequantize`` against bitsandbytes' ``dequantize_4bit`` (NF4, blocksize 64, double
    quantization) and against our previous path (unpack every code, then ``dequantize_parts``), interleaved in one
    process.

    python benchmarks/deploy.py                                # → benchmarks/deploy.md
    python benchmarks/deploy.py --models builtin --repeats 2 --out /tmp/d.md

Why one file of ~450 lines: it is run by path, and its measuring processes re-run this same file in worker mode
(``run_worker``), so the project set-up, the three workers and the report stay together in one script; none of
it is library code (coalora imports nothing from here).
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
NOTES = "<!-- notes: kept across re-runs -->"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    "builtin": dict(vocab=2048, hidden=128, inter=352, layers=4, heads=4, kv=4, positions=128, rope=10000.0),
    "smollm2-135m": dict(vocab=49152, hidden=576, inter=1536, layers=30, heads=9, kv=3, positions=2048,
                         rope=100000.0),
}
RANK, ALPHA = 8, 16.0


# ---------------------------------------------------------------------------------------------------------
# Setup: a project with base model, cost table and adapter; then `coalora adapt`
# ---------------------------------------------------------------------------------------------------------

def build_model(spec: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["kv"], max_position_embeddings=spec["positions"],
                         rope_parameters={"rope_type": "default", "rope_theta": spec["rope"]}, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0, dtype="float32")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def make_project(root: Path, spec: dict) -> dict:
    """artifacts/{base_model,calibrate,train} as the stages write them, with synthetic costs and adapter."""
    import shutil

    import torch

    from coalora.artifacts import atomic_folder, write_json
    from coalora.calibrate.cost_table import CostTable
    from coalora.model.adapter import save_adapter
    from coalora.model.coa import CoAModel
    from coalora.params import ConfigNetParams, LoraParams
    from coalora.quant import all_specs
    from coalora.space import quantized_layers

    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    model = build_model(spec)
    layers = quantized_layers(model, TARGETS)
    with atomic_folder(root / "artifacts" / "base_model") as tmp:
        model.save_pretrained(tmp / "model")
        write_json(tmp / "base.json", {"source": "builtin", "path": "model", "revision": None})
    specs = all_specs()
    bpp = torch.tensor([s.bits_per_param for s in specs], dtype=torch.float64)
    numel = torch.tensor([o * i for o, i in layers.values()], dtype=torch.float64)
    wiggle = torch.rand(len(layers), len(specs), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    costs = numel[:, None] * torch.pow(4.0, -bpp)[None, :] * (1 + 0.1 * wiggle)
    with atomic_folder(root / "artifacts" / "calibrate") as tmp:
        CostTable(layers, specs, {"cost_squared": costs}, "squared", 0).save(tmp)
    lora = LoraParams(rank=RANK, alpha=ALPHA, dropout=0.0, cache_mb=16,
                      confignet=ConfigNetParams(embed_dim=8, hidden=32, init_std=1e-3))
    coa = CoAModel(model, layers, lora)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in coa.lora_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    with atomic_folder(root / "artifacts" / "train") as tmp:
        (tmp / "coalora").mkdir()
        save_adapter(coa, tmp / "coalora" / "adapter.safetensors", step=0)
    return {"params": sum(p.numel() for p in model.parameters()), "target_params": int(numel.sum())}


def deploy(root: Path, budget: float) -> dict[str, Path]:
    from coalora.cli import main

    outs = {"packed": root / "packed", "dense": root / "dense"}
    for fmt, out in outs.items():
        code = main(["--root", str(root), "adapt", "--budget", str(budget), "--out", str(out),
                     *(["--dense"] if fmt == "dense" else [])])
        if code:
            raise RuntimeError(f"coalora adapt ({fmt}) exited with {code}")
    return outs


# ---------------------------------------------------------------------------------------------------------
# Workers (fresh processes)
# ---------------------------------------------------------------------------------------------------------

def proc_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def import_everything() -> None:
    """Both folders' processes import the same libraries, so their baselines are equal."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import coalora  # noqa: F401  (registers the "coalora" quantization method)
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.quantizers import auto  # noqa: F401


def load(out: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    return PeftModel.from_pretrained(model, out / "adapter").eval()


def target_bytes(model, layers: list[str]) -> int:
    """Bytes the target layers hold: a PackedLinear's buffers (bias excluded), an nn.Linear's weight."""
    from coalora.quant.linear import PACKED_BUFFERS, PackedLinear

    total = 0
    base = model.get_base_model()
    for name in layers:
        layer = base.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)  # peft's wrapper
        if isinstance(layer, PackedLinear):
            total += sum(getattr(layer, k).nbytes for k in PACKED_BUFFERS)
        else:
            total += layer.weight.nbytes
    return total


def prompt_tokens(vocab: int, n: int, seed: int):
    import torch

    return torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(model, prompt, new: int):
    import torch

    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)


def memory_worker(out: Path, vocab: int, prompt_len: int, new: int) -> dict:
    """Peak RSS of this process over import + load + prompt forward + generate, and the target layers' bytes."""
    import torch

    rss_imports = proc_kib("VmRSS")
    model = load(out)
    rss_loaded = proc_kib("VmRSS")
    layers = list(json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"])
    prompt = prompt_tokens(vocab, prompt_len, 0)
    with torch.no_grad():
        model(prompt)
    generate(model, prompt[:, :8], new)
    return {"imports_mib": rss_imports / 1024, "loaded_mib": rss_loaded / 1024, "peak_mib": proc_kib("VmHWM") / 1024,
            "anon_end_mib": proc_kib("RssAnon") / 1024, "target_bytes": target_bytes(model, layers)}


def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds: on a shared machine CPU time counts this process's work, not its waits for a core."""
    return time.perf_counter(), time.process_time()


def speed_worker(outs: dict[str, Path], vocab: int, prompt_len: int, new: int, repeats: int) -> dict:
    """Both folders in this process, measurements alternated: prompt tokens/s and decode tokens/s, medians of
    wall-clock and of CPU time."""
    import torch

    models = {fmt: load(Path(out)) for fmt, out in outs.items()}
    layers = list(json.loads((Path(outs["packed"]) / "adapter" / "adapter_config.json").read_text())["target_modules"])
    held = {fmt: target_bytes(model, layers) for fmt, model in models.items()}
    assert held["packed"] < held["dense"] / 4, held  # the packed folder did load as packed
    prompt, short = prompt_tokens(vocab, prompt_len, 1), prompt_tokens(vocab, 8, 2)
    results = {fmt: {k: [] for k in ("prompt", "gen1", "genN")} for fmt in models}
    logits = {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for fmt, model in models.items():
            t0 = clocks()
            with torch.no_grad():
                logits[fmt] = model(prompt).logits
            t1 = clocks()
            generate(model, short, 1)
            t2 = clocks()
            generate(model, short, new)
            t3 = clocks()
            if round_:
                r = results[fmt]
                for key, (a, b) in (("prompt", (t0, t1)), ("gen1", (t1, t2)), ("genN", (t2, t3))):
                    r[key].append((b[0] - a[0], b[1] - a[1]))
    summary = {}
    for fmt, r in results.items():
        row = {}
        for i, clock in enumerate(("wall", "cpu")):
            prompt_s = statistics.median(t[i] for t in r["prompt"])
            decode_s = statistics.median(n[i] - one[i] for n, one in zip(r["genN"], r["gen1"]))
            row[clock] = {"prompt_tok_s": prompt_len / prompt_s, "decode_tok_s": (new - 1) / decode_s}
        summary[fmt] = row
    summary["max_logit_diff"] = float((logits["packed"] - logits["dense"]).abs().max())
    return summary


def dequant_worker(repeats: int) -> list[dict]:
    """Dequantizing one 4096² matrix: ours (packed streams) vs bitsandbytes vs our previous path, interleaved."""
    import dataclasses

    import torch

    from coalora.quant import QLORA_SPEC, bnb_available, dequantize_parts, quantize

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    fns = {}
    if bnb_available():
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        packed, state = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        fns["bitsandbytes dequantize_4bit (NF4, blocksize 64, double quant)"] = lambda: dequantize_4bit(packed, state)
    for bits in (4, 2, 3, 8):
        spec = dataclasses.replace(QLORA_SPEC, weight_bits=bits)
        qt = quantize(w, spec)
        fns[f"ours QuantizedTensor.dequantize {spec.key}"] = qt.dequantize
        if bits == 4:
            fns[f"ours before (unpack codes + dequantize_parts) {spec.key}"] = lambda qt=qt: dequantize_parts(qt.parts())
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clocks()
            fn()
            end = clocks()
            times[name].append((end[0] - start[0], end[1] - start[1]))
    return [{"op": name, "ms": statistics.median(w for w, _ in t) * 1e3, "cpu_ms": statistics.median(c for _, c in t) * 1e3}
            for name, t in times.items()]


def worker(args) -> dict | list:
    import torch

    torch.set_num_threads(args.threads)
    import_everything()  # in every worker: without `import coalora` a packed folder does not load
    if args.worker == "dequant":
        return dequant_worker(args.repeats)
    if args.worker == "speed":
        return speed_worker(json.loads(args.folder), args.vocab, args.prompt, args.new, args.repeats)
    return memory_worker(Path(args.folder), args.vocab, args.prompt, args.new)


def run_worker(kind: str, folder: str, args, vocab: int = 0):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", kind, "--folder", folder, "--vocab", str(vocab), "--threads",
           str(args.threads), "--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Driver and report
# ---------------------------------------------------------------------------------------------------------

def measure(name: str, args, tmp: Path) -> dict:
    from coalora.space import Config

    spec = MODELS[name]
    root = tmp / name
    root.mkdir()
    sizes = make_project(root, spec)
    outs = deploy(root, args.budget)
    qc = json.loads((outs["packed"] / "model" / "config.json").read_text())["quantization_config"]
    shapes = {n: tuple(s) for n, s in qc["shapes"].items()}
    config = Config.from_dict({"layers": qc["layers"], "id": qc["config_id"]}, shapes)
    memory: dict[str, list[dict]] = {"dense": [], "packed": []}
    for _ in range(args.rounds):
        for fmt in memory:
            memory[fmt].append(run_worker("memory", str(outs[fmt]), args, spec["vocab"]))
            r = memory[fmt][-1]
            print(f"{name:13} memory {fmt:6} peak {r['peak_mib']:.1f} MiB (imports {r['imports_mib']:.1f}), target "
                  f"layers {r['target_bytes'] / 2**20:.2f} MiB", flush=True)
    speed = run_worker("speed", json.dumps({k: str(v) for k, v in outs.items()}), args, spec["vocab"])
    print(f"{name:13} speed {json.dumps(speed)}", flush=True)
    mem = {fmt: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for fmt, rs in memory.items()}
    numel = sizes["target_params"]
    return {"sizes": sizes, "config": {"id": config.id, "bits": config.bits, "exact_bits": config.exact_bits},
            "accounting_bytes": config.bits * numel / 8, "exact_bytes": config.exact_bits * numel / 8,
            "float32_bytes": 4 * numel, "memory": mem, "speed": speed}


def versions() -> str:
    import peft
    import torch
    import transformers

    text = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    try:
        import bitsandbytes

        text += f", bitsandbytes {bitsandbytes.__version__}"
    except ImportError:
        pass
    return text + f", Python {platform.python_version()}"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def markdown(rows: dict, dequant: list[dict], args, load: tuple[float, float]) -> str:
    lines = [
        "# A deployed model: packed vs dense folder, and packed dequantization vs bitsandbytes (CPU)", "",
        f"- command: `{' '.join(['python benchmarks/deploy.py', *sys.argv[1:]])}`",
        f"- date: {datetime.date.today().isoformat()}; machine: {cpu_model()}, {os.cpu_count()} cores shared with "
        f"other jobs, {args.threads} torch thread(s) per process; load average before/after: "
        f"{load[0]:.1f} / {load[1]:.1f} (absolute times are inflated by the other jobs; ratios come from "
        f"alternated runs in one process)",
        f"- versions: {versions()}",
        f"- both folders from `coalora adapt --budget {args.budget:g}` on the same project (random base weights, "
        f"synthetic cost table, CoA-LoRA adapter r = {RANK}); each loaded with `from_pretrained` + "
        f"`PeftModel.from_pretrained`, float32", "",
        "## Memory", "",
        f"Peak RSS (VmHWM) of a fresh process that imports torch, transformers, peft and coalora, loads the folder "
        f"and its adapter, runs a {args.prompt}-token prompt and generates {args.new} tokens; median of "
        f"{args.rounds} processes per folder (`MALLOC_MMAP_THRESHOLD_=65536`). \"Target layers\" are the bytes the "
        "quantized layers hold once loaded (PackedLinear buffers; the dense folder's float32 weights).", "",
        "| model | params (target) | config bits (exact) | target layers: packed / float32 (MiB) | ratio | "
        "vs bits accounting | process peak: packed / dense (MiB) | ratio | after imports (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        mem, cfg = row["memory"], row["config"]
        held = mem["packed"]["target_bytes"]
        lines.append(
            f"| {name} | {row['sizes']['params'] / 1e6:.1f}M ({row['sizes']['target_params'] / 1e6:.1f}M) | "
            f"{cfg['bits']:.4f} ({cfg['exact_bits']:.4f}) | {mib(held)} / {mib(mem['dense']['target_bytes'])} | "
            f"**{held / mem['dense']['target_bytes']:.4f}** | {held / row['accounting_bytes']:.4f} × bits·n/8 "
            f"({held / row['exact_bytes']:.5f} × exact) | {mem['packed']['peak_mib']:.1f} / "
            f"{mem['dense']['peak_mib']:.1f} | **{mem['packed']['peak_mib'] / mem['dense']['peak_mib']:.3f}** | "
            f"{mem['packed']['imports_mib']:.1f} / {mem['dense']['imports_mib']:.1f} |")
    lines += [
        "", "Bits accounting: bits·n/8 is the configuration's average bits (Σ bpp·numel / Σ numel, the number the "
        "budget constrains) times the target parameters; the exact storage adds what that rate leaves out — "
        "each matrix's partial last block and super-block and its fp32 offset — and the packed buffers add at most "
        "2 bytes per matrix on top (each bit stream rounds up to a whole byte).", "",
        "## Speed", "",
        f"One process loads both folders (+ adapters) and alternates them, {args.repeats} rounds after one warm-up, "
        f"batch 1, greedy: prompt = a forward of {args.prompt} tokens; decode = (generate {args.new} tokens − "
        f"generate 1 token) / {args.new - 1}. Rates from wall-clock and from CPU time (this process's work; on a "
        "shared machine it leaves out the waits for a core).", "",
        "| model | clock | prompt tok/s: packed / dense | ratio | decode tok/s: packed / dense | ratio | "
        "max abs logit diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        s = row["speed"]
        for clock in ("wall", "cpu"):
            p, d = s["packed"][clock], s["dense"][clock]
            lines.append(f"| {name} | {clock} | {p['prompt_tok_s']:.1f} / {d['prompt_tok_s']:.1f} | "
                         f"**{p['prompt_tok_s'] / d['prompt_tok_s']:.3f}** | {p['decode_tok_s']:.2f} / "
                         f"{d['decode_tok_s']:.2f} | **{p['decode_tok_s'] / d['decode_tok_s']:.3f}** | "
                         f"{s['max_logit_diff']:.2e} |")
    base = next((r for r in dequant if r["op"].startswith("bitsandbytes")), None)
    lines += [
        "", "## Dequantizing a 4096×4096 matrix", "",
        f"float32, seed 0, median of {args.repeats} interleaved rounds after a warm-up, one process; wall-clock "
        "and CPU time (user + system, page faults of the fresh 64 MiB result included).", "",
        "| operation | wall ms | ratio vs bitsandbytes | CPU ms | ratio vs bitsandbytes |", "|---|---:|---:|---:|---:|",
    ]
    for r in dequant:
        wall = "n/a" if base is None else f"{r['ms'] / base['ms']:.2f}"
        cpu = "n/a" if base is None else f"{r['cpu_ms'] / base['cpu_ms']:.2f}"
        lines.append(f"| {r['op']} | {r['ms']:.1f} | {wall} | {r['cpu_ms']:.1f} | {cpu} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budget", type=float, default=3.25)
    parser.add_argument("--rounds", type=int, default=2, help="memory processes per folder")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (speed, dequantize)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=16, help="generated tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "deploy.md")
    parser.add_argument("--worker", choices=("memory", "speed", "dequant"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    load_before = os.getloadavg()[0]
    dequant = run_worker("dequant", "", args)
    for r in dequant:
        print(f"dequantize {r['op']:64} {r['ms']:8.1f} ms", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        for name in args.models.split(","):
            rows[name] = measure(name, args, Path(tmp))
    text = markdown(rows, dequant, args, (load_before, os.getloadavg()[0]))
    print(text)
    old = args.out.read_text() if args.out.is_file() else ""  # hand-written notes below the marker survive
    args.out.write_text(text + ("\n" + NOTES + old.split(NOTES, 1)[1] if NOTES in old else ""))


if __name__ == "__main__":
    main()
