"""`coalora study compute|seeds` on a smoke project: variants over the pipeline's own upstream outputs, the
cost to serve K configurations at equal quality, every claim over seeds. (The full studies are documented
commands with results in benchmarks/; this is their small sample.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coalora.artifacts import read_json
from coalora.params import deep_merge, load_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    """A smoke project with two methods, so a study variant trains in seconds."""
    root = tmp_path_factory.mktemp("study")
    raw = deep_merge(yaml.safe_load((repo_root / "params.yaml").read_text()),
                     yaml.safe_load((repo_root / "profiles/smoke.yaml").read_text()))
    raw = deep_merge(raw, {"train": {"methods": ["coalora", "qlora"]}, "eval": {"limit": 8}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def test_compute_study_compares_coalora_at_each_multiplier_with_the_per_config_baseline(project):
    import torch

    from coalora.env import configure
    from coalora.study import compute_study, study_dir

    configure(project)
    params = load_params(project)
    torch.set_num_threads(1)
    summary = compute_study(project, params, progress=False)
    assert [r["multiplier"] for r in summary["rows"]] == params.study.compute == [0.5, 1.0]
    per_run, k = params.train.steps_per_config, params.report.serve_k
    for r in summary["rows"]:
        variant = study_dir(project, "compute") / f"x{r['multiplier']:g}"
        record = read_json(variant / "artifacts/train/coalora/train.json")
        assert r["config_steps"] == record["config_steps"] == int(r["multiplier"] * per_run * 2)
        assert r["serve_cost_ratio"] == pytest.approx(r["config_steps"] / (k * per_run))
        assert (variant / "artifacts/data").resolve() == (project / "artifacts/data").resolve()  # shared
        sets = {row["set"] for row in read_json(variant / "artifacts/evaluate/table.json")["rows"]}
        assert sets == {"target", "reference"}  # the compute study scores the targets only
        assert r["acc_gap_points"]["ci_low"] <= r["acc_gap_points"]["ci_high"]
    qualified = [r["serve_cost_ratio"] for r in summary["rows"] if r["equal_quality"]]
    assert summary["equal_quality_cost_ratio"] == (min(qualified) if qualified else None)
    assert "Cost to serve K = 6" in (study_dir(project, "compute") / "report.md").read_text()
    again = compute_study(project, params, progress=False)  # every variant is cached: same numbers
    assert again["rows"] == summary["rows"]


def test_seeds_study_reports_every_claim_over_seeds(project):
    from coalora.study import seeds_study, study_dir

    params = load_params(project)
    summary = seeds_study(project, params, progress=False)
    assert summary["seeds"] == [1, 2]
    claims = read_json(study_dir(project, "seeds") / "seed-1/artifacts/report/claims.json")
    assert [c["claim"] for c in summary["claims"]] == [c["claim"] for c in claims]
    for c in summary["claims"]:
        values = [v["ours"] for v in c["per_seed"].values()]
        assert c["over_seeds"]["mean"] == pytest.approx(sum(values) / 2)
        assert c["over_seeds"]["ci_low"] <= c["over_seeds"]["mean"] <= c["over_seeds"]["ci_high"]
    seeds = {read_json(study_dir(project, "seeds") / f"seed-{s}/artifacts/train/targets.json")["seed"] for s in (1, 2)}
    assert seeds == {1, 2}
    assert "mean over seeds" in (study_dir(project, "seeds") / "report.md").read_text()


def test_an_unknown_study_is_refused(project):
    from coalora.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["--root", str(project), "study", "nope"])
    assert caught.value.code == 2
