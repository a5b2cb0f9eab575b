"""dvc.yaml rendered from the stage declarations, so the two can never drift (a test checks the file)."""

from __future__ import annotations

import yaml

from coalora.stages.core import ARTIFACTS

HEADER = ("# Generated from the stage declarations in coalora/stages/ by `coalora dvc-yaml`; do not edit.\n"
          "# Each stage runs the same function as the Prefect flow (`coalora run`).\n")


def dvc_stages() -> dict:
    """``{"stages": {...}, "metrics": [...], "plots": [...]}`` in dvc.yaml's schema.

    Metrics and plots are top-level entries (paths inside stage outputs), not stage outputs, because DVC
    forbids overlapping outputs.
    """
    from coalora.stages import STAGES

    stages, metrics, plots = {}, [], []
    for stage in STAGES.values():
        entry = {"cmd": f"coalora stage {stage.name}"}
        if stage.description:
            entry["desc"] = stage.description
        entry["deps"] = [f"{ARTIFACTS}/{dep}" for dep in stage.deps] + list(stage.code)
        entry["params"] = list(stage.params)
        entry["outs"] = [f"{ARTIFACTS}/{stage.name}"]
        stages[stage.name] = entry
        metrics += [f"{ARTIFACTS}/{stage.name}/{name}" for name in stage.metrics]
        plots += plot_entries(stage)
    document = {"stages": stages}
    if metrics:
        document["metrics"] = metrics
    if plots:
        document["plots"] = plots
    return document


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
