"""The calibrate stage on a SmolLM2-135M-shaped model: Fisher, today's cost table vs the sweep, sampling error.

Builds a Llama model with SmolLM2-135M's shapes (30 layers, hidden 576, 9/3 heads, FFN 1536, vocab 49152,
tied embeddings; random weights: the cost of the computation does not depend on the values) and

1. times the Fisher diagonals on random calibration tokens;
2. side by side, per layer shape (k_proj 192×576, q_proj 576×576, gate_proj 1536×576 of block 0): the
   cost-table code this replaces (``baseline_layer_costs``, one quantize/dequantize per spec, on a spread
   subset of specs, scaled to 432) and the sweep (``layer_costs``, exact, all 432 specs); the baseline is
   extrapolated to the 210 layers from its per-shape times;
3. times the sampled cost table (``cost_tables`` with ``--sample-weights``) over all 210 layers;
4. on the layers of ``--exact-blocks`` transformer blocks: the exact table, the relative error of the
   sampled entries (several sample sizes), and the allocation each leads to (``allocate_budget`` at
   several budgets): the exact cost of the sampled table's allocation against the exact optimum.

    python benchmarks/calibrate_cost.py --out benchmarks/calibrate_cost.md

``--builtin`` instead: the default run's built-in model shapes (params.yaml ``model.builtin``: 4 blocks,
hidden 128, FFN 352; 28 layers), the whole exact table, today's code and the sweep alternately, 3 rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np
import torch

from coalora.allocate import allocate_budget
from coalora.calibrate.costs import cost_tables, layer_costs
from coalora.calibrate.fisher import fisher_diagonals
from coalora.quant import all_specs, dequantize_parts, quantize_parts
from coalora.space import model_weights, quantized_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL_MATRIX = 1 << 18  # the replaced code's thread policy


def smollm2_shaped(seed: int = 0):
    """SmolLM2-135M's architecture with random weights (transformers' own initialisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    return LlamaForCausalLM(config).eval()


