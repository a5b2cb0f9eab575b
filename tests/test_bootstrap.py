"""The paired bootstrap and the statistics built on it, against closed forms; the claims' rules and schema."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coalora.evaluate.bootstrap import Resampler, counts, hypervolume_batch
from coalora.evaluate.claims import (at_most, build_claims, check_claims, cost_claim, equivalence,
                                     ratio_claim, superiority)
from coalora.evaluate.statistics import Stats, summarise
from coalora.pareto import hypervolume

TASKS = ["boolq", "winogrande"]


def items_of(rng, p, n=400, windows=50, nll=2.0):
    """One row's per-item results: Bernoulli(p) correctness per task, window NLL sums around nll·T."""
    return {**{t: (rng.random(n) < p).astype(np.uint8) for t in TASKS},
            "ppl": rng.normal(nll * 63, 3.0, size=windows)}


def test_counts_row_zero_is_the_sample_and_every_resample_draws_n():
    c = counts(7, 50, np.random.default_rng(0))
    assert c.shape == (51, 7) and (c[0] == 1).all() and (c.sum(1) == 7).all()


def test_the_paired_difference_interval_matches_the_closed_form():
    """For a mean of paired differences d_i over n items, the bootstrap standard error is √(var(d)/n):
    the 95% interval is ≈ ±1.96·SE around the observed difference (to Monte-Carlo error)."""
    rng = np.random.default_rng(1)
    a = items_of(rng, 0.6)
    b = {t: np.where(rng.random(400) < 0.8, a[t], 1 - a[t]).astype(np.uint8) for t in TASKS}  # 80% agree
    b["ppl"] = a["ppl"] + rng.normal(0.5, 1.0, size=50)
    res = Resampler({"a": a, "b": b}, TASKS, 63, resamples=8000, seed=3)
    d = np.concatenate([a[t].astype(float) - b[t] for t in TASKS]).reshape(2, 400).mean(0)  # per item pair
    diff = res.stat("a", "acc_mean") - res.stat("b", "acc_mean")
    assert diff[0] == pytest.approx(d.mean())
    se = math.sqrt(sum(np.var(a[t].astype(float) - b[t]) / 400 for t in TASKS)) / 2  # two independent tasks
    iv = res.interval(diff, 0.95)
    assert iv.value == pytest.approx(d.mean()) and iv.low < iv.value < iv.high
    assert iv.half_width() == pytest.approx(1.96 * se, rel=0.08)
    nll = res.stat("a", "nll") - res.stat("b", "nll")
    w = (a["ppl"] - b["ppl"]) / 63
    assert nll[0] == pytest.approx(w.mean())
    assert res.interval(nll, 0.95).half_width() == pytest.approx(1.96 * w.std() / math.sqrt(50), rel=0.08)


def test_the_same_seed_gives_the_same_intervals_and_identical_rows_give_zero():
    rng = np.random.default_rng(2)
    a = items_of(rng, 0.5)
    res1 = Resampler({"a": a, "c": dict(a)}, TASKS, 63, resamples=1000, seed=9)
    res2 = Resampler({"a": a, "c": dict(a)}, TASKS, 63, resamples=1000, seed=9)
    assert np.array_equal(res1.stat("a", "acc_mean"), res2.stat("a", "acc_mean"))
    zero = res1.interval(res1.stat("a", "nll") - res1.stat("c", "nll"), 0.95)
    assert zero.value == zero.low == zero.high == 0 and not zero.significant()


def test_batched_hypervolume_equals_the_reference_implementation():
    rng = np.random.default_rng(4)
    for _ in range(50):
        n = int(rng.integers(1, 9))
        x, y = rng.random(n) * 1.2, rng.random((5, n)) * 1.2
        batch = hypervolume_batch(x, y, [1.0, 1.1])
        assert batch == pytest.approx([hypervolume(np.stack([x, yb], 1), [1.0, 1.1]) for yb in y])


def rows_for(methods, configs, rng, acc):
    """Rows and items: every method at every config (target / unseen), plus full precision."""
    rows, items = [], {}
    for m in methods:
        for cid, kind, bits in configs:
            job = f"{m}__{cid}"
            rows.append({"job": job, "method": m, "config_id": cid, "set": kind, "bits": bits,
                         "switch_seconds": 0.01})
            items[job] = items_of(rng, acc[m][cid], nll=2.0 - acc[m][cid])
    rows.append({"job": "full__fp", "method": "full", "config_id": "fp", "set": "reference", "bits": 32.0})
    items["full__fp"] = items_of(rng, 0.9, nll=1.1)
    return rows, items


