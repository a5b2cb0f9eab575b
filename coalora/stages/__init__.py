"""The stages, in pipeline order. Each stage module declares ``STAGE`` (see core.Stage).

The registry is built lazily (``STAGES``), so importing ``coalora.stages.core`` stays cheap and stage
modules can import the mechanism without a cycle.
"""

from __future__ import annotations

from importlib import import_module

from coalora.errors import UserError
from coalora.stages.core import Stage, StageContext, fresh_summary, run_stage, stage_key

PIPELINE = ("data", "base_model", "calibrate", "allocate", "train", "evaluate", "report")


def all_stages() -> dict[str, Stage]:
    """Stage name → declaration, in pipeline order."""
    stages = [import_module(f"coalora.stages.{name}").STAGE for name in PIPELINE]
    return {stage.name: stage for stage in stages}


def get_stage(name: str) -> Stage:
    if name not in PIPELINE:
        raise UserError(f"stage: unknown stage {name!r}; allowed: {', '.join(PIPELINE)}")
    return all_stages()[name]


def __getattr__(name: str):
    if name == "STAGES":
        return all_stages()
    raise AttributeError(name)


__all__ = ["PIPELINE", "STAGES", "Stage", "StageContext", "all_stages", "fresh_summary", "get_stage",
           "run_stage", "stage_key"]
