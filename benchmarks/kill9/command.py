"""The command line: run the chosen trials after one uninterrupted reference run, write the report."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from . import __doc__ as DOC
from .events import PROGRESS_EVENT, STAGES
from .markdown import write_report
from .running import reference_run, run_trial
from .trials import TRIALS

HERE = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python -m benchmarks.kill9"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kill9", description=DOC.splitlines()[0])
    parser.add_argument("--trials", default=None, help="comma-separated trial names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the trials and exit")
    parser.add_argument("--workdir", type=Path, default=None, help="where the projects go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=HERE / "kill9.md")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="only write the report from a finished run's kill9.json")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(t.describe() for t in TRIALS))
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        write_report(saved["trials"], args.out, saved["command"], saved["seconds"], saved["timeline"]["end"])
        print(args.out.read_text())
        return 0
    chosen = TRIALS if not args.trials else [t for t in TRIALS if t.name in args.trials.split(",")]
    unknown = set(args.trials.split(",")) - {t.name for t in TRIALS} if args.trials else set()
    if unknown:
        parser.error(f"unknown trials: {', '.join(sorted(unknown))}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coalora-kill9-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    last = max((STAGES.index(t.last) for t in chosen), default=0)
    reference, timeline, want = reference_run(workdir, STAGES[:last + 1])
    print(f"reference: {timeline['end']:.0f} s; events: " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(timeline.items(), key=lambda kv: kv[1]) if not PROGRESS_EVENT.search(k)),
        flush=True)
    records = []
    for trial in chosen:
        record = run_trial(trial, reference, timeline, want, workdir)
        records.append(record)
        print(f"{trial.name}: {'held' if record['held'] else 'FAILED'}; kills "
              f"{[(k['at'], k['where']) for k in record['kills']]}; {record['problems']}", flush=True)
        (workdir / "kill9.json").write_text(json.dumps({"timeline": timeline, "trials": records}, indent=2))
        if record["held"]:
            shutil.rmtree(workdir / trial.name, ignore_errors=True)  # kept only when something failed
    command = COMMAND + (f" --trials {args.trials}" if args.trials else "")
    seconds = time.monotonic() - started
    (workdir / "kill9.json").write_text(json.dumps({"timeline": timeline, "trials": records, "command": command,
                                                    "seconds": seconds}, indent=2))
    write_report(records, args.out, command, seconds, timeline["end"])
    print(args.out.read_text())
    return 0 if all(r["held"] for r in records) else 1
