"""Events of a running project, as a kill9 trial watches them: what happened, when, where a kill landed.

An event is a name (``run:<stage>`` a stage's temporary output folder appears, ``done:<stage>`` its record,
``checkpoints:<n>``, ``rows:<n>``, ``<progress bar>:<p>%``, ``mlflow:init``/``store``/``logging``, lines of
the log, ...) and the seconds since the run started when it was first seen (:class:`Observer`).
"""

from __future__ import annotations

import re
from pathlib import Path

STAGES = ("data", "base_model", "calibrate", "allocate", "train", "evaluate", "report")


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
# COALORA_PROGRESS_SECONDS=0, see running._env) and tqdm's redraws on a terminal
# ("pretrain:  45%|████▌  | 9/20").
PROGRESS = re.compile(r"INFO ([^\r\n:|]+): \d+/\d+ \((\d+)%\)|([^\r\n:|]+):\s+(\d+)%\|")
# Events of progress inside a stage (not a place in the run, which is the last other event before them).
PROGRESS_EVENT = re.compile(r"%$|^rows:|^checkpoints:|^lm-eval$")


def where(events: dict[str, float], killed_at: float, progress: bool = False) -> str:
    """The last event before the kill: where the run was (a stage's progress events only if ``progress``)."""
    before = [(t, name) for name, t in events.items()
              if t <= killed_at and name != "start" and (progress or not PROGRESS_EVENT.search(name))]
    return max(before)[1] if before else "start"
