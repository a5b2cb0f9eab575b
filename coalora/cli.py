"""``coalora …``: the command line. Heavy packages are imported inside commands so ``--help`` is instant.

Bad input (invalid params, unknown stage, missing model or data, corrupt artifact) prints one clear message
naming the field and what is allowed, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from coalora.errors import UserError


def _params(args):
    from coalora.params import load_params

    return load_params(args.root, args.profile)


def cmd_params(args) -> int:
    from coalora.params import dump_params

    print(dump_params(_params(args)), end="")
    return 0


def cmd_stages(args) -> int:
    from coalora.stages import STAGES

    for stage in STAGES.values():
        deps = ", ".join(stage.deps) or "-"
        print(f"{stage.name:<12} params: {', '.join(stage.params):<28} deps: {deps:<20} {stage.description}")
    return 0


def cmd_stage(args) -> int:
    params = _params(args)  # validate before anything is imported, started or written
    from coalora.env import configure

    configure(args.root)
    from coalora.stages import get_stage, run_stage

    summary = run_stage(get_stage(args.name), params, args.root, force=args.force)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_run(args) -> int:
    from coalora.env import configure
    from coalora.stages import STAGES

    params = _params(args)  # validate before anything starts or is written
    selected = args.stages.split(",") if args.stages else list(STAGES)
    unknown = [name for name in selected if name not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)}; allowed: {', '.join(STAGES)}")
    del params
    configure(args.root)
    from flows.pipeline import run_pipeline

    result = run_pipeline(str(Path(args.root).resolve()), args.profile, selected)
    for name, outcome in result["stages"].items():
        print(f"{name:<12} {outcome['state']:<10} {outcome['summary'].get('seconds', 0):>8.1f} s  "
              f"artifacts/{name}/")
    print(f"artifacts: {Path(args.root).resolve() / 'artifacts'}")
    return 0


def cmd_dvc_yaml(args) -> int:
    from coalora.stages.dvcfile import render_dvc_yaml

    path = Path(args.root) / "dvc.yaml"
    text = render_dvc_yaml()
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} differs from the stage declarations; run `coalora dvc-yaml`", file=sys.stderr)
            return 1
        print(f"{path} matches the stage declarations")
        return 0
    from coalora.artifacts import write_text_atomic

    write_text_atomic(path, text)
    print(f"wrote {path}")
    return 0


def cmd_adapt(args) -> int:
    params = _params(args)  # validate before anything is imported or written
    if (args.budget is None) == (args.config is None):
        raise UserError("adapt: give exactly one of --budget BITS or --config FILE")
    from coalora.env import configure

    configure(args.root)
    from coalora.adapt import adapt

    s = adapt(args.root, params, args.out, budget=args.budget, config_path=args.config)
    t = s["seconds"]
    budget = f" (budget {s['budget']})" if s["budget"] is not None else ""
    print(f"config  {s['config_id']}: {s['bits']:.4f} bits{budget}, exact {s['exact_bits']:.4f}, {s['layers']} "
          f"quantized layers (embeddings, norms, head not counted)")
    print(f"model   {s['model']}  (packed weights {s['packed_bytes'] / 2**20:.2f} MiB)")
    print(f"adapter {s['adapter']}  (peft LoRA r={s['rank']}, alpha={s['alpha']:g}"
          f"{', θ folded in' if s['confignet'] else ''})")
    print(f"time    load {t['load']:.3f} s, allocate {t['allocate']:.3f} s, quantize {t['quantize']:.3f} s, "
          f"fold {t['fold']:.3f} s, write {t['write']:.3f} s; total {t['total']:.3f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coalora", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project folder holding params.yaml (default: .)")
    parser.add_argument("--profile", default=None,
                        help="overlay profiles/NAME.yaml on params.yaml (e.g. smoke); env COALORA_PROFILE")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("params", help="print the resolved, validated params").set_defaults(fn=cmd_params)
    sub.add_parser("stages", help="list the stages in pipeline order").set_defaults(fn=cmd_stages)

    stage = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name")
    stage.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    stage.set_defaults(fn=cmd_stage)

    run = sub.add_parser("run", help="run the pipeline as a Prefect flow (cached, resumable)")
    run.add_argument("--stages", default=None, help="comma-separated subset, in pipeline order")
    run.set_defaults(fn=cmd_run)

    adapt = sub.add_parser("adapt", help="a quantized model + peft adapter (θ folded in) for a budget or config")
    adapt.add_argument("--budget", type=float, default=None, help="average bits over the quantized layers")
    adapt.add_argument("--config", type=Path, default=None, help="a config JSON file instead of --budget")
    adapt.add_argument("--out", type=Path, required=True, help="output folder (gets model/ and adapter/)")
    adapt.set_defaults(fn=cmd_adapt)

    dvc = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declarations")
    dvc.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml has drifted")
    dvc.set_defaults(fn=cmd_dvc_yaml)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"coalora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("coalora: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
