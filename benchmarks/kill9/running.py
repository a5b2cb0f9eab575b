"""Running ``coalora run`` and killing it (its whole process group) at an event; a trial and the reference run.

Every run's environment carries ``MARK=<trial>``: its processes inherit it whoever their parent, so the ones
that outlive a run are found (and killed, so the next run is clean).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .after_run import repairs, stage_states, state_problems
from .events import STAGES, Observer, where
from .results import differences, results
from .trials import Trial, kill_offset, resolve_anchor

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from test_pipeline import make_project  # noqa: E402  (the projects the end-to-end tests use)

COALORA = str(Path(sys.executable).parent / "coalora")
MARK = "COALORA_KILL9_TRIAL"   # set in every run's environment: its processes carry it, whoever their parent
POLL = 0.02
RUN_TIMEOUT = 3600.0


def _env(mark: str) -> dict[str, str]:
    # a progress line at every update: the kill points at "<loop>:<p>%" are read from them
    env = dict(os.environ, OMP_NUM_THREADS="1", COALORA_PROGRESS_SECONDS="0", **{MARK: mark})
    for key in ("COALORA_PROFILE", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_API_URL",
                "MLFLOW_TRACKING_URI"):
        env.pop(key, None)  # each project keeps its own state (coalora.env puts it in .coalora/)
    return env


def marked_processes(mark: str) -> list[int]:
    """Living processes whose environment carries ``MARK=mark`` (every process a run started)."""
    needle = f"{MARK}={mark}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes() and _state(entry) != "Z":
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _state(entry: Path) -> str:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def leftovers(mark: str, wait: float = 5.0) -> list[str]:
    """The trial's processes still alive ``wait`` seconds from now (then killed, so the next run is clean)."""
    deadline = time.monotonic() + wait
    while (pids := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    described = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
            described.append(f"{pid} {command}")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return described


@dataclass
class Run:
    """One ``coalora run``: its events, how it ended."""

    events: dict[str, float] = field(default_factory=dict)
    returncode: int | None = None
    killed_at: float | None = None
    stdout: str = ""


def run(root: Path, mark: str, log_name: str, stages: tuple[str, ...] = STAGES, *,
        kill_after: tuple[str, float] | None = None, upstream: tuple[str, ...] = ()) -> Run:
    """Start ``coalora run --stages …`` in ``root``; with ``kill_after=(event, seconds)`` SIGKILL its process
    group that long after the event, else let it finish."""
    out, err = root / f"{log_name}.out", root / f"{log_name}.err"
    record = Run()
    observer = Observer(root, err, upstream)
    record.events = observer.events
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([COALORA, "run", "--stages", ",".join(stages)], cwd=root, env=_env(mark),
                                stdout=stdout, stderr=stderr, start_new_session=True)
    started = time.monotonic()
    kill_at = None
    while True:
        now = time.monotonic() - started
        observer.observe(now)
        if proc.poll() is not None:
            record.events.setdefault("end", now)
            break
        if kill_after is not None and kill_at is None and kill_after[0] in record.events:
            kill_at = record.events[kill_after[0]] + kill_after[1]
        if kill_at is not None and now >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            record.killed_at = now
            break
        if now > RUN_TIMEOUT:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            record.events["timeout"] = now
            break
        time.sleep(POLL)
    record.returncode = proc.returncode
    record.stdout = out.read_text(errors="replace")
    return record


def copy_upstream(reference: Path, root: Path, stages: tuple[str, ...]) -> None:
    for stage in stages:
        shutil.copytree(reference / "artifacts" / stage, root / "artifacts" / stage)


def run_trial(trial: Trial, reference: Path, timeline: dict[str, float], want: dict[str, str],
              workdir: Path) -> dict:
    """Kill at each point, then run to the end; returns the trial's record with ``held`` and ``problems``."""
    root = make_project(REPO, workdir / trial.name)
    copy_upstream(reference, root, trial.upstream)
    mark = f"{trial.name}-{os.getpid()}"
    record = {"trial": trial.name, "category": trial.category, "kills": [], "problems": []}
    finished_before_kill: set[str] = set(trial.upstream)
    for i, point in enumerate(trial.points):
        offset = kill_offset(point, timeline)
        anchor = resolve_anchor(point.anchor, timeline)
        killed = run(root, mark, f"kill{i}", trial.stages, kill_after=(anchor, offset), upstream=trial.upstream)
        if killed.killed_at is None:
            record["problems"].append(f"kill {i}: the run ended (rc {killed.returncode}) before {anchor} "
                                      f"+ {offset:.1f} s")
            break
        record["kills"].append({"at": round(killed.killed_at, 2), "after": anchor, "offset": round(offset, 2),
                                "where": where(killed.events, killed.killed_at),
                                "last": where(killed.events, killed.killed_at, progress=True)})
        finished_before_kill |= {name.split(":")[1] for name in killed.events if name.startswith("done:")}
        if left := leftovers(mark):
            record["problems"].append(f"kill {i}: processes outlived the killed run: {left}")
    final = run(root, mark, "final", trial.stages, upstream=trial.upstream)
    record["final_seconds"] = round(final.events.get("end", 0.0), 1)
    record["problems"] += rerun_problems(root, final, finished_before_kill, want, trial.stages)
    if left := leftovers(mark):
        record["problems"].append(f"processes outlived the re-run: {left}")
    record["notes"] = repairs(root)
    record["held"] = not record["problems"]
    return record


def rerun_problems(root: Path, final: Run, finished_before_kill: set[str], want: dict[str, str],
                   stages: tuple[str, ...]) -> list[str]:
    """What is wrong with the run after the kills: it failed, rebuilt a stage finished before a kill, its
    results differ from the reference's (``want``), or it left state behind (``after_run.state_problems``)."""
    if final.returncode != 0:
        err = (root / "final.err").read_text(errors="replace").strip().splitlines()
        return [f"the re-run failed (rc {final.returncode}): {' | '.join(err[-3:])}"]
    problems = []
    states = stage_states(final.stdout)
    rebuilt = sorted(s for s in finished_before_kill if states.get(s) != "Cached")
    if rebuilt:
        problems.append(f"finished before the kill, yet not Cached in the re-run: {rebuilt}")
    mine = {name: value for name, value in want.items() if name.split("/")[0] in stages}
    if diff := differences(results(root), mine):
        problems.append(f"results differ from the uninterrupted run: {diff[:8]}")
    return problems + state_problems(root)


def reference_run(workdir: Path, stages: tuple[str, ...]) -> tuple[Path, dict[str, float], dict[str, str]]:
    """The uninterrupted run of ``stages``: its folder, its timeline of events and its results."""
    root = make_project(REPO, workdir / "reference")
    mark = f"reference-{os.getpid()}"
    done = run(root, mark, "run", stages)
    if done.returncode != 0:
        raise SystemExit(f"the reference run failed (rc {done.returncode}); see {root / 'run.err'}")
    if left := leftovers(mark):
        raise SystemExit(f"processes outlived the reference run: {left}")
    return root, done.events, results(root)
