"""The trials: where each kills ``coalora run``, as rows of one table (:data:`TRIALS`).

A kill point is an event of the run (``events``) plus a fraction of the time from it to a later event, both
as measured in the uninterrupted reference run. Trials aimed at a late stage start from a copy of the
reference run's finished upstream stages, so they reach their kill point sooner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .events import STAGES


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


def span(stage: str, fraction: float) -> tuple[str, str, float]:
    """A kill point at ``fraction`` of ``stage``'s own duration in the reference run."""
    return f"run:{stage}", f"done:{stage}", fraction


# One row per trial, run in this order: the name; the category (where the kill is aimed); the kill points
# (each an event, or (event, until, fraction): kill at event + fraction × (until − event)); the last stage
# the runs build (``--stages data,…,<last>``); the last stage copied from the reference run (None: none).
# Kill points inside a stage are its own progress where it shows any (progress bars, checkpoints, rows), so
# they land where aimed however loaded the machine; elsewhere a fraction of the span the reference measured.
# ``rows:<p>%`` is p percent of the reference's rows (resolve_anchor). coalora's search rounds run when its
# bar reaches their step (rounds at 50% and 100%). The MLflow trials copy every stage their run would build:
# `coalora run` finds them up to date and only creates the store and logs to it; mlflow-log-flow builds the
# report, so its kill lands inside the flow (Prefect's tracking task).
TABLE = (
    # name                  category                 kill points                                  last          copied
    ("report-50",          "report",                [span("report", 0.5)],                       "report",     "evaluate"),
    ("evaluate-rows-50",   "evaluate",              ["rows:50%"],                                "evaluate",   "train"),
    ("server-start",       "Prefect server start",  [("start", "server", 1.0)],                  "data",       None),
    ("server-migrate",     "Prefect server start",  [("server", "run:data", 0.3)],               "data",       None),
    ("data-0",             "data",                  [span("data", 0.0)],                         "data",       None),
    ("data-60",            "data",                  [span("data", 0.6)],                         "data",       None),
    ("base-pretrain-15",   "base_model",            ["pretrain:15%"],                            "base_model", "data"),
    ("base-pretrain-60",   "base_model",            ["pretrain:60%"],                            "base_model", "data"),
    ("base-eval",          "base_model",            ["lm-eval"],                                 "base_model", "data"),
    ("calibrate-costs-50", "calibrate",             ["cost table:50%"],                          "calibrate",  "base_model"),
    ("allocate-30",        "allocate",              [span("allocate", 0.3)],                     "allocate",   "calibrate"),
    ("allocate-85",        "allocate",              [span("allocate", 0.85)],                    "allocate",   "calibrate"),
    ("train-ckpt",         "train",                 ["checkpoints:1"],                           "train",      "allocate"),
    ("train-coalora-25",   "train",                 ["coalora joint:25%"],                       "train",      "allocate"),
    ("train-random-75",    "train",                 ["coalora-random joint:75%"],                "train",      "allocate"),
    ("train-shared-50",    "train",                 ["shared joint:50%"],                        "train",      "allocate"),
    ("search-1",           "train: search round",   ["coalora joint:50%"],                       "train",      "allocate"),
    ("search-2",           "train: search round",   ["coalora joint:100%"],                      "train",      "allocate"),
    ("evaluate-row-1",     "evaluate",              ["rows:1"],                                  "evaluate",   "train"),
    ("evaluate-rows-90",   "evaluate",              ["rows:90%"],                                "evaluate",   "train"),
    ("mlflow-store",       "MLflow store creation", [("mlflow:init", "mlflow:store", 0.3)],      "train",      "train"),
    ("mlflow-store-late",  "MLflow store creation", [("mlflow:init", "mlflow:store", 0.9)],      "train",      "train"),
    ("mlflow-log",         "MLflow logging",        [("mlflow:logging", "end", 0.2)],            "report",     "report"),
    ("mlflow-log-late",    "MLflow logging",        [("mlflow:logging", "end", 0.8)],            "report",     "report"),
    ("mlflow-log-flow",    "MLflow logging",        [("mlflow:logging", "end", 0.4)],            "report",     "evaluate"),
    ("again-3",            "repeated kills",        ["pretrain:50%", "checkpoints:1", "rows:1"], "report",     None),
    ("again-same-5",       "repeated kills",        ["checkpoints:1"] * 5,                       "train",      "allocate"),
)


def _trial(name: str, category: str, kills: list, last: str, copied: str | None) -> Trial:
    points = tuple(Point(k) if isinstance(k, str) else Point(*k) for k in kills)
    return Trial(name, category, points, last, STAGES.index(copied) + 1 if copied else 0)


TRIALS = [_trial(*row) for row in TABLE]


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
