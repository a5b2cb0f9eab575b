"""``coalora stage`` and ``coalora run``: building stages from the command line.

Params are validated (cross-field rules included) and what they take from ``coalora fetch``'s cache checked
before anything is imported, started or written; the project checks concern only the stages that will run;
the project lock is taken before any stage starts, and Prefect starts only when something is to be built.
"""

from __future__ import annotations

import json
from pathlib import Path

from coalora.artifacts import ARTIFACTS
from coalora.errors import UserError


def checked_params(args):
    """The validated params, cross-field rules included (coalora.checks), before anything starts."""
    from coalora.checks import load_checked

    return load_checked(args.root, args.profile)


def _preflight(params, args) -> None:
    """What the params take from `coalora fetch`'s cache is there (before anything is started or written)."""
    from coalora.fetch.cache import preflight

    preflight(params, args.root)


def _project_checks(args, params, stages) -> None:
    """Before any stage: the params fit the project (coalora.checks.PROJECT_CHECKS concerning ``stages``)."""
    from coalora.checks import run_project_checks

    run_project_checks(params, args.root, {section for stage in stages for section in stage.params})


def cmd_stage(args) -> int:
    params = checked_params(args)  # validate before anything is imported, started or written
    _preflight(params, args)
    from coalora import interrupt, lock, parallel
    from coalora.checks import check_writable
    from coalora.env import configure
    from coalora.progress import quiet_libraries
    from coalora.stages import fresh_summary, get_stage, run_stage

    stage = get_stage(args.name)
    check_writable(args.root)
    configure(args.root, create=False)
    quiet_libraries()
    if args.force or fresh_summary(stage, params, args.root) is None:
        _project_checks(args, params, [stage])  # before the lock: bad input leaves no state folder behind
    configure(args.root)
    with lock.acquire(args.root, f"coalora stage {args.name}"), interrupt.handling():
        summary = run_stage(stage, params, args.root, force=args.force)
    if parallel.is_main():  # under `accelerate launch`: printed once
        print(json.dumps(summary, indent=2, sort_keys=True))
    parallel.finish()
    return 0


def cmd_run(args) -> int:
    from coalora.env import configure
    from coalora.stages import STAGES

    params = checked_params(args)  # validate before anything starts or is written
    _preflight(params, args)
    from coalora import parallel

    if parallel.launched():
        raise UserError("coalora run runs in one process; under `accelerate launch` run only `coalora stage train`, "
                        "then `coalora run` (without accelerate) continues with the stages after it")
    selected = args.stages.split(",") if args.stages else list(STAGES)
    unknown = [name for name in selected if name not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)}; allowed: {', '.join(STAGES)}")
    if args.dask_workers is not None and args.dask_workers < 1:
        raise UserError(f"--dask-workers: {args.dask_workers}; give a number of worker processes >= 1")
    if args.dask_address:
        _check_dask_address(args.dask_address)
    from coalora import interrupt, lock
    from coalora.checks import check_writable
    from coalora.progress import quiet_libraries

    check_writable(args.root)
    configure(args.root, create=False)
    quiet_libraries()

    from coalora.stages import fresh_summary, get_stage

    to_run = [get_stage(name) for name in selected if fresh_summary(get_stage(name), params, args.root) is None]
    _project_checks(args, params, to_run)  # before the lock: bad input leaves no state folder behind
    configure(args.root)
    _quiet_prefect_for_user_errors(args.verbose)
    # Only when every stage looked fresh is it asked again, under the lock (another run may have rebuilt a
    # stage meanwhile): the answer that skips the flow must be made while holding it. When some stage is stale
    # the flow starts anyway, and it checks every stage's key itself.
    with lock.acquire(args.root, "coalora run"), interrupt.handling():
        if not to_run and not (args.dask or args.dask_address) and _up_to_date(args, params, selected):
            return 0
        del params
        from flows.server import api_server

        with api_server():  # before Prefect is imported: it reads the server's address from the environment
            from flows.pipeline import run_pipeline

            # the flow in a worker thread: the main thread takes SIGINT/SIGTERM (coalora.interrupt)
            result = interrupt.in_thread(
                run_pipeline, str(Path(args.root).resolve()), args.profile, selected, track=not args.no_track,
                dask=args.dask, dask_address=args.dask_address, dask_workers=args.dask_workers)
    for name, outcome in result["stages"].items():
        _print_stage(name, outcome["state"], outcome["summary"])
    print(f"artifacts: {Path(args.root).resolve() / ARTIFACTS}")
    print_report(Path(args.root).resolve(), result.get("mlflow"))
    return 0


