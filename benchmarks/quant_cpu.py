"""CPU speed of our NF-k double quantization against bitsandbytes NF4, side by side in one run.

For one matrix (default 4096×4096 float32) it times, as medians over ``--repeats`` runs:
  * bitsandbytes NF4 + double quantization (blocksize 64): quantize_4bit + dequantize_4bit (the baseline);
  * ours, ``fake_quantize`` round trip for weight_bits 2, 3, 4, 8 (other fields QLoRA's: s8, fp32, 64, 256);
  * ours, ``quantize`` (bit packing included) and ``QuantizedTensor.dequantize`` separately.
Ratios are ours / bitsandbytes round trip. Results are printed and written as markdown (``--out``).

    python benchmarks/quant_cpu.py                     # 4096×4096, 5 repeats → benchmarks/quant_cpu.md
    python benchmarks/quant_cpu.py --rows 1024 --cols 1024 --repeats 3 --out /tmp/q.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from coalora.quant import QLORA_SPEC, bnb_available, bnb_nf4_roundtrip, fake_quantize, quantize

BASELINE = "bitsandbytes NF4 round trip (baseline)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of every ``fn()`` over ``repeats`` rounds, after one untimed warm-up each.

    Rounds are interleaved (every operation once per round), so a change in machine load hits all
    operations alike and the ratios stay comparable.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def operations(w: torch.Tensor) -> tuple[dict[str, Callable[[], object]], dict[str, dict]]:
    """The timed operations on ``w`` and, per operation, its relative error or stored bytes."""
    fns: dict[str, Callable[[], object]] = {}
    info: dict[str, dict] = {}

    def rel_err(out: torch.Tensor) -> float:
        return float((w.double() - out.double()).norm() / w.double().norm())

    if bnb_available():
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        quant = dict(blocksize=64, compress_statistics=True, quant_type="nf4")
        packed, state = quantize_4bit(w, **quant)
        fns[BASELINE] = lambda: bnb_nf4_roundtrip(w)
        # Stored bytes of bitsandbytes: 4-bit codes, 8-bit block scales, fp32 scales of the scales and the
        # offset (the shared 256-entry dynamic code table is not counted).
        nbytes = packed.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes + 4
        info[BASELINE] = {"rel_err": rel_err(bnb_nf4_roundtrip(w)), "nbytes": nbytes}
        fns["bitsandbytes NF4 quantize_4bit"] = lambda: quantize_4bit(w, **quant)
        fns["bitsandbytes NF4 dequantize_4bit"] = lambda: dequantize_4bit(packed, state)
    specs = [dataclasses.replace(QLORA_SPEC, weight_bits=bits) for bits in (2, 3, 4, 8)]  # others: QLoRA's
    for spec in specs:
        name = f"ours fake_quantize {spec.key}"
        fns[name] = lambda spec=spec: fake_quantize(w, spec)
        info[name] = {"rel_err": rel_err(fake_quantize(w, spec))}
    for spec in specs:
        qt = quantize(w, spec)
        fns[f"ours quantize (packed) {spec.key}"] = lambda spec=spec: quantize(w, spec)
        info[f"ours quantize (packed) {spec.key}"] = {"nbytes": qt.nbytes}
        fns[f"ours QuantizedTensor.dequantize {spec.key}"] = qt.dequantize
    return fns, info


def run(args: argparse.Namespace) -> list[dict]:
    """Time every operation; returns one row per operation."""
    torch.manual_seed(args.seed)
    w = torch.randn(args.rows, args.cols).to(DTYPES[args.dtype])
    fns, info = operations(w)
    seconds = median_seconds(fns, args.repeats)
    rows = [{"op": op, "seconds": seconds[op], "rel_err": None, "nbytes": None} | info.get(op, {}) for op in fns]
    for r in rows:
        err = "" if r["rel_err"] is None else f"   rel.err {r['rel_err']:.4f}"
        print(f"{r['op']:48s} {r['seconds'] * 1e3:9.1f} ms{err}", flush=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    base = next((r["seconds"] for r in rows if r["op"] == BASELINE), None)
    versions = f"torch {torch.__version__}"
    if bnb_available():
        import bitsandbytes

        versions += f", bitsandbytes {bitsandbytes.__version__}"
    lines = [
        "# Quantization speed on CPU: ours vs bitsandbytes NF4",
        "",
        f"- command: `{' '.join(['python'] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`",
        f"- matrix: {args.rows}×{args.cols} {args.dtype}, seed {args.seed}; "
        f"median of {args.repeats} interleaved rounds after one warm-up",
        f"- machine: {os.cpu_count()} cores (`nproc`), {cpu_model()}, avx512_bf16: {'avx512_bf16' in cpu_flags()}; "
        f"torch threads {torch.get_num_threads()}",
        f"- load average when written (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(other jobs on the machine inflate absolute times; the ratios come from the same run)",
        f"- versions: Python {platform.python_version()}, {versions}",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        "- ratio = time / bitsandbytes NF4 round trip (quantize_4bit + dequantize_4bit, blocksize 64, double quant)",
        "",
        "| operation | median ms | ratio vs bnb round trip | rel. error ‖W−Ŵ‖/‖W‖ | stored bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "n/a" if base is None else f"{r['seconds'] / base:.2f}"
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.4f}"
        nbytes = "" if r["nbytes"] is None else f"{r['nbytes']:,}"
        lines.append(f"| {r['op']} | {r['seconds'] * 1e3:.1f} | {ratio} | {err} | {nbytes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("quant_cpu.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    text = markdown(rows, args)
    args.out.write_text(text)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
