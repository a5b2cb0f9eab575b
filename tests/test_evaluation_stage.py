"""The evaluate stage on a real smoke project: the row plan, lm-eval accuracies on the local fixture tasks,
an exact reconstruction of every trained model, reproducible and resumable rows, and the stage outputs."""

from __future__ import annotations

import math
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


def test_plan_has_seen_and_unseen_rows_per_method(project):
    from coalora.evaluate.plan import plan

    params = load_params(project)
    jobs = plan(project / "artifacts/train", project / "artifacts/allocate", params.evaluate.budgets)
    by_method = {m: [j for j in jobs if j.method == m] for m in METHODS}
    heldout = {p.stem for p in (project / "artifacts/allocate/heldout").glob("*.json")}
    pool = {p.stem for p in (project / "artifacts/allocate/pool").glob("*.json")}
    targets = [t["id"] for t in read_json(project / "artifacts/train/targets.json")["targets"]]
    unseen_sets = []
    for method in METHODS[:4]:
        seen = [j.config.id for j in by_method[method] if j.seen]
        unseen = [j.config.id for j in by_method[method] if not j.seen]
        assert set(seen) <= pool and set(unseen) <= heldout and unseen
        assert len(seen) == len(set(seen)) and len(unseen) == len(set(unseen))
        unseen_sets.append(set(unseen))
        assert set(seen) == set(targets)  # smoke budgets 2.5, 4.0 pick exactly the train targets
    assert all(s == unseen_sets[0] for s in unseen_sets)  # every method at the same unseen configs
    qlora_unseen = [j for j in by_method["qlora"] if not j.seen]
    bits = {c["id"]: c["bits"] for c in read_json(project / "artifacts/train/targets.json")["targets"]}
    for job in qlora_unseen:  # served by the adapter of the nearest trained target
        nearest = min(bits, key=lambda cid: abs(bits[cid] - job.config.bits))
        assert job.adapter_config == nearest and job.adapter == f"qlora/{nearest}/adapter.safetensors"
    (bnb,) = by_method["qlora-bnb"]
    assert bnb.seen and abs(bnb.config.bits - 4.126953125) < 1e-9
    assert len({j.id for j in jobs}) == len(jobs)


def test_rows_rebuild_each_trained_model_exactly_and_score_every_task(project):
    """Seen rows: exp(row NLL) equals the train stage's held-out loss after training (same windows), so the
    evaluated model is exactly the trained one: θ for coalora, the SVD residual for lqlora, peft + NF4 for
    qlora-bnb. Accuracies come from lm-eval on the local fixture tasks."""
    from coalora.stages.evaluate import jobs, run_job

    params = load_params(project)
    ctx = context(project)
    ids = jobs(params, ctx)
    seen = {}
    for job_id in ids:
        method, config_id = job_id.split("__")
        if method not in seen:
            seen[method] = job_id
    assert set(seen) == set(METHODS)
    n_items = {t: min(8, params.world.n_items) for t in TASKS}
    for method, job_id in seen.items():
        row = run_job(params, ctx, job_id)
        record = read_json(project / "artifacts/train" / method / "train.json")
        after = record["eval_loss_after"][row["config_id"]]
        assert row["set"] == "seen"
        assert row["nll"] == pytest.approx(after, abs=2e-4), method
        assert row["ppl_protocol"] == "nonoverlap-L64-N4"
        assert set(row["tasks"]) == set(TASKS)
        for task, scores in row["tasks"].items():
            assert 0.0 <= scores["acc"] <= 1.0 and scores["n"] == n_items[task]
            assert (scores["acc"] * scores["n"]) == pytest.approx(round(scores["acc"] * scores["n"]))
        assert row["acc_mean"] == pytest.approx(sum(s["acc"] for s in row["tasks"].values()) / len(TASKS))
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


def test_evaluate_and_report_stages_write_the_table_summary_and_plots(project):
    import csv

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
    assert {r["set"] for r in rows} == {"seen", "unseen"}
    assert not (project / "artifacts/.work/evaluate").exists()  # rows are work files, gone after success

    run_stage(get_stage("report"), params, project, progress=False)
    report = project / "artifacts/report"
    s = read_json(report / "summary.json")
    assert s["hv_definition"]["acc_mean"] == "points (bits/8, 1 - acc_mean), reference (1, 1), minimised"
    assert "ln(ppl)/ln(1000)" in s["hv_definition"]["ppl"]
    for method in METHODS:
        hv = s["hv"][method]["acc_mean"]["all"]
        assert 0 < hv < 1
    assert s["gap_vs_qlora"]["qlora"] == {"gap": 0.0, "n": sum(r["method"] == "qlora" for r in rows)}
    assert s["times"]["qlora"]["serve_k_seconds"] > s["times"]["qlora"]["train_seconds"]  # K = 6 > 2 runs
    assert s["times"]["qlora-bnb"]["serve_k_seconds"] is None
    text = (report / "report.md").read_text()
    assert "nonoverlap-L64-N4" in text and s["hv_definition"]["acc_mean"] in text
    for metric in ("acc_mean", "ppl", *TASKS):
        assert (report / "plots" / f"{metric}.png").read_bytes()[:4] == b"\x89PNG"
    with open(report / "dvc/coalora.csv") as handle:
        dvc_rows = list(csv.DictReader(handle))
    assert len(dvc_rows) == sum(r["method"] == "coalora" for r in rows)
    assert [float(r["bits"]) for r in dvc_rows] == sorted(float(r["bits"]) for r in dvc_rows)
    metrics = read_json(report / "metrics.json")
    assert metrics["coalora.hv_acc_mean"] == s["hv"]["coalora"]["acc_mean"]["all"]