def _check_dask_address(address: str, timeout: float = 5.0) -> None:
    """A ``tcp://HOST:PORT`` (or ``tls://``) scheduler address that answers; UserError otherwise. Other
    schemes (inproc, ucx) are left to Dask."""
    import socket

    scheme, sep, rest = address.rpartition("://")
    if (scheme if sep else "tcp") not in ("tcp", "tls"):
        return
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--dask-address: {address!r} is not a scheduler address; give tcp://HOST:PORT "
                        f"(e.g. tcp://127.0.0.1:8786)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"--dask-address: no Dask scheduler answers at {address} "
                        f"({exc.strerror or type(exc).__name__}); start one (`dask scheduler`) or leave out "
                        f"--dask-address") from None


def _quiet_prefect_for_user_errors(verbose: bool) -> None:
    """Bad input raised inside a stage reaches the user as one line (main prints it), not also as Prefect's
    reports of the failed task and flow (``Finished in state Failed('… OfflineError: …')`` and a traceback);
    ``-v`` keeps them."""
    if verbose:
        return
    import logging

    def kinds(cls: type) -> list[type]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in kinds(child))]

    marks = [f"{cls.__name__}{end}" for cls in kinds(UserError) for end in ("(", ":")]

    def not_user_error(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            return False
        return record.levelno < logging.ERROR or not any(mark in record.getMessage() for mark in marks)

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(getattr(f, "__name__", "") == "not_user_error" for f in logger.filters):
            logger.addFilter(not_user_error)


def _print_stage(name: str, state: str, summary: dict) -> None:
    """One line per stage: name, state, the seconds it took when built, its output folder."""
    print(f"{name:<12} {state:<10} {summary.get('seconds', 0):>8.1f} s  artifacts/{name}/")


def _up_to_date(args, params, selected: list[str]) -> bool:
    """Like ``dvc repro`` on an unchanged project: when every selected stage's output is intact and built
    under its current key, say so and stop, without starting Prefect (its temporary server alone costs
    seconds). Tracking still happens if the MLflow store does not hold these results yet."""
    from coalora.stages import fresh_summary, get_stage

    root = Path(args.root).resolve()
    summaries = {name: fresh_summary(get_stage(name), params, root) for name in selected}
    if any(summary is None for summary in summaries.values()):
        return False
    for name, summary in summaries.items():
        _print_stage(name, "Cached", summary)
    print("every stage is up to date: nothing to run (no flow started)")
    from coalora.stages.dvclock import record_stages

    record_stages(root, args.profile, selected)  # DVC in step, also with outputs made by `coalora stage`
    print(f"artifacts: {root / ARTIFACTS}")
    tracked = None
    if not args.no_track:
        from coalora.track import already_tracked, log_pipeline

        run = already_tracked(root, selected)
        if run is None:
            outcome = {"stages": {name: {"state": "Cached", "summary": s} for name, s in summaries.items()}}
            run = log_pipeline(root, args.profile, outcome)
        tracked = {"run_id": run.run_id, "tracking_uri": run.tracking_uri, "url": run.url()}
    print_report(root, tracked)
    return True


def print_report(root: Path, tracked: dict | None) -> None:
    """Where to look next: the report (when a report stage wrote one) and the MLflow run."""
    reports = sorted((root / ARTIFACTS).glob("report/*.md")) + sorted((root / ARTIFACTS).glob("report/*.html"))
    if reports:
        print(f"report:    {reports[0]}")
    if tracked:
        print(f"mlflow:    run {tracked['run_id']} in {tracked['tracking_uri']}")
        print(f"           browse: `coalora ui`, then {tracked['url']}")


