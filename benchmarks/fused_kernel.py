"""botorch's fused qLogNEHVI C++ kernel (compiled at run time) vs its pure-PyTorch path, on one search
round's proposal at the default profile's sizes, side by side on one machine.

    .venv/bin/python benchmarks/fused_kernel.py [--repeats 3] [--layers 28] [--seen 54]

botorch 0.18.1 compiles ``logei_fused_ext`` on first use (``torch.utils.cpp_extension.load``, holding a lock
file in the extension folder while it compiles); coalora turns that off (``coalora.search.gp``). This
measures what that costs: each mode runs in fresh processes (the kernel is loaded once per process), the
fused one against an extension folder compiled beforehand (the compile time is reported on its own), and
the proposals of both are compared. Writes benchmarks/fused_kernel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
import numpy as np, torch
mode, layers, seen, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import botorch.acquisition.multi_objective.logei as logei
from coalora.search import gp as gp_module
if mode == "fused":
    logei._try_load_fused_kernel()
    assert logei._C is not None, "the fused kernel did not load"
else:
    gp_module.use_python_kernel()
from coalora.quant import all_specs
from coalora.search.encoding import encode
from coalora.search.propose import candidate_set, propose
torch.set_num_threads(1)
rng = np.random.default_rng(seed)
n_specs = len(all_specs())
pool = [[int(i) for i in rng.integers(n_specs, size=layers)] for _ in range(seen)]
weights = torch.ones(layers, dtype=torch.float64) / layers
x_seen = encode(pool)
bits = gp_module.bits_of(x_seen, weights)
f1 = 1.0 + 0.3 * torch.exp(-(bits - 2.0)) + 0.02 * torch.as_tensor(rng.standard_normal(seen))
candidates = candidate_set(pool, {tuple(p) for p in pool}, 256, rng)
started = time.perf_counter()
chosen = propose("ehvi", candidates, 4, x_seen=x_seen, f1_norm=f1 / f1.max(), weights=weights,
                 reference=[1.1, 1.1], mc_samples=32, seed=seed, rng=rng)
print(json.dumps({"seconds": time.perf_counter() - started, "chosen": chosen}))
"""


def child(mode: str, args, seed: int, ext_dir: Path) -> dict:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.layers), str(args.seen), str(seed)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_seconds(ext_dir: Path) -> float:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import botorch.acquisition.multi_objective.logei as l; "
                    "l._try_load_fused_kernel(); assert l._C is not None"], env=env, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--seen", type=int, default=54)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ext_dir = Path(tmp)
        first_load = compile_seconds(ext_dir)   # includes the compile
        cached_load = compile_seconds(ext_dir)  # loads the compiled extension
        times = {"fused": [], "python": []}
        same = True
        for seed in range(args.repeats):
            results = {mode: child(mode, args, seed, ext_dir) for mode in ("python", "fused")}
            for mode, result in results.items():
                times[mode].append(result["seconds"])
            same &= results["python"]["chosen"] == results["fused"]["chosen"]
    fused, python = statistics.median(times["fused"]), statistics.median(times["python"])
    lines = [
        "# botorch's fused qLogNEHVI kernel vs the pure-PyTorch path",
        "",
        f"`.venv/bin/python benchmarks/fused_kernel.py --repeats {args.repeats} --layers {args.layers} "
        f"--seen {args.seen}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), Python "
        f"{platform.python_version()}, one thread per process. One proposal = fit the f1 GP on {args.seen} seen "
        f"configs of {args.layers} layers, then greedy q=4 qLogNEHVI over 256 candidates, 32 MC samples "
        f"(the default profile's search round).",
        "",
        "| | seconds per proposal (median) |",
        "|---|---|",
        f"| pure PyTorch (coalora's choice) | {python:.3f} |",
        f"| fused C++ kernel | {fused:.3f} |",
        f"| ratio pure / fused | {python / fused:.2f} |",
        "",
        f"Compiling the kernel once (first load in an empty extension folder): {first_load:.1f} s; loading it "
        f"compiled: {cached_load:.1f} s (both include importing botorch).",
        f"Same proposals in every repeat: {'yes' if same else 'NO'}.",
        "",
        f"Raw seconds: pure {', '.join(f'{t:.3f}' for t in times['python'])}; fused "
        f"{', '.join(f'{t:.3f}' for t in times['fused'])}.",
    ]
    (HERE / "fused_kernel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
