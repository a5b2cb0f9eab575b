"""kill -9 anywhere, any number of times: SIGKILL ``coalora run`` (its whole process group) at points spread
over every stage, Prefect's server start, MLflow's store creation and logging and the search, run it again,
and check that the re-run ends with the results of an uninterrupted run and that nothing outlives the runs.

    .venv/bin/python benchmarks/kill9.py                     # every trial (~25; hours on a loaded machine)
    .venv/bin/python benchmarks/kill9.py --trials train-ckpt,mlflow-store   # some of them
    .venv/bin/python benchmarks/kill9.py --list              # the trials and where each kills

Each trial is a fresh smoke-profile project (``tests/test_pipeline.make_project``). Trials aimed at a late
stage start from a copy of the reference run's finished upstream stages, so they reach their kill point
sooner; everything else (Prefect's state, the MLflow store, the work folders) starts empty. A kill point is
an event of the run (a stage's temporary output folder appears, a training checkpoint or an evaluation row is
written, a log line, MLflow's temporary store appears, ...) plus a fraction of the time to a later event,
both as measured in the uninterrupted reference run. A trial kills at each of its points in turn (a new
``coalora run`` each time), then runs ``coalora run`` to its end and checks that:

- it exits 0 and every stage finished before a kill is reported Cached (kept, not rebuilt);
- every result file equals the reference's: adapters, pools, checkpoints' products, tables, the report
  (byte for byte, after leaving out wall-clock fields: ``WALL_CLOCK``);
- no process started by any of the trial's runs is alive (Prefect's server included; found by an
  environment mark every child inherits), after each kill and at the end;
- the project lock is free, no ``.tmp-*``/``.old-*`` folder or temporary MLflow store is left, the MLflow
  store is at the installed schema revision and none of its runs of this project is still RUNNING.

Writes ``benchmarks/kill9.md`` (a table per category: tried, held, failed) and ``kill9.json`` in the work
folder (every trial's kills, timings and problems).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from test_pipeline import make_project  # noqa: E402  (the projects the end-to-end tests use)

COALORA = str(Path(sys.executable).parent / "coalora")
MARK = "COALORA_KILL9_TRIAL"   # set in every run's environment: its processes carry it, whoever their parent
STAGES = ("data", "base_model", "calibrate", "allocate", "train", "evaluate", "report")
# Keys (JSON) and columns (CSV) holding wall-clock times or timestamps, which no two runs share.
# Words separated by _ . - (DVC's metrics files flatten keys with dots: "coalora.seconds").
WALL_CLOCK = re.compile(r"(^|[_.-])(seconds|secs|time|timestamp|started|finished|date|wall)($|[_.-])|_s$")
POLL = 0.02
RUN_TIMEOUT = 3600.0


# ---------------------------------------------------------------------------------------------------------
# Events of a running project
# ---------------------------------------------------------------------------------------------------------

def _glob(pattern_root: Path, pattern: str) -> list[Path]:
    """``pattern_root.glob(pattern)`` of a folder the run is changing: a folder that vanishes while it is
    listed (a stage's work folder removed when the stage ends) counts as empty, and the listing is retried."""
    for _ in range(5):
        try:
            return list(pattern_root.glob(pattern))
        except FileNotFoundError:
            continue
    return []


def _exists(pattern_root: Path, pattern: str) -> bool:
    return bool(_glob(pattern_root, pattern))


class Observer:
    """Records ``events`` (event → seconds since the run started) as they happen in a project."""

    def __init__(self, root: Path, log: Path, upstream: tuple[str, ...] = ()):
        self.root, self.log, self.upstream = root, log, upstream
        self.events: dict[str, float] = {"start": 0.0}
        self._offset, self._tail = 0, ""
        self._progress: dict[str, int] = {}   # progress bar → highest percentage seen
        self._old_checkpoints = set(self._checkpoints())  # left by an earlier run: not this run's progress
        self._new_checkpoints: set[Path] = set()

    def _checkpoints(self) -> list[Path]:
        return _glob(self.root / "artifacts" / ".work" / "train", "*/*/step-*")

    def observe(self, t: float) -> None:
        art, state = self.root / "artifacts", self.root / ".coalora"
        self._mark(t, "server", lambda: (state / "prefect" / "server.log").exists())
        for stage in STAGES:
            self._mark(t, f"run:{stage}", lambda s=stage: _exists(art, f".tmp-{s}-*"))
            if stage not in self.upstream:
                self._mark(t, f"done:{stage}", lambda s=stage: (art / s / "stage.json").exists())
        self._mark(t, "checkpoint", lambda: _exists(art, ".work/train/*/*/step-*"))
        self._new_checkpoints |= set(self._checkpoints()) - self._old_checkpoints
        self._mark(t, f"checkpoints:{len(self._new_checkpoints)}", lambda: bool(self._new_checkpoints))
        self._mark(t, "row", lambda: _exists(art, ".work/evaluate/rows/*.json"))
        rows = len(_glob(art, ".work/evaluate/rows/*.json"))
        self._mark(t, f"rows:{rows}", lambda: rows > 0)
        self._mark(t, "mlflow:init", lambda: _exists(state, ".mlflow.db.init-*"))
        self._mark(t, "mlflow:store", lambda: (state / "mlflow.db").exists())
        self._mark(t, "mlflow:logging", lambda: _exists(state, "mlartifacts/*/*/artifacts/*"))
        text = self._new_log()
        for name, pattern in LOG_EVENTS.items():
            self._mark(t, name, lambda p=pattern: re.search(p, text) is not None)
        # lm-eval's task files are written just before the base model is scored (its own bars are off)
        self._mark(t, "lm-eval", lambda: _exists(art, ".work/base_model/lm_eval/*/*.yaml")
                   or _exists(art, ".work/base_model/lm_eval/*.yaml"))
        for match in PROGRESS.findall(text):
            bar, percent = (match[0], match[1]) if match[0] else (match[2], match[3])
            bar = bar.strip()
            self._progress[bar] = max(self._progress.get(bar, 0), int(percent))
            for step in range(5, self._progress[bar] + 1, 5):  # "<bar>:<p>%" = at least p percent done
                self._mark(t, f"{bar}:{step}%", lambda: True)

    def _mark(self, t: float, name: str, happened) -> None:
        if name not in self.events and happened():
            self.events[name] = t

    def _new_log(self) -> str:
        """What the log gained since the last look (with the previous look's last line, for lines cut)."""
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return ""
        self._offset += len(data)
        new = data.decode(errors="replace")
        text, self._tail = self._tail + new, (self._tail + new)[-200:]
        return text


LOG_EVENTS = {  # events read from the run's log
    "search:round1": r"coalora round 1 at step",
    "search:round2": r"coalora round 2 at step",
}
# coalora's progress lines in a log ("... INFO pretrain: 9/20 (45%), 3.1 it/s"; one per update under
# COALORA_PROGRESS_SECONDS=0, see _env) and tqdm's redraws on a terminal ("pretrain:  45%|████▌  | 9/20").
PROGRESS = re.compile(r"INFO ([^\r\n:|]+): \d+/\d+ \((\d+)%\)|([^\r\n:|]+):\s+(\d+)%\|")


# ---------------------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """Kill at ``anchor`` + ``fraction`` × (``until`` − ``anchor``), both events timed in the reference."""

    anchor: str
    until: str | None = None
    fraction: float = 0.0


@dataclass(frozen=True)
class Trial:
    """Kill ``coalora run --stages data,…,<last>`` at each of ``points`` in turn, then run it to the end.

    ``copied``: how many of the first stages are copied from the reference run beforehand (so the run
    reaches a late kill point sooner); the others are built by the trial's runs.
    """

    name: str
    category: str
    points: tuple[Point, ...]
    last: str = "report"
    copied: int = 0

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES[:STAGES.index(self.last) + 1]

    @property
    def upstream(self) -> tuple[str, ...]:
        return STAGES[:self.copied]

    def describe(self) -> str:
        kills = "; ".join(f"{p.anchor}" + (f" + {p.fraction:.0%} to {p.until}" if p.until else "")
                          for p in self.points)
        start = f", from a copy of {', '.join(self.upstream)}" if self.upstream else ""
        return f"{self.name:<18} {self.category:<22} kill at {kills} (stages up to {self.last}{start})"


def _span(stage: str, fraction: float) -> Point:
    return Point(f"run:{stage}", f"done:{stage}", fraction)


def _in(stage: str, name: str, *fractions: float) -> list[Trial]:
    """Trials killing stage ``stage`` at these fractions of its duration, its upstream stages copied."""
    return [Trial(f"{name}-{round(f * 100)}", stage, (_span(stage, f),), stage, STAGES.index(stage))
            for f in fractions]


def _at(event: str, category: str, name: str, last: str | None = None) -> Trial:
    """A trial killing once ``event`` happens, its category's upstream stages copied."""
    last = last or category.split(":")[0]
    return Trial(name, category, (Point(event),), last, STAGES.index(last))


# Kill points inside a stage are its own progress where it shows any (progress bars, checkpoints, rows), so
# they land where aimed however loaded the machine; elsewhere a fraction of the span the reference measured.
TRAIN = STAGES.index("train")
TRIALS = [
    *_in("report", "report", 0.5),                      # first: the longest comparisons (tables, report)
    _at("rows:50%", "evaluate", "evaluate-rows-50"),    # of the reference's rows (resolve_anchor)
    Trial("server-start", "Prefect server start", (Point("start", "server", 1.0),), "data"),
    Trial("server-migrate", "Prefect server start", (Point("server", "run:data", 0.3),), "data"),
    *_in("data", "data", 0.0, 0.6),
    _at("pretrain:15%", "base_model", "base-pretrain-15"),
    _at("pretrain:60%", "base_model", "base-pretrain-60"),
    _at("lm-eval", "base_model", "base-eval"),
    _at("cost table:50%", "calibrate", "calibrate-costs-50"),
    *_in("allocate", "allocate", 0.3, 0.85),
    _at("checkpoints:1", "train", "train-ckpt"),
    _at("coalora joint:25%", "train", "train-coalora-25"),
    _at("coalora-random joint:75%", "train", "train-random-75"),
    _at("shared joint:50%", "train", "train-shared-50"),
    # coalora's search rounds run when its bar reaches their step (rounds at 50% and 100%)
    _at("coalora joint:50%", "train: search round", "search-1"),
    _at("coalora joint:100%", "train: search round", "search-2"),
    _at("rows:1", "evaluate", "evaluate-row-1"),
    _at("rows:90%", "evaluate", "evaluate-rows-90"),
    # every stage copied: `coalora run` finds them up to date and only creates the store and logs to it
    Trial("mlflow-store", "MLflow store creation", (Point("mlflow:init", "mlflow:store", 0.3),), "train", TRAIN + 1),
    Trial("mlflow-store-late", "MLflow store creation", (Point("mlflow:init", "mlflow:store", 0.9),), "train",
          TRAIN + 1),
    Trial("mlflow-log", "MLflow logging", (Point("mlflow:logging", "end", 0.2),), "report", len(STAGES)),
    Trial("mlflow-log-late", "MLflow logging", (Point("mlflow:logging", "end", 0.8),), "report", len(STAGES)),
    # after the report stage, inside the flow (Prefect's tracking task)
    Trial("mlflow-log-flow", "MLflow logging", (Point("mlflow:logging", "end", 0.4),), "report",
          STAGES.index("report")),
    Trial("again-3", "repeated kills", (Point("pretrain:50%"), Point("checkpoints:1"), Point("rows:1"))),
    Trial("again-same-5", "repeated kills", (Point("checkpoints:1"),) * 5, "train", TRAIN),
]


# ---------------------------------------------------------------------------------------------------------
# Running and killing
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------

def _timeless(obj):
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if not WALL_CLOCK.search(str(k))}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _csv_timeless(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return text
    keep = [i for i, name in enumerate(rows[0]) if not WALL_CLOCK.search(name)]
    return "\n".join(",".join(row[i] for i in keep if i < len(row)) for row in rows)


SECONDS_IN_TEXT = re.compile(r"\d+(?:\.\d+)? s\b")


def _md_timeless(text: str) -> str:
    """The report without the table columns whose header names a wall-clock quantity, and with every
    "<number> s" in its prose masked."""
    out, keep = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if keep is None:
                keep = [i for i, c in enumerate(cells) if not re.search(r"(^|\s)s(\s|\)|$)|seconds|time", c, re.I)]
            line = "|".join(cells[i] for i in keep if i < len(cells))
        else:
            keep = None
            line = SECONDS_IN_TEXT.sub("<t> s", line)  # "33 rows at 0.549 s each"
        out.append(line)
    return "\n".join(out)


def results(root: Path) -> dict[str, str]:
    """Every file of every stage output, as compared between runs: its bytes' digest, or for JSON, CSV and
    Markdown its content without wall-clock fields. Manifests (digests of files holding times) are left
    out: the files they list are compared themselves."""
    import hashlib

    art = root / "artifacts"
    found = {}
    for path in sorted(art.rglob("*")):
        rel = path.relative_to(art).as_posix()
        if not path.is_file() or rel.startswith(".") or path.name == "MANIFEST.json":
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            found[rel] = json.dumps(_timeless(json.loads(data)), sort_keys=True)
        elif path.suffix == ".csv":
            found[rel] = _csv_timeless(data.decode())
        elif path.suffix == ".md":
            found[rel] = _md_timeless(data.decode())
        else:
            found[rel] = hashlib.sha256(data).hexdigest()
    return found


def differences(got: dict[str, str], want: dict[str, str]) -> list[str]:
    names = sorted(set(got) | set(want))
    return [name for name in names if got.get(name) != want.get(name)]


# ---------------------------------------------------------------------------------------------------------
# Checks after a trial
# ---------------------------------------------------------------------------------------------------------

def state_problems(root: Path) -> list[str]:
    """What a finished run must not leave: a held lock, temporary folders or stores, an old or half-made
    MLflow store, MLflow runs of this project still RUNNING."""
    problems = []
    lock = root / ".coalora" / "run.lock"
    if lock.exists():
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                problems.append("the project lock is still held")
        if lock.read_text().strip():
            problems.append(f"the project lock still names a holder: {lock.read_text().strip()}")
    art = root / "artifacts"
    left = [p.relative_to(root).as_posix() for pattern in (".tmp-*", ".old-*", ".*.tmp")
            for p in art.rglob(pattern)]
    left += [p.relative_to(root).as_posix() for p in (root / ".coalora").glob(".mlflow.db.init-*")]
    if left:
        problems.append(f"temporary files left: {', '.join(sorted(left)[:5])}")
    if (art / ".work").exists() and any((art / ".work").iterdir()):
        problems.append(f"work folders left: {sorted(p.name for p in (art / '.work').iterdir())}")
    problems += _mlflow_problems(root)
    return problems


def _mlflow_problems(root: Path) -> list[str]:
    db = root / ".coalora" / "mlflow.db"
    if not db.exists():
        return ["no MLflow store"]
    from coalora.track import _head_revision, _schema_revision

    if _schema_revision(db) != _head_revision():
        return [f"MLflow store at revision {_schema_revision(db)}, not {_head_revision()}"]
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        running = connection.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    return [f"{running} MLflow runs still RUNNING"] if running else []


def stage_states(stdout: str) -> dict[str, str]:
    """``stage → state`` from ``coalora run``'s stage lines."""
    states = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in STAGES:
            states[parts[0]] = parts[1]
    return states


# ---------------------------------------------------------------------------------------------------------
# A trial
# ---------------------------------------------------------------------------------------------------------

def copy_upstream(reference: Path, root: Path, stages: tuple[str, ...]) -> None:
    for stage in stages:
        shutil.copytree(reference / "artifacts" / stage, root / "artifacts" / stage)


def resolve_anchor(anchor: str, timeline: dict[str, float]) -> str:
    """``rows:<p>%`` → ``rows:<n>``: p percent of the rows the reference run scored (at least one)."""
    if (match := re.fullmatch(r"rows:(\d+)%", anchor)) is None:
        return anchor
    total = max((int(name.split(":")[1]) for name in timeline if re.fullmatch(r"rows:\d+", name)), default=1)
    return f"rows:{max(1, round(total * int(match.group(1)) / 100))}"


def kill_offset(point: Point, timeline: dict[str, float]) -> float:
    if point.until is None or point.fraction == 0.0:
        return 0.0
    return max(0.0, point.fraction * (timeline[point.until] - timeline[point.anchor]))


PROGRESS_EVENT = re.compile(r"%$|^rows:|^checkpoints:|^lm-eval$")


def where(events: dict[str, float], killed_at: float, progress: bool = False) -> str:
    """The last event before the kill: where the run was (a stage's progress events only if ``progress``)."""
    before = [(t, name) for name, t in events.items()
              if t <= killed_at and name != "start" and (progress or not PROGRESS_EVENT.search(name))]
    return max(before)[1] if before else "start"


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
    if final.returncode != 0:
        err = (root / "final.err").read_text(errors="replace").strip().splitlines()
        record["problems"].append(f"the re-run failed (rc {final.returncode}): {' | '.join(err[-3:])}")
    else:
        states = stage_states(final.stdout)
        rebuilt = sorted(s for s in finished_before_kill if states.get(s) != "Cached")
        if rebuilt:
            record["problems"].append(f"finished before the kill, yet not Cached in the re-run: {rebuilt}")
        mine = {name: value for name, value in want.items() if name.split("/")[0] in trial.stages}
        if diff := differences(results(root), mine):
            record["problems"].append(f"results differ from the uninterrupted run: {diff[:8]}")
        record["problems"] += state_problems(root)
    if left := leftovers(mark):
        record["problems"].append(f"processes outlived the re-run: {left}")
    record["notes"] = repairs(root)
    record["held"] = not record["problems"]
    return record


REPAIRS = re.compile(r"(coalora\.(lock|server|track) WARNING .*)")


def repairs(root: Path) -> list[str]:
    """What the runs said they repaired (a dead run's leftovers, a half-made store, runs left RUNNING)."""
    found = []
    for log in sorted(root.glob("*.err")):
        for match in REPAIRS.finditer(log.read_text(errors="replace")):
            line = re.sub(r"/\S+/", "…/", match.group(1))  # paths shortened
            found.append(f"{log.stem}: {line[:160]}")
    return found


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


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def place(where_: str) -> str:
    """The part of a run an event belongs to."""
    kind, _, what = where_.partition(":")
    if kind == "run":
        return what
    return {"start": "start-up, before Prefect's server", "server": "Prefect server start", "checkpoint": "train",
            "search": "train", "row": "evaluate", "done": "between two stages",
            "mlflow": "MLflow store creation" if what == "init" else "MLflow logging"}.get(kind, kind)


def landed(record: dict) -> str:
    """The category a trial counts under: where its kill landed (load makes timing drift), under the trial's
    own name when it landed where aimed (``train: search round`` is a part of ``train``)."""
    if len(record["kills"]) != 1:
        return record["category"]
    actual = place(record["kills"][0]["where"])
    return record["category"] if record["category"].split(":")[0] == actual else actual


def summary_rows(records: list[dict]) -> list[tuple[str, int, int, int]]:
    categories = list(dict.fromkeys(landed(r) for r in sorted(records, key=_order)))
    rows = []
    for category in categories:
        mine = [r for r in records if landed(r) == category]
        held = sum(r["held"] for r in mine)
        rows.append((category, len(mine), held, len(mine) - held))
    return rows


def _order(record: dict) -> int:
    names = [t.name for t in TRIALS]
    return names.index(record["trial"]) if record["trial"] in names else len(names)


def write_report(records: list[dict], path: Path, command: str, seconds: float, reference_seconds: float) -> None:
    rows = summary_rows(records)
    kills = sum(len(r["kills"]) for r in records)
    lines = [
        "# kill -9 anywhere, any number of times",
        "",
        f"`{command}` (benchmarks/kill9.py; its docstring says what each trial checks).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}, smoke profile. "
        f"{len(records)} trials, {kills} kills, {seconds / 60:.0f} minutes; the uninterrupted reference run "
        f"took {reference_seconds:.0f} s.",
        "",
        "| category | tried | held | failed |",
        "|---|---:|---:|---:|",
        *[f"| kill -9 during {c} | {t} | {h} | {f} |" for c, t, h, f in rows],
        f"| **all** | **{len(records)}** | **{sum(r[2] for r in rows)}** | **{sum(r[3] for r in rows)}** |",
        "",
        "Each trial counts where its kill landed (the last event seen before it); a trial aimed elsewhere that "
        "landed there under the machine's load says so below.",
        "",
        "| trial | aimed at | killed (s after start: last event seen) | re-run s | held | problems | "
        "what the runs repaired |",
        "|---|---|---|---:|---|---|---|",
    ]
    for r in sorted(records, key=_order):
        where_ = "; ".join(f"{k['at']:.1f}: {k['where']}" + (f" ({k['last']})" if k.get("last", k["where"]) !=
                                                             k["where"] else "") for k in r["kills"]) or "-"
        problems = "; ".join(r["problems"]).replace("|", "/") or "-"
        notes = "; ".join(r.get("notes", [])).replace("|", "/") or "-"
        lines.append(f"| {r['trial']} | {r['category']} | {where_} | {r.get('final_seconds', 0):.0f} | "
                     f"{'yes' if r['held'] else 'NO'} | {problems} | {notes} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    command = ".venv/bin/python benchmarks/kill9.py" + (f" --trials {args.trials}" if args.trials else "")
    seconds = time.monotonic() - started
    (workdir / "kill9.json").write_text(json.dumps({"timeline": timeline, "trials": records, "command": command,
                                                    "seconds": seconds}, indent=2))
    write_report(records, args.out, command, seconds, timeline["end"])
    print(args.out.read_text())
    return 0 if all(r["held"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
