"""dvc.yaml rendered from the stage declarations, so the two can never drift (a test checks the file)."""

from __future__ import annotations

import yaml

from coalora.artifacts import ARTIFACTS
from coalora.stages.core import code_paths

WRAPPER = "bin/coalora-stage"

HEADER = ("# Generated from the stage declarations in coalora/stages/ by `coalora dvc-yaml`; do not edit.\n"
          "# Each stage runs the same function as the Prefect flow (`coalora run`), through bin/coalora-stage.\n")


def dvc_stages() -> dict:
    """``{"stages": {...}, "metrics": [...], "plots": [...]}`` in dvc.yaml's schema.

    Metrics and plots are top-level entries (paths inside stage outputs), not stage outputs, because DVC
    forbids overlapping outputs. ``deps`` list the upstream outputs and every source file the stage's key
    covers (:func:`coalora.stages.core.code_paths`), so DVC and the cache keys agree on what is stale.
    """
    from coalora.stages import STAGES

    stages, metrics, plots = {}, [], []
    for stage in STAGES.values():
        entry = {"cmd": stage_command(stage.name)}
        if stage.description:
            entry["desc"] = stage.description
        entry["deps"] = [f"{ARTIFACTS}/{dep}" for dep in stage.deps] + list(code_paths(stage))
        entry["params"] = list(stage.params)
        # persist: DVC would delete the output before running the command, so a command that cannot start
        # (no Python, a bad parameter) would lose it; stages replace their output atomically themselves.
        entry["outs"] = [{f"{ARTIFACTS}/{stage.name}": {"persist": True}}]
        stages[stage.name] = entry
        metrics += [f"{ARTIFACTS}/{stage.name}/{name}" for name in stage.metrics]
        plots += plot_entries(stage)
    document = {"stages": stages}
    if metrics:
        document["metrics"] = metrics
    if plots:
        document["plots"] = plots
    return document


def stage_command(name: str) -> str:
    """The shell command DVC runs for stage ``name``: ``bin/coalora-stage`` finds the project's Python
    ($COALORA_PYTHON, .venv, python3) so that ``dvc repro`` works with or without an activated venv."""
    return f"sh {WRAPPER} {name}"


def plot_entries(stage) -> list:
    """The stage's top-level ``plots:`` entries: its plot definitions (``stage.extra["dvc_plots"]``: DVC's
    ``{id: {x, y: {file: column}, template, ...}}`` with files relative to the stage output) when it has
    them, else its plot files as plain paths."""
    prefix = f"{ARTIFACTS}/{stage.name}/"
    definitions = stage.extra.get("dvc_plots")
    if not definitions:
        return [prefix + name for name in stage.plots]
    entries = []
    for definition in definitions:
        for plot_id, spec in definition.items():
            y = spec["y"]
            y = {prefix + f: col for f, col in y.items()} if isinstance(y, dict) else y
            entries.append({plot_id: {**spec, "y": y}})
    return entries


def render_dvc_yaml() -> str:
    return HEADER + yaml.safe_dump(dvc_stages(), sort_keys=False, width=120)