def test_hypervolume_uses_the_params_reference_and_normalisation():
    """HV of known rows under the report params: the definition is applied, not a hard-coded one."""
    from coalora.evaluate.summary import hypervolumes
    from coalora.params import HvParams

    hv = HvParams.model_validate({"accuracy": {"bits_scale": 8.0, "reference": [1.0, 1.0]},
                                  "perplexity": {"bits_scale": 4.0, "ppl_max": math.e ** 2,
                                                 "reference": [2.0, 1.0]}})

    def row(bits, acc, ppl, which="seen"):
        return {"method": "m", "set": which, "bits": bits, "acc_mean": acc, "ppl": ppl}

    rows = [row(2.0, 0.5, math.e), row(4.0, 0.75, 1.0, "unseen")]
    out = hypervolumes(rows, ["acc_mean", "ppl"], hv)["m"]
    # accuracy: points (0.25, 0.5), (0.5, 0.25), reference (1, 1) → 0.25·0.5 + 0.5·0.75 = 0.5
    assert out["acc_mean"]["all"] == pytest.approx(0.5)
    assert out["acc_mean"]["seen"] == pytest.approx(0.75 * 0.5)
    # perplexity: points (0.5, ln e / 2 = 0.5), (1.0, 0) with reference (2, 1) → 0.5·0.5 + 1.0·1.0 = 1.25
    assert out["ppl"]["all"] == pytest.approx(1.25)


def test_gaps_match_configs_by_id():
    from coalora.evaluate.summary import gap_vs, seen_unseen_gap

    rows = [{"method": "qlora", "config_id": "a", "set": "seen", "acc_mean": 0.5, "nll": 1.0},
            {"method": "qlora", "config_id": "b", "set": "unseen", "acc_mean": 0.4, "nll": 1.2},
            {"method": "coalora", "config_id": "a", "set": "seen", "acc_mean": 0.6, "nll": 0.9},
            {"method": "coalora", "config_id": "b", "set": "unseen", "acc_mean": 0.55, "nll": 1.0},
            {"method": "coalora", "config_id": "c", "set": "seen", "acc_mean": 0.9, "nll": 0.5}]
    gaps = gap_vs(rows, "qlora")
    assert gaps["coalora"] == {"gap": pytest.approx(100 * (0.1 + 0.15) / 2), "n": 2}  # c has no qlora row
    su = seen_unseen_gap(rows)
    assert su["qlora"]["acc_gap"] == pytest.approx(10.0)
    assert su["coalora"]["ppl_ratio"] == pytest.approx(math.exp(1.0 - 0.7))


def test_a_searched_pool_defines_the_coalora_seen_set(project, tmp_path):
    """With ``train/<method>/pool/`` (the search's final pool) a coalora-family method's seen rows come from
    it; a held-out config the search put in the pool is seen for that method and unseen for the others."""
    from coalora.evaluate.plan import plan

    train = tmp_path / "train"
    shutil.copytree(project / "artifacts/train", train)
    allocate = project / "artifacts/allocate"
    heldout = sorted(allocate.glob("heldout/*.json"))
    pool_dir = train / "coalora/pool"
    shutil.rmtree(pool_dir, ignore_errors=True)  # replace whatever pool the search left
    pool_dir.mkdir()
    keep = sorted(allocate.glob("pool/*.json"))[:1] + heldout[:1]
    for path in keep:
        shutil.copy(path, pool_dir / path.name)
    budgets = load_params(project).evaluate.budgets
    jobs = plan(train, allocate, budgets)
    coalora = [j for j in jobs if j.method == "coalora"]
    assert {j.config.id for j in coalora if j.seen} <= {p.stem for p in keep}
    assert all(j.config.stage == "train" for j in coalora if j.seen)
    moved = heldout[0].stem
    assert moved not in {j.config.id for j in coalora if not j.seen}
    qlora_unseen = {j.config.id for j in jobs if j.method == "qlora" and not j.seen}
    assert qlora_unseen and all(j.config.stage == "allocate" for j in jobs if j.method == "qlora")
