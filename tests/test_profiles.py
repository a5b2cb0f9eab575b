"""The real-model profiles in miniature: every structural choice of ``profiles/real.yaml`` and
``profiles/real-gpu.yaml`` (methods, targets, pool grid, unseen set, search rounds, seen budgets, adapter
rank, dtype, evaluation sets, report) run through every stage on a tiny GGUF-converted model and tiny packaged
data; only the sizes that cost time (steps, sequences, windows, items, candidates) are shrunk."""

from __future__ import annotations

from pathlib import Path

import pytest

from coalora.artifacts import read_json
from coalora.fetch.cache import ENV
from coalora.params import deep_merge, load_params, validate

ROOT = Path(__file__).resolve().parents[1]

# Sizes only: what makes a run long, never what makes it a different experiment.
MINIATURE = {
    "data": {"packaged": {"validation_articles": 2, "min_words": 20}},
    "eval": {"limit": None, "batch_size": 4, "perplexity": {"seq_len": 32, "max_windows": 4}},
    "calibrate": {"n_sequences": 2, "seq_len": 32, "batch_size": 2},
    "lora": {"cache_mb": 64},
    "train": {"steps_per_config": 2, "batch_size": 2, "seq_len": 32, "eval_sequences": 2, "checkpoint_every": 1},
    "search": {"n_candidates": 16, "mc_samples": 4, "f1_sequences": 1},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A converted tiny GGUF model folder and a fetch cache with tiny benchmark sets and articles."""
    from coalora.fetch.convert import convert_gguf
    from tiny_assets import packaged_cache, tiny_llama, tiny_tokenizer, write_gguf

    root = tmp_path_factory.mktemp("profile-assets")
    tokenizer = tiny_tokenizer()
    write_gguf(tiny_llama(tokenizer.get_vocab_size()), tokenizer, root / "tiny.gguf", "Q4_1")
    (root / "model").mkdir()
    convert_gguf(root / "tiny.gguf", root / "model")
    return {"model": root / "model", "cache": packaged_cache(root / "packaged", n_articles=10, words=60)}


def miniature(profile: str, model: Path):
    from coalora.checks import run_params_checks

    full = load_params(ROOT, profile)
    run_params_checks(full, f"profiles/{profile}.yaml")   # the full-size profile passes every cross-field rule
    raw = deep_merge(full.model_dump(mode="json"), MINIATURE)
    raw["model"]["name_or_path"] = str(model)
    return full, validate(raw, f"{profile} in miniature")


# real-gpu in miniature still trains 6 targets x 7 methods and scores ~150 rows: ~12 min on 2 loaded cores,
# so it runs with `pytest -m long`, outside CI
@pytest.mark.parametrize("profile", ["real", pytest.param("real-gpu", marks=pytest.mark.long)])
def test_real_profile_runs_every_stage_in_miniature(profile, assets, tmp_path, monkeypatch):
    from coalora.stages import PIPELINE, get_stage, run_stage

    monkeypatch.setenv(ENV, str(assets["cache"]))
    monkeypatch.setenv("COALORA_EVAL_WORKERS", "1")
    full, params = miniature(profile, assets["model"])
    assert full.data.source == "packaged" and full.model.name_or_path.startswith(".coalora/fetch/models/")
    for name in PIPELINE:
        run_stage(get_stage(name), params, tmp_path, progress=False)

    art = tmp_path / "artifacts"
    train = read_json(art / "train" / "targets.json")
    assert train["dtype"] == full.train.dtype and len(train["targets"]) == len(full.train.target_bits)
    rows = read_json(art / "evaluate" / "table.json")["rows"]
    methods = {row["method"] for row in rows}
    assert set(full.train.methods) <= methods and {"none", "full"} <= methods
    targets = {row["config_id"] for row in rows if row["set"] == "target" and row["method"] == "coalora"}
    assert len(targets) == len(full.train.target_bits)
    unseen = {row["config_id"] for row in rows if row["set"] == "unseen" and row["method"] == "coalora"}
    assert len(unseen) == len(full.allocate.unseen.milp_budgets) + len(full.allocate.unseen.random_budgets)
    claims = read_json(art / "report" / "claims.json")
    assert len(claims) >= 5 and {c["verdict"] for c in claims} <= {"holds", "does not hold", "inconclusive"}
    report = (art / "report" / "report.md").read_text()
    assert "ARC-Easy" in report and "unseen" in report  # the report names the real benchmarks and the row kinds
