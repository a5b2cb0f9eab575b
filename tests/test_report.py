"""The report's pieces on a known table: PNG plots, DVC plot files and their dvc.yaml entries, serving cost
from train records, bad report params. (Statistics and claims: test_bootstrap.py; the whole report on a
real smoke project: test_evaluation_stage.py.)"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from coalora.artifacts import write_json

TASKS = ["boolq", "arc_easy"]


def row(method: str, config_id: str, which: str, bits: float, acc: float, ppl: float, switch: float = 0.01):
    import math

    tasks = {"boolq": {"acc": acc, "acc_norm": None, "n": 10, "chance": 0.5},
             "arc_easy": {"acc": acc, "acc_norm": acc, "n": 10, "chance": 0.25}}
    return {"method": method, "config_id": config_id, "set": which, "bits": bits, "budgets": [bits],
            "adapter_config": None, "tasks": tasks, "acc_mean": acc, "ppl": ppl, "nll": math.log(ppl),
            "ppl_protocol": "nonoverlap-L8-N2", "switch_seconds": switch, "eval_seconds": 0.5}


ROWS = [row("coalora", "a", "target", 2.5, 0.6, 3.0), row("coalora", "b", "unseen", 3.0, 0.65, 2.8),
        row("qlora", "a", "target", 2.5, 0.5, 3.2), row("qlora", "b", "unseen", 3.0, 0.55, 3.0),
        row("qlora-bnb", "u", "reference", 4.127, 0.7, 2.5), row("full", "fp", "reference", 32.0, 0.8, 2.0)]


@pytest.fixture
def train_dir(tmp_path) -> Path:
    """train.json records: coalora joint (one adapter, 9 s + 1 s of search rounds, 16 config-steps), qlora
    per-config (two runs of 8 steps, 4 s each), bnb uniform."""
    d = tmp_path / "train"
    write_json(d / "coalora/train.json", {"seconds": 9.0, "runs_kind": "joint", "config_steps": 16, "steps": 8,
                                          "runs": [{"seconds": 9.0, "steps": 8}],
                                          "rounds": [{"seconds": 0.0}, {"seconds": 1.0}]})  # + search rounds
    write_json(d / "qlora/train.json", {"seconds": 8.0, "runs_kind": "per_config", "config_steps": 16,
                                        "steps": 16, "runs": [{"seconds": 4.0, "steps": 8}] * 2})
    write_json(d / "qlora-bnb/train.json", {"seconds": 3.0, "runs_kind": "uniform", "config_steps": 8, "steps": 8,
                                            "runs": [{"seconds": 3.0, "steps": 8}]})
    return d


def test_serving_cost_is_fixed_for_joint_methods_and_linear_for_per_config(train_dir):
    from coalora.evaluate.statistics import method_compute

    methods = ["coalora", "qlora", "qlora-bnb"]
    t = method_compute(train_dir, methods, ROWS, k=6)
    assert t["coalora"]["serve_seconds"] == pytest.approx(10.0 + 6 * 0.01)
    assert t["coalora"]["seconds"] == 10.0 and t["coalora"]["search_seconds"] == 1.0
    assert t["coalora"]["serve_config_steps"] == 16 and t["qlora"]["serve_config_steps"] == 6 * 8
    assert t["qlora"]["serve_seconds"] == pytest.approx(6 * (4.0 + 0.01))
    assert t["qlora-bnb"]["serve_seconds"] is None
    t12 = method_compute(train_dir, methods, ROWS, k=12)
    assert t12["qlora"]["serve_seconds"] == pytest.approx(2 * t["qlora"]["serve_seconds"])
    assert t12["coalora"]["serve_config_steps"] == 16


def test_plots_and_dvc_files(tmp_path):
    from coalora.evaluate.render import write_dvc_files, write_plots

    metrics = ["acc_mean", "boolq", "arc_easy", "ppl"]
    plots = write_plots(tmp_path, ROWS, metrics)
    assert plots == [f"plots/{m}.png" for m in metrics]
    for p in plots:
        assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again"
    write_plots(again, ROWS, metrics)
    assert (again / plots[0]).read_bytes() == (tmp_path / plots[0]).read_bytes()  # deterministic files
    written = write_dvc_files(tmp_path, ROWS, metrics, ["coalora", "qlora", "shared"])
    assert written == ["dvc/coalora.csv", "dvc/qlora.csv", "dvc/shared.csv"]
    with open(tmp_path / "dvc/coalora.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["config_id"], r["set"], float(r["acc_mean"])) for r in rows] == [("a", "target", 0.6),
                                                                                ("b", "unseen", 0.65)]
    assert (tmp_path / "dvc/shared.csv").read_text().splitlines() == [
        "bits,set,config_id,acc_mean,boolq,arc_easy,ppl"]  # no rows: header only, still a valid plot file


def test_dvc_yaml_plots_point_at_the_report_files():
    from coalora.stages.dvcfile import dvc_stages
    from coalora.stages.report import PLOT_METHODS

    plots = dvc_stages()["plots"]
    acc = next(entry["acc_mean vs bits"] for entry in plots if "acc_mean vs bits" in entry)
    assert acc["x"] == "bits" and acc["template"] == "scatter"
    assert acc["y"] == {f"artifacts/report/dvc/{m}.csv": "acc_mean" for m in PLOT_METHODS}
    assert "none" in PLOT_METHODS
    assert "artifacts/report/metrics.json" in dvc_stages()["metrics"]
    assert "artifacts/evaluate/metrics.json" in dvc_stages()["metrics"]


@pytest.mark.parametrize("section, value, message", [
    ("evaluate", {"seen_budgets": [1.0]}, "evaluate.seen_budgets"),
    ("evaluate", {"seen_budgets": [3.0, 3.0]}, "evaluate.seen_budgets"),
    ("evaluate", {"sets": ["seen", "unseen"]}, "evaluate.sets"),
    ("report", {"bootstrap": {"resamples": 100}}, "report.bootstrap.resamples"),
    ("report", {"claims": {"unseen_ppl_ratio": 0.9}}, "report.claims.unseen_ppl_ratio"),
    ("study", {"seeds": [1]}, "study.seeds"),
    ("report", {"serve_k": 0}, "report.serve_k"),
    ("report", {"hv": {"accuracy": {"reference": [1.0]}}}, "report.hv.accuracy.reference"),
])
def test_bad_evaluate_and_report_params_name_the_key(repo_root, section, value, message):
    import yaml

    from coalora.errors import ParamsError
    from coalora.params import deep_merge, validate

    raw = deep_merge(yaml.safe_load((repo_root / "params.yaml").read_text()), {section: value})
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        validate(raw)


@pytest.mark.parametrize("values, scale", [((25.9, 56.9, 2.1e7), "log"), ((25.9, 56.9, 31.7), "linear"),
                                           ((-0.5, 0.4, 0.6), "linear")])
def test_the_pareto_figure_goes_logarithmic_when_values_span_decades(values, scale):
    """A 2.5-bit perplexity of 2·10⁷ beside full precision's 26 (the real run): on a linear axis every other
    row sits on zero, so a figure whose positive values span more than LOG_SPAN gets a log y axis."""
    from coalora.figures import Point, pareto_figure

    points = [Point("m", "target", bits, value) for bits, value in zip((2.5, 3.2, 4.1), values)]
    fig = pareto_figure(points, "ppl", lower_better=True)
    axis = fig.axes[0]
    assert axis.get_yscale() == scale
    assert ("log scale" in axis.get_ylabel()) == (scale == "log")
