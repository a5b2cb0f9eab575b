"""Allocation: the integer program against brute force, exact reductions, budgets, random configs, the stage."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import yaml
import pytest
import torch

from coalora.allocate import (Relaxation, allocate_budget, budget_range, config_bits, pareto_options,
                              random_at_budget, solve_budget)
from coalora.artifacts import read_json
from coalora.calibrate.cost_table import CostTable
from coalora.errors import UserError
from coalora.params import load_params
from coalora.quant import all_specs
from coalora.space import Config
from coalora.stages.core import StageContext

SPECS = all_specs()
BPP = np.array([s.bits_per_param for s in SPECS])


def brute_force(cost, bpp, numel, budget):
    """The least cost over every combination within the budget (the same bits formula as the solver)."""
    best = (np.inf, None)
    for combo in itertools.product(*[range(cost.shape[1])] * cost.shape[0]):
        if config_bits(combo, bpp, numel) <= budget:
            best = min(best, (sum(cost[i, c] for i, c in enumerate(combo)), combo))
    return best


def structured_table(n_layers, rng, specs=SPECS):
    """A cost table shaped like a real one: error ~ 4^-bits, worse with coarse scales, per-layer scale."""
    base = np.array([4.0 ** -s.weight_bits * (1 + 0.1 * np.log2(s.block0)) * (1 + 2.0 ** -s.scale_bits)
                     * (1.01 if s.scale2_dtype != "fp32" else 1.0) * (1 + 0.02 * np.log2(s.block1)) for s in specs])
    return rng.lognormal(0, 1.5, (n_layers, 1)) * base * rng.lognormal(0, 0.05, (n_layers, len(specs)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_equals_brute_force_on_a_tiny_instance(seed):
    rng = np.random.default_rng(seed)
    columns = rng.choice(len(SPECS), size=5, replace=False)
    bpp = BPP[columns]
    cost = rng.uniform(0, 1, (3, 5)) * (9 - bpp)  # fewer bits cost more, with noise
    numel = rng.integers(100, 5000, size=3)
    low, high = budget_range(bpp, numel)
    for budget in np.linspace(low, high, 9):
        objective, combo = brute_force(cost, bpp, numel, budget)
        idx, got = solve_budget(cost, bpp, numel, float(budget))
        assert got == pytest.approx(objective, rel=1e-12), (budget, idx, combo)
        assert config_bits(idx, bpp, numel) <= budget


def test_dominated_pruning_and_reduced_cost_fixing_keep_the_optimum():
    rng = np.random.default_rng(7)
    columns = rng.choice(len(SPECS), size=12, replace=False)
    bpp = BPP[columns]
    cost = structured_table(3, rng, [SPECS[c] for c in columns])
    numel = rng.integers(1000, 9000, size=3)
    for row in cost:
        kept = pareto_options(row, bpp)
        assert np.all(np.diff(bpp[kept]) > 0) and np.all(np.diff(row[kept]) < 0)
        for c in set(range(12)) - set(kept.tolist()):  # every dropped spec is dominated by a kept one
            assert any(bpp[k] <= bpp[c] and row[k] <= row[c] for k in kept)
    low, high = budget_range(bpp, numel)
    for budget in np.linspace(low, high, 7)[1:-1]:
        full, _ = brute_force(cost, bpp, numel, budget)
        options = [pareto_options(row, bpp) for row in cost]
        relax = Relaxation(options, cost, bpp, numel, budget)
        assert relax.lower <= full + 1e-12 and relax.upper >= full - 1e-12
        assert config_bits(relax.upper_idx, bpp, numel) <= budget
        kept = relax.keep(relax.upper)
        sub = np.full_like(cost, 1e9)  # the program restricted to the kept options
        for i, o in enumerate(kept):
            sub[i, o] = cost[i, o]
        assert brute_force(sub, bpp, numel, budget)[0] == pytest.approx(full, rel=1e-12)


def test_bits_never_exceed_the_budget_over_a_sweep():
    rng = np.random.default_rng(3)
    cost = structured_table(10, rng)
    numel = rng.choice([128 * 128, 128 * 352, 64 * 128], size=10)
    low, high = budget_range(BPP, numel)
    previous = np.inf
    for budget in [low, *np.linspace(2.1, 8.5, 14).tolist(), high]:
        result = allocate_budget(cost, BPP, numel, budget)
        assert result.bits == config_bits(result.idx, BPP, numel) <= budget
        assert result.bound <= result.objective and result.gap < 1e-2
        # more bits never cost more (up to the accepted gap)
        assert result.objective <= previous * (1 + 2e-2)
        previous = result.objective
    assert allocate_budget(cost, BPP, numel, high).idx.tolist() == [int(np.argmin(r)) for r in cost]


def test_impossible_budget_names_the_field_and_range():
    cost, numel = np.ones((2, len(SPECS))), np.array([64, 64])
    for bad in (2.0, 8.7, float("nan")):
        with pytest.raises(UserError, match=r"budget: .* bits is not feasible; allowed: 2\.0322 … 8\.6250"):
            solve_budget(cost, BPP, numel, bad)


def test_random_configs_land_just_under_their_budget():
    numel = np.array([128 * 128] * 16 + [128 * 352] * 12)  # the default model's 28 layers
    seen = set()
    for budget in (2.3, 3.1, 4.6, 7.9, 8.5):
        rng = np.random.default_rng(5)
        idx = random_at_budget(BPP, numel, budget, 0.01, rng)
        bits = config_bits(idx, BPP, numel)
        assert budget - 0.01 < bits <= budget
        assert random_at_budget(BPP, numel, budget, 0.01, np.random.default_rng(5)).tolist() == idx.tolist()
        seen.update(idx.tolist())
    assert len(seen) > 50  # random specs, not a few favourites
    # two layers: the reachable bits are coarse; still never over the budget
    for budget in np.linspace(2.05, 8.6, 25):
        idx = random_at_budget(BPP, np.array([100, 5000]), budget, 0.01, np.random.default_rng(0))
        assert config_bits(idx, BPP, np.array([100, 5000])) <= budget


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def calibrate_dir(tmp_path):
    """A calibrate stage output for a made-up 2-block model (the allocation reads nothing else)."""
    rng = np.random.default_rng(0)
    kinds = {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (16, 32), "mlp.down_proj": (32, 48)}
    layers = {f"model.layers.{b}.{k}": s for b in range(2) for k, s in kinds.items()}
    cost = torch.tensor(structured_table(len(layers), rng))
    folder = tmp_path / "calibrate"
    folder.mkdir()
    CostTable(layers, SPECS, {"cost_fisher": cost, "cost_squared": cost * 3}, "fisher", 4).save(folder)
    return folder


def _run_allocate(params, calibrate_dir, out):
    from coalora.stages.allocate import STAGE

    out.mkdir()
    ctx = StageContext(root=out.parent, out=out, work=out.parent / "work", inputs={"calibrate": calibrate_dir},
                       progress=False)
    return STAGE.fn(params, ctx)


def test_stage_pool_and_unseen_are_disjoint_and_deterministic(repo_root, calibrate_dir, tmp_path):
    params = load_params(repo_root, "smoke")
    table = CostTable.load(calibrate_dir)
    summary = _run_allocate(params, calibrate_dir, tmp_path / "a")
    again = _run_allocate(params, calibrate_dir, tmp_path / "b")
    assert {k: v for k, v in summary.items() if "seconds" not in k} == \
        {k: v for k, v in again.items() if "seconds" not in k}
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.*"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    pool = {p.stem for p in (tmp_path / "a/pool").glob("*.json")}
    unseen = {p.stem for p in (tmp_path / "a/unseen").glob("*.json")}
    assert pool and unseen and not pool & unseen
    assert summary["pool"] == len(pool) and summary["unseen"] == len(unseen)
    rows = list(csv.DictReader(open(tmp_path / "a/configs.csv")))
    assert {r["id"] for r in rows if r["set"] == "pool"} == pool
    assert {r["id"] for r in rows if r["set"] == "unseen"} == unseen
    a = params.allocate
    grid = np.round(np.linspace(a.budget_min, a.budget_max, a.grid_size), 6)
    for row in rows:
        config = Config.load(tmp_path / "a" / row["set"] / f"{row['id']}.json", table.layers)
        budget = config.meta["budget"]
        assert config.bits <= budget and float(row["bits"]) == pytest.approx(config.bits, abs=1e-6)
        assert row["source"] == config.meta["source"]
        if row["set"] == "pool":
            assert row["source"] == "milp" and budget in grid.tolist()
        elif row["source"] == "milp":
            assert budget in a.unseen.milp_budgets
        else:
            assert budget in a.unseen.random_budgets and budget - a.unseen.random_tolerance < config.bits
    assert sum(r["source"] == "random" for r in rows) == summary["unseen_random"] == len(a.unseen.random_budgets)
    assert read_json(tmp_path / "a/pool" / f"{rows[0]['id']}.json")["weighting"] == "fisher"


@pytest.mark.parametrize("unseen, message", [
    ({"milp_budgets": [2.25]}, "allocate.unseen.milp_budgets: budget 2.25 gives the same config as the pool "
                               "config at budget 2.25"),
    ({"random_budgets": [9.0]}, "allocate.unseen.random_budgets: Value error, [9.0] out of range"),
    ({"milp_budgets": [], "random_budgets": []}, "allocate.unseen: Value error, milp_budgets and random_budgets "
                                                 "are both empty"),
])
def test_an_unseen_set_that_cannot_be_held_out_is_refused_naming_the_key(repo_root, calibrate_dir, tmp_path,
                                                                        unseen, message):
    from coalora.errors import ParamsError, UserError
    from coalora.params import validate

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["allocate"]["unseen"].update(unseen)
    with pytest.raises((ParamsError, UserError)) as caught:
        _run_allocate(validate(raw), calibrate_dir, tmp_path / "a")
    assert message in str(caught.value)


def test_stage_uses_the_recorded_weighting(repo_root, calibrate_dir, tmp_path):
    params = load_params(repo_root, "smoke")
    table = CostTable.load(calibrate_dir)
    squared = CostTable(table.layers, table.specs, table.tables, "squared", 0)
    other = tmp_path / "squared"
    other.mkdir()
    squared.save(other)
    _run_allocate(params, other, tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out/configs.csv")))
    config = read_json(tmp_path / "out/pool" / f"{rows[0]['id']}.json")
    assert config["weighting"] == "squared"
    idx = [SPECS.index(Config.from_dict(config, table.layers)[n]) for n in table.layers]
    assert config["cost"] == pytest.approx(float(sum(table.tables["cost_squared"][i, c] for i, c in enumerate(idx))))