@contextmanager
def _baseline_threads(weight: torch.Tensor):
    """The replaced code's policy: one intra-op thread below 2^18 weights, all of them above."""
    small = weight.numel() < SMALL_MATRIX
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def baseline_layer_costs(weight, weightings, specs) -> torch.Tensor:
    """The cost-table loop this benchmark compares against (coalora before the sweep): (K, C) float64."""
    w = weight.detach().to(torch.float32).contiguous()
    fs = [None if f is None else f.to(torch.float32) for f in weightings]
    out = torch.empty(len(fs), len(specs), dtype=torch.float64)
    with _baseline_threads(w):
        for c, spec in enumerate(specs):
            sq = dequantize_parts(quantize_parts(w, spec), torch.float32).sub_(w).square_()
            for k, f in enumerate(fs):
                out[k, c] = (sq if f is None else sq * f).sum(dtype=torch.float64)
    return out


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def builtin_side_by_side(rounds: int = 3) -> None:
    """The default run's cost table (28 small layers, all specs, exact): today's code vs the sweep."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=128)).eval()
    layers = quantized_layers(model, TARGETS)
    weights = model_weights(model, layers)
    fisher = {n: torch.rand(s, generator=torch.Generator().manual_seed(i)) ** 4 for i, (n, s) in enumerate(layers.items())}
    specs = all_specs()
    print(f"load average {os.getloadavg()}; torch threads {torch.get_num_threads()}; {len(layers)} layers", flush=True)
    for r in range(rounds):
        _, old_s = timed(lambda: [baseline_layer_costs(weights[n], [None, fisher[n]], specs) for n in layers])
        new, new_s = timed(cost_tables, model, layers, fisher, specs, False)
        print(f"round {r}: today {old_s:.1f} s, sweep {new_s:.1f} s, ratio {old_s / new_s:.2f}", flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builtin", action="store_true", help="the default run's model instead (see above)")
    parser.add_argument("--sample-weights", type=int, default=16384, help="the timed 210-layer sampled run")
    parser.add_argument("--error-samples", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--baseline-every", type=int, default=16, help="baseline on every n-th spec")
    parser.add_argument("--exact-blocks", type=int, nargs="+", default=[0, 15])
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0])
    parser.add_argument("--n-sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--save-exact", default=None, help="write the exact rows (safetensors) here")
    args = parser.parse_args()
    if args.builtin:
        builtin_side_by_side()
        return
    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    specs = all_specs()
    bpp = np.array([s.bits_per_param for s in specs])
    threads = torch.get_num_threads()
    model = smollm2_shaped()
    layers = quantized_layers(model, TARGETS)
    weights = model_weights(model, layers)
    names = list(layers)
    n_params = sum(o * i for o, i in layers.values())
    log = []

    def say(line: str) -> None:
        print(line, flush=True)
        log.append(line)

    say(f"{len(layers)} layers, {n_params:,} weights in them; torch threads {torch.get_num_threads()}")
    tokens = torch.randint(0, 49152, (args.n_sequences, args.seq_len), generator=torch.Generator().manual_seed(1))
    fisher, fisher_s = timed(fisher_diagonals, model, tokens, layers, False, args.batch_size)
    say(f"fisher {args.n_sequences}×{args.seq_len} tokens, batch {args.batch_size}: {fisher_s:.1f} s")

    # 2 + 4a: per shape, baseline (subset of specs) then the exact sweep (all specs), on the same layer
    subset = specs[::args.baseline_every]
    exact_rows = [f"model.layers.{b}.{part}" for b in args.exact_blocks for part in
                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    shapes = {}
    exact = {}
    for name in exact_rows:
        shape = layers[name]
        w, fw = weights[name], [None, fisher[name]]
        if shape not in shapes:
            base, base_s = timed(baseline_layer_costs, w, fw, subset)
            base_s *= len(specs) / len(subset)
        torch.set_num_threads(1)
        try:
            rows, ours_s = timed(layer_costs, w, fw, specs)
        finally:
            torch.set_num_threads(threads)
        if shape not in shapes:
            picked = torch.tensor([specs.index(s) for s in subset])
            rel = ((rows[:, picked] - base).abs() / base).max().item()
            shapes[shape] = (base_s, ours_s, rel)
            say(f"{name} {shape}: baseline {base_s:.1f} s/layer (from {len(subset)} specs), sweep exact "
                f"{ours_s:.1f} s/layer, ratio {base_s / ours_s:.2f}, max rel diff {rel:.1e}")
        exact[name] = rows
    if args.save_exact:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in exact.items()}, args.save_exact)
    counts = {}
    for shape in layers.values():
        counts[shape] = counts.get(shape, 0) + 1
    base_total = sum(counts[s] * shapes[s][0] for s in counts)
    ours_exact_total = sum(counts[s] * shapes[s][1] for s in counts)
    say(f"extrapolated to {len(layers)} layers: baseline {base_total:.0f} s, sweep exact {ours_exact_total:.0f} s "
        f"(one thread)")

    # 3: the sampled table over every layer, as the stage runs it
    torch.set_num_threads(threads)
    sampled, sampled_s = timed(cost_tables, model, layers, fisher, specs, False, args.sample_weights, 0)
    say(f"sampled cost table, sample_weights {args.sample_weights}, all {len(layers)} layers: {sampled_s:.1f} s")

    # 4: estimation error and allocation, on the exact layers
    idx = [names.index(n) for n in exact_rows]
    numel = np.array([layers[n][0] * layers[n][1] for n in exact_rows])
    bits = np.array([s.weight_bits for s in specs])
    results = {}
    for sw in args.error_samples:
        if sw == args.sample_weights:
            est = {k: sampled[k][idx] for k in sampled}
        else:
            tables = {k: torch.empty(len(idx), len(specs), dtype=torch.float64) for k in ("squared", "fisher")}
            for j, (n, i) in enumerate(zip(exact_rows, idx)):  # the same seeds as the full run
                rows = layer_costs(weights[n], [None, fisher[n]], specs, sw, i)
                tables["squared"][j], tables["fisher"][j] = rows[0], rows[1]
            est = tables
        for k, key in enumerate(("squared", "fisher")):
            ex = torch.stack([exact[n][k] for n in exact_rows]).numpy()
            es = est[key].numpy()
            rel = (es - ex) / ex
            per_bits = {b: float(np.sqrt((rel[:, bits == b] ** 2).mean())) for b in (2, 3, 4, 8)}
            regrets, moved = [], []
            for budget in args.budgets:
                a = allocate_budget(ex, bpp, numel, budget)
                b = allocate_budget(es, bpp, numel, budget)
                regrets.append(float(ex[np.arange(len(idx)), b.idx].sum() / a.objective - 1))
                moved.append(int((a.idx != b.idx).sum()))
            results[(sw, key)] = (per_bits, float(np.abs(rel).max()), regrets, moved)
            say(f"sample {sw} {key}: rms rel err by b0 " + ", ".join(f"{b}: {v:.3f}" for b, v in per_bits.items())
                + f"; max {np.abs(rel).max():.3f}; allocation regret by budget "
                + ", ".join(f"{r:+.1e}" for r in regrets) + f"; layers changed {moved}")
    load_end = os.getloadavg()
    if args.out:
        write_report(args, started, load_start, load_end, log, shapes, counts, fisher_s, base_total,
                     ours_exact_total, sampled_s, results, len(layers), n_params)


def write_report(args, started, load_start, load_end, log, shapes, counts, fisher_s, base_total, ours_exact_total,
                 sampled_s, results, n_layers, n_params) -> None:
    lines = [
        "# Calibrate on a SmolLM2-135M-shaped model: today's cost table vs the sweep, and sampling",
        "",
        f"- command: `python benchmarks/calibrate_cost.py {' '.join(sys.argv[1:])}`",
        f"- model: SmolLM2-135M's shapes, random weights; {n_layers} target layers, {n_params:,} weights in them",
        f"- machine: {os.cpu_count()} cores, {platform.machine()}; load average (1, 5, 15 min) at start "
        f"{', '.join(f'{x:.2f}' for x in load_start)}, at end {', '.join(f'{x:.2f}' for x in load_end)}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        "",
        "## Time",
        "",
        "| part | seconds |",
        "|---|---:|",
        f"| Fisher, {args.n_sequences}×{args.seq_len} tokens, batch {args.batch_size} | {fisher_s:.0f} |",
        f"| cost table, today's code (extrapolated) | {base_total:.0f} |",
        f"| cost table, sweep exact, one thread (extrapolated) | {ours_exact_total:.0f} |",
        f"| cost table, sweep sampled ({args.sample_weights} weights per layer), all layers, measured | {sampled_s:.0f} |",
        f"| **calibrate stage with sampling: Fisher + sampled table** | **{fisher_s + sampled_s:.0f}** |",
        "",
        "Per layer shape, same layer, one after the other (baseline on every "
        f"{args.baseline_every}th spec, scaled to 432):",
        "",
        "| shape | layers | today s/layer | sweep exact s/layer | ratio | max rel diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for shape, (base_s, ours_s, rel) in shapes.items():
        lines.append(f"| {shape[0]}×{shape[1]} | {counts[shape]} | {base_s:.1f} | {ours_s:.1f} | "
                     f"{base_s / ours_s:.2f} | {rel:.1e} |")
    lines += ["", "## Sampling error (exact layers: blocks " + ", ".join(map(str, args.exact_blocks)) + ")", "",
              "| sample_weights | weighting | rms rel err b0=2 | b0=3 | b0=4 | b0=8 | max | allocation regret per budget "
              f"({', '.join(map(str, args.budgets))} bits) | layers changed |",
              "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for (sw, key), (per_bits, worst, regrets, moved) in results.items():
        lines.append(f"| {sw} | {key} | " + " | ".join(f"{per_bits[b]:.3f}" for b in (2, 3, 4, 8))
                     + f" | {worst:.3f} | " + ", ".join(f"{r:.1e}" for r in regrets) + f" | {moved} |")
    lines += ["", "## Log", "", "```", *log, "```", ""]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    main()
