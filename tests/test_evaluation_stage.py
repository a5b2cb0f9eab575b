"""The evaluate stage on a real smoke project: the row plan, lm-eval accuracies on the local fixture tasks,
an exact reconstruction of every trained model, reproducible and resumable rows, and the stage outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from coalora.artifacts import read_json, write_json
from coalora.params import deep_merge, load_params

pytestmark = pytest.mark.slow

METHODS = ["coalora", "qlora", "lqlora", "shared", "qlora-bnb"]
TASKS = ["boolq", "arc_easy", "arc_challenge", "winogrande"]


def write_params(root: Path, repo_root: Path, **sections) -> None:
    """The smoke params with the given section overlays, as the project's params.yaml."""
    raw = deep_merge(yaml.safe_load((repo_root / "params.yaml").read_text()),
                     yaml.safe_load((repo_root / "profiles/smoke.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(raw, sections), sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    """A smoke project trained up to the train stage. The perplexity protocol scores exactly the train
    stage's held-out batch (the first ``eval_sequences`` windows of ``seq_len`` tokens), so a seen row's
    per-token NLL must equal the train stage's held-out loss after training."""
    import torch

    from coalora.env import configure
    from coalora.stages import get_stage, run_stage

    root = tmp_path_factory.mktemp("evaluation")
    write_params(root, repo_root, train={"methods": METHODS},
                 eval={"limit": 8, "tasks": TASKS, "perplexity": {"seq_len": 64, "max_windows": 4}})
    params = load_params(root)
    assert params.train.seq_len == 64 and params.train.eval_sequences == 4
    configure(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("data", "base_model", "calibrate", "allocate", "train"):
            run_stage(get_stage(name), params, root, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


def context(root: Path, work: Path | None = None):
    from coalora.stages import StageContext, get_stage
    from coalora.stages.core import input_folders

    stage = get_stage("evaluate")
    work = work or stage.work_dir(root)
    return StageContext(root, work, work, input_folders(stage, root), progress=False)


def metrics_only(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith("seconds")}


def folders(project: Path) -> dict[str, Path]:
    return {name: project / "artifacts" / name for name in ("data", "base_model", "allocate", "train")}


def test_plan_labels_rows_target_seen_unseen_and_reference(project):
    """Every method and `none` at every target and at the one common unseen set; seen rows only where a
    method drew other configs; full precision and qlora-bnb as reference rows."""
    from coalora.evaluate.plan import plan

    params = load_params(project)
    jobs = plan(folders(project), params.evaluate.seen_budgets)
    unseen = {p.stem for p in (project / "artifacts/allocate/unseen").glob("*.json")}
    targets = [t["id"] for t in read_json(project / "artifacts/train/targets.json")["targets"]]
    assert len({j.id for j in jobs}) == len(jobs)
    for method in ["none", *METHODS[:4]]:
        mine = [j for j in jobs if j.method == method]
        assert [j.config.id for j in mine if j.set == "target"] == targets
        assert {j.config.id for j in mine if j.set == "unseen"} == unseen
        assert all(j.layers_from_trained >= 1 for j in mine if j.set == "unseen")
    draws = {m: read_json(project / "artifacts/train" / m / "train.json")["config_draws"] for m in METHODS}
    for job in jobs:
        if job.set == "seen":  # seen = drawn in training, and not a target
            assert job.config.id in draws[job.method] and job.config.id not in targets
        if job.set == "unseen":
            assert all(job.config.id not in d for d in draws.values())
    assert {j.method for j in jobs if j.set == "seen"} <= {"coalora"}  # per-config methods drew only targets
    bits = {c["id"]: c["bits"] for c in read_json(project / "artifacts/train/targets.json")["targets"]}
    for job in (j for j in jobs if j.method == "qlora" and j.set == "unseen"):  # served by the nearest target
        nearest = min(bits, key=lambda cid: abs(bits[cid] - job.config.bits))
        assert job.adapter_config == nearest and job.adapter == f"qlora/{nearest}/adapter.safetensors"
    (bnb,) = [j for j in jobs if j.method == "qlora-bnb"]
    assert bnb.set == "reference" and abs(bnb.config.bits - 4.126953125) < 1e-9
    (full,) = [j for j in jobs if j.method == "full"]
    assert full.set == "reference" and full.adapter is None
    only_targets = plan(folders(project), params.evaluate.seen_budgets, ("target",))
    assert {j.set for j in only_targets} == {"target", "reference"}


def test_a_drawn_unseen_config_stops_the_evaluation_naming_the_method(project, tmp_path):
    """The never-drawn assertion: if training records a draw of an unseen config, planning refuses."""
    from coalora.errors import ArtifactError
    from coalora.evaluate.plan import plan

    train = tmp_path / "train"
    shutil.copytree(project / "artifacts/train", train)
    record = read_json(train / "shared/train.json")
    leaked = sorted(p.stem for p in (project / "artifacts/allocate/unseen").glob("*.json"))[0]
    record["config_draws"][leaked] = 1
    write_json(train / "shared/train.json", record)
    with pytest.raises(ArtifactError, match=f"shared drew unseen configs \\['{leaked}'\\]"):
        plan({**folders(project), "train": train}, [])


def test_rows_rebuild_each_trained_model_exactly_and_score_every_task(project):
    """Target rows: the row NLL equals the train stage's held-out loss after training (same windows), so the
    evaluated model is exactly the trained one: θ for coalora (merged into the weights), the SVD residual for
    lqlora, peft + NF4 for qlora-bnb; and the `none` row equals the untrained adapter's loss (B = 0).
    Accuracies come from lm-eval on the local fixture tasks, with every item's result kept."""
    from coalora.stages.evaluate import jobs, run_job

    params = load_params(project)
    ctx = context(project)
    ids = jobs(params, ctx)
    seen = {}
    for job_id in ids:
        method, config_id = job_id.split("__")
        if method not in seen and method not in ("full", "none"):
            seen[method] = job_id
    assert set(seen) == set(METHODS)
    none = run_job(params, ctx, next(i for i in ids if i.startswith("none__")))
    qlora = read_json(project / "artifacts/train/qlora/train.json")
    assert none["set"] == "target" and none["nll"] == pytest.approx(qlora["eval_loss_before"][none["config_id"]],
                                                                    abs=2e-4)
    n_items = {t: min(8, params.world.n_items) for t in TASKS}
    for method, job_id in seen.items():
        row = run_job(params, ctx, job_id)
        record = read_json(project / "artifacts/train" / method / "train.json")
        after = record["eval_loss_after"][row["config_id"]]
        assert row["set"] == ("reference" if method == "qlora-bnb" else "target")
        assert row["nll"] == pytest.approx(after, abs=2e-4), method
        assert row["ppl_protocol"] == "nonoverlap-L64-N4"
        assert set(row["tasks"]) == set(TASKS)
        for task, scores in row["tasks"].items():
            assert 0.0 <= scores["acc"] <= 1.0 and scores["n"] == n_items[task]
            assert (scores["acc"] * scores["n"]) == pytest.approx(round(scores["acc"] * scores["n"]))
        assert row["acc_mean"] == pytest.approx(sum(s["acc"] for s in row["tasks"].values()) / len(TASKS))
        for task, scores in row["tasks"].items():
            assert scores["acc"] == pytest.approx(sum(row["items"][task]["acc"]) / scores["n"])
        assert len(row["items"]["ppl"]["window_nll"]) == 4 and row["items"]["ppl"]["tokens_per_window"] == 63
        assert row["nll"] == pytest.approx(sum(row["items"]["ppl"]["window_nll"]) / (4 * 63))
        assert (ctx.work / "rows" / f"{job_id}.json").is_file()


def test_a_row_is_reproducible_and_reused_when_intact(project, tmp_path):
    from coalora.stages.evaluate import jobs, run_job

    params = load_params(project)
    job_id = [j for j in jobs(params, context(project)) if j.startswith("coalora__")][-1]  # an unseen row
    first = run_job(params, context(project, tmp_path / "a"), job_id)
    second = run_job(params, context(project, tmp_path / "b"), job_id)
    assert first["set"] == "unseen"
    assert metrics_only(first) == metrics_only(second)
    # An intact row made under the same key is returned as saved, not re-scored.
    path = tmp_path / "a" / "rows" / f"{job_id}.json"
    saved = read_json(path)
    saved["row"]["eval_seconds"] = -1.0
    write_json(path, saved)
    assert run_job(params, context(project, tmp_path / "a"), job_id)["eval_seconds"] == -1.0
    # A damaged row, or one made under another key, is re-scored.
    path.write_text("{not json")
    assert run_job(params, context(project, tmp_path / "a"), job_id)["eval_seconds"] >= 0
    saved = read_json(path)
    saved["key"], saved["row"]["eval_seconds"] = "other", -1.0
    write_json(path, saved)
    assert run_job(params, context(project, tmp_path / "a"), job_id)["eval_seconds"] >= 0


def test_unknown_job_is_a_user_error(project):
    from coalora.errors import UserError
    from coalora.stages.evaluate import run_job

    with pytest.raises(UserError, match="unknown job"):
        run_job(load_params(project), context(project), "nope__0000")


def test_evaluate_and_report_stages_write_the_table_items_claims_and_plots(project):
    import csv

    from coalora.evaluate.claims import check_claims
    from coalora.evaluate.items import read_items
    from coalora.stages import get_stage, run_stage

    params = load_params(project)
    summary = run_stage(get_stage("evaluate"), params, project, progress=False)
    out = project / "artifacts/evaluate"
    table = read_json(out / "table.json")
    rows = table["rows"]
    assert summary["rows"] == len(rows) == len(read_json(out / "jobs.json"))
    with open(out / "table.csv") as handle:
        flat = list(csv.DictReader(handle))
    assert [(r["method"], r["config_id"], r["set"]) for r in flat] == \
        [(r["method"], r["config_id"], r["set"]) for r in rows]
    assert {r["ppl_protocol"] for r in flat} == {"nonoverlap-L64-N4"}
    assert {r["set"] for r in rows} == {"target", "seen", "unseen", "reference"}
    items, meta = read_items(out / "items.safetensors")
    assert set(items) == {r["job"] for r in rows} and meta["tokens_per_window"] == 63
    for r in rows:
        assert items[r["job"]]["boolq"].mean() == pytest.approx(r["tasks"]["boolq"]["acc"])
    assert not (project / "artifacts/.work/evaluate").exists()  # rows are work files, gone after success

    run_stage(get_stage("report"), params, project, progress=False)
    report = project / "artifacts/report"
    s = read_json(report / "summary.json")
    assert s["hv_definition"]["acc_mean"].startswith("points (bits/8, 1 - acc_mean), reference (1, 1), minimised")
    assert "ln(ppl)/ln(1000)" in s["hv_definition"]["ppl"]
    for method in METHODS[:4]:
        hv = s["hv"][method]["acc_mean"]
        assert 0 < hv["value"] < 1 and hv["ci_low"] <= hv["ci_high"]
    assert "qlora" not in s["gap"] and s["gap"]["coalora"]["configs"] == 2
    assert s["compute"]["qlora"]["serve_config_steps"] == 6 * params.train.steps_per_config
    assert s["compute"]["coalora"]["config_steps"] == s["compute"]["qlora"]["config_steps"]  # equal compute
    claims = read_json(report / "claims.json")
    check_claims(claims)
    assert {c["claim"].split(")")[0] + ")" for c in claims} == {"(i)", "(ii)", "(iii)", "(v)"}
    text = (report / "report.md").read_text()
    assert "nonoverlap-L64-N4" in text and "## Claims" in text and claims[0]["claim"] in text
    for metric in ("acc_mean", "ppl", *TASKS):
        assert (report / "plots" / f"{metric}.png").read_bytes()[:4] == b"\x89PNG"
    with open(report / "dvc/coalora.csv") as handle:
        dvc_rows = list(csv.DictReader(handle))
    assert len(dvc_rows) == sum(r["method"] == "coalora" for r in rows)
    assert [float(r["bits"]) for r in dvc_rows] == sorted(float(r["bits"]) for r in dvc_rows)
    metrics = read_json(report / "metrics.json")
    assert metrics["coalora.hv_acc_mean"] == s["hv"]["coalora"]["acc_mean"]["value"]
