"""The report's pieces on a known table: markdown, PNG plots, DVC plot files and their dvc.yaml entries,
serving times from train records."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from coalora.artifacts import write_json
from coalora.params import HvParams, ReportParams

TASKS = ["boolq", "arc_easy"]


def row(method: str, config_id: str, which: str, bits: float, acc: float, ppl: float, switch: float = 0.01):
    import math

    tasks = {"boolq": {"acc": acc, "acc_norm": None, "n": 10, "chance": 0.5},
             "arc_easy": {"acc": acc, "acc_norm": acc, "n": 10, "chance": 0.25}}
    return {"method": method, "config_id": config_id, "set": which, "bits": bits, "budgets": [bits],
            "adapter_config": None, "tasks": tasks, "acc_mean": acc, "ppl": ppl, "nll": math.log(ppl),
            "ppl_protocol": "nonoverlap-L8-N2", "switch_seconds": switch, "eval_seconds": 0.5}


ROWS = [row("coalora", "a", "seen", 2.5, 0.6, 3.0), row("coalora", "b", "unseen", 3.0, 0.65, 2.8),
        row("qlora", "a", "seen", 2.5, 0.5, 3.2), row("qlora", "b", "unseen", 3.0, 0.55, 3.0),
        row("qlora-bnb", "u", "seen", 4.127, 0.7, 2.5)]


def report_params(k: int = 6) -> ReportParams:
    return ReportParams(hv=HvParams.model_validate({
        "accuracy": {"bits_scale": 8.0, "reference": [1.0, 1.0]},
        "perplexity": {"bits_scale": 8.0, "ppl_max": 10.0, "reference": [1.0, 1.0]}}), serve_k=k)


@pytest.fixture
def train_dir(tmp_path) -> Path:
    """train.json records: coalora joint (one adapter, 9 s + 1 s of search rounds), qlora per-config (two runs
    of 4 s), bnb uniform."""
    d = tmp_path / "train"
    (d / "coalora").mkdir(parents=True)
    (d / "coalora/adapter.safetensors").write_bytes(b"")
    write_json(d / "coalora/train.json", {"seconds": 9.0, "runs": [{"seconds": 9.0}], "confignet": True,
                                          "rounds": [{"seconds": 0.0}, {"seconds": 1.0}]})  # + search rounds
    write_json(d / "qlora/train.json", {"seconds": 8.0, "runs": [{"seconds": 4.0}, {"seconds": 4.0}]})
    write_json(d / "qlora-bnb/train.json", {"seconds": 3.0, "runs": [{"seconds": 3.0}], "backend": "bnb"})
    return d


def test_serving_time_is_fixed_for_joint_methods_and_linear_for_per_config(train_dir):
    from coalora.evaluate.summary import method_times

    t = method_times(train_dir, ROWS, k=6)
    assert t["coalora"]["serve_k_seconds"] == pytest.approx(10.0 + 6 * 0.01)
    assert t["coalora"]["train_seconds"] == 10.0 and t["coalora"]["search_seconds"] == 1.0
    assert t["qlora"]["serve_k_seconds"] == pytest.approx(6 * (4.0 + 0.01))
    assert t["qlora-bnb"]["serve_k_seconds"] is None
    t12 = method_times(train_dir, ROWS, k=12)
    assert t12["qlora"]["serve_k_seconds"] == pytest.approx(2 * t["qlora"]["serve_k_seconds"])
    assert t12["coalora"]["serve_k_seconds"] < 2 * t["coalora"]["serve_k_seconds"]


def test_summary_and_markdown_state_every_definition(train_dir):
    from coalora.evaluate.report import markdown
    from coalora.evaluate.summary import flat_metrics, summarise

    s = summarise(ROWS, TASKS, train_dir, report_params())
    assert s["metrics"] == ["acc_mean", "boolq", "arc_easy", "ppl"]
    assert s["gap_vs_qlora"]["coalora"] == {"gap": pytest.approx(10.0), "n": 2}
    assert s["seen_unseen_gap"]["coalora"]["acc_gap"] == pytest.approx(-5.0)
    assert s["hv"]["qlora-bnb"]["acc_mean"]["unseen"] is None
    # coalora dominates qlora at both configs: a larger HV for accuracy and perplexity.
    for metric in ("acc_mean", "ppl"):
        assert s["hv"]["coalora"][metric]["all"] > s["hv"]["qlora"][metric]["all"] > 0
    flat = flat_metrics(s)
    assert flat["coalora.serve_6_seconds"] == s["times"]["coalora"]["serve_k_seconds"]
    assert flat["hv_definition.ppl"] == "points (bits/8, ln(ppl)/ln(10)), reference (1, 1), minimised"
    text = markdown(ROWS, TASKS, s, {"budgets": [2.5, 3.0], "limit": 10, "serve_k": 6}, ["plots/ppl.png"],
                    {"acc_mean": 0.8, "ppl": 2.0})
    assert "nonoverlap-L8-N2" in text and "![ppl](plots/ppl.png)" in text
    for definition in s["hv_definition"].values():
        assert definition in text
    assert text.count("| coalora | a |") + text.count("| coalora | b |") == 2  # the full table
    assert text.count("| coalora |") == 3 + 2  # + summary, per-metric HV and time tables
    assert "items per task: boolq 10, arc_easy 10" in text


def test_plots_and_dvc_files(tmp_path):
    from coalora.evaluate.report import write_dvc_files, write_plots

    metrics = ["acc_mean", "boolq", "arc_easy", "ppl"]
    plots = write_plots(tmp_path, ROWS, metrics, {"acc_mean": 0.8, "ppl": 2.0})
    assert plots == [f"plots/{m}.png" for m in metrics]
    for p in plots:
        assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again"
    write_plots(again, ROWS, metrics, {"acc_mean": 0.8, "ppl": 2.0})
    assert (again / plots[0]).read_bytes() == (tmp_path / plots[0]).read_bytes()  # deterministic files
    written = write_dvc_files(tmp_path, ROWS, metrics, ["coalora", "qlora", "shared"])
    assert written == ["dvc/coalora.csv", "dvc/qlora.csv", "dvc/shared.csv"]
    with open(tmp_path / "dvc/coalora.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["config_id"], r["set"], float(r["acc_mean"])) for r in rows] == [("a", "seen", 0.6),
                                                                                ("b", "unseen", 0.65)]
    assert (tmp_path / "dvc/shared.csv").read_text().splitlines() == [
        "bits,set,config_id,acc_mean,boolq,arc_easy,ppl"]  # no rows: header only, still a valid plot file


def test_dvc_yaml_plots_point_at_the_report_files():
    from coalora.params import TRAIN_METHODS
    from coalora.stages.dvcfile import dvc_stages

    plots = dvc_stages()["plots"]
    acc = next(entry["acc_mean vs bits"] for entry in plots if "acc_mean vs bits" in entry)
    assert acc["x"] == "bits" and acc["template"] == "scatter"
    assert acc["y"] == {f"artifacts/report/dvc/{m}.csv": "acc_mean" for m in TRAIN_METHODS}
    assert "artifacts/report/metrics.json" in dvc_stages()["metrics"]
    assert "artifacts/evaluate/metrics.json" in dvc_stages()["metrics"]


def test_base_line_only_where_measured_like_the_rows(tmp_path):
    from coalora.stages.report import base_scores

    write_json(tmp_path / "metrics.json", {"boolq_acc": 0.9, "boolq_n": 10, "arc_easy_acc": 0.8, "arc_easy_n": 400,
                                           "arc_easy_acc_norm": 0.7, "ppl": 2.0, "ppl_protocol": "nonoverlap-L8-N2"})
    scores = base_scores(tmp_path, ROWS, TASKS)
    assert scores["boolq"] == 0.9 and scores["ppl"] == 2.0
    assert scores["arc_easy"] is None and scores["acc_mean"] is None  # 400 items, the rows scored 10
    write_json(tmp_path / "metrics.json", {"ppl": 2.0, "ppl_protocol": "nonoverlap-L128-N100"})
    assert base_scores(tmp_path, ROWS, TASKS)["ppl"] is None  # another perplexity protocol


@pytest.mark.parametrize("section, value, message", [
    ("evaluate", {"budgets": [1.0]}, "evaluate.budgets"),
    ("evaluate", {"budgets": [3.0, 3.0]}, "evaluate.budgets"),
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