def test_stats_gaps_damage_recovery_and_seen_unseen_on_known_rows(tmp_path):
    """The statistics on rows whose item-level truth is known: differences of means, recovery shares."""
    from coalora.artifacts import write_json

    configs = [("t1", "target", 2.5), ("t2", "target", 3.0), ("u1", "unseen", 2.7)]
    acc = {"none": {"t1": 0.5, "t2": 0.6, "u1": 0.55}, "coalora": {"t1": 0.8, "t2": 0.8, "u1": 0.7},
           "qlora": {"t1": 0.7, "t2": 0.8, "u1": 0.6}}
    rows, items = rows_for(acc, configs, np.random.default_rng(5), acc)
    stats = Stats(rows, Resampler(items, TASKS, 63, resamples=1000, seed=0), 0.95)
    obs = lambda m, c: float(np.mean([items[f"{m}__{c}"][t].mean() for t in TASKS]))  # noqa: E731
    gap = stats.gap("coalora", "qlora")
    assert gap[0] == pytest.approx(100 * np.mean([obs("coalora", c) - obs("qlora", c) for c in ("t1", "t2")]))
    full = float(np.mean([items["full__fp"][t].mean() for t in TASKS]))
    rec = stats.recovery("coalora", ["t1", "t2"], "acc_mean")
    assert rec[0] == pytest.approx(sum(obs("coalora", c) - obs("none", c) for c in ("t1", "t2"))
                                   / sum(full - obs("none", c) for c in ("t1", "t2")))
    assert stats.damage("t1")["acc_points"][0] == pytest.approx(100 * (full - obs("none", "t1")))
    su = stats.seen_unseen("coalora", {"t1", "t2"})
    gain = lambda cs: np.mean([obs("coalora", c) - obs("none", c) for c in cs])  # noqa: E731
    assert su["acc_points"][0] == pytest.approx(100 * (gain(["t1", "t2"]) - gain(["u1"])))
    for m in ("coalora", "qlora"):
        (tmp_path / m).mkdir()
        write_json(tmp_path / m / "train.json", {"runs_kind": "joint" if m == "coalora" else "per_config",
                                                 "config_steps": 8, "steps": 4 if m == "coalora" else 8,
                                                 "seconds": 2.0, "config_draws": {"t1": 4, "t2": 4},
                                                 "runs": [{"steps": 4, "seconds": 1.0}] * (1 if m == "coalora" else 2)})
    report = report_params()
    summary = summarise(stats, TASKS, tmp_path, report)
    assert summary["gap"]["coalora"]["acc_points"]["value"] == pytest.approx(float(gap[0]), abs=1e-6)
    assert summary["compute"]["qlora"]["serve_config_steps"] == 6 * 4
    claims = build_claims(summary, report.claims, report.serve_k, 4)
    check_claims(claims)
    assert [c["claim"][:4] for c in claims] == ["(i) ", "(i) ", "(iii", "(iii", "(v) "]
    assert claims[-1]["ours"] == pytest.approx(8 / (6 * 4))


def report_params():
    from coalora.params import ReportParams

    return ReportParams.model_validate({
        "hv": {"accuracy": {"bits_scale": 8.0, "reference": [1.0, 1.0]},
               "perplexity": {"bits_scale": 8.0, "ppl_max": 10.0, "reference": [1.0, 1.0]}},
        "serve_k": 6, "baseline": "qlora",
        "bootstrap": {"resamples": 1000, "seed": 0, "confidence": 0.95},
        "claims": {"equivalence_points": 1.0, "equivalence_ppl_ratio": 1.02, "unseen_points": 1.0,
                   "unseen_ppl_ratio": 1.02, "superiority_points": 0.5}})


@pytest.mark.parametrize("rule, low, high, margin, verdict", [
    (equivalence, -0.5, 0.8, 1.0, "holds"), (equivalence, 0.2, 3.0, 1.0, "holds"),
    (equivalence, -3.0, -1.5, 1.0, "does not hold"), (equivalence, -2.0, 0.5, 1.0, "inconclusive"),
    (superiority, 0.1, 2.0, 0.5, "holds"), (superiority, -1.0, 0.4, 0.5, "does not hold"),
    (superiority, -1.0, 1.0, 0.5, "inconclusive"),
    (at_most, -0.5, 0.9, 1.0, "holds"), (at_most, 1.2, 2.0, 1.0, "does not hold"),
    (at_most, 0.5, 1.5, 1.0, "inconclusive"),
])
def test_claim_rules(rule, low, high, margin, verdict):
    assert rule(low, high, margin) == verdict


def test_ratio_claims_judge_log_ratios_and_the_cost_claim_needs_equal_quality():
    better = {"value": 0.97, "ci_low": 0.95, "ci_high": 0.99}
    assert ratio_claim("c", "m", better, "p", "equivalence", 1.02)["verdict"] == "holds"
    worse = {"value": 1.1, "ci_low": 1.05, "ci_high": 1.15}
    assert ratio_claim("c", "m", worse, "p", "equivalence", 1.02)["verdict"] == "does not hold"
    assert cost_claim(256, 6, 64, ["holds", "holds"])["verdict"] == "holds"
    assert cost_claim(256, 6, 64, ["holds", "inconclusive"])["verdict"] == "inconclusive"
    assert cost_claim(512, 6, 64, ["holds"])["verdict"] == "does not hold"  # ≥ 6 runs: no saving


def test_the_claims_schema_is_checked():
    good = {"claim": "c", "metric": "m", "ours": 1.0, "ci_low": 0.5, "ci_high": 1.5, "paper": "p",
            "verdict": "holds"}
    check_claims([good])
    for bad in ({**good, "verdict": "maybe"}, {k: v for k, v in good.items() if k != "paper"},
                {**good, "ci_low": float("nan")}):
        with pytest.raises(ValueError):
            check_claims([bad])
