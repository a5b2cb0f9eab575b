"""Stage ``allocate``: the initial training pool and the held-out configs (METHOD.md §5).

A grid of ``allocate.grid_size`` budgets evenly spaced on [budget_min, budget_max] is split alternately:
even positions (0, 2, 4, …) → the **pool** (seen), odd positions → **held-out** (unseen), each solved by
the integer program on the calibrate stage's selected cost table. ``allocate.n_random_heldout`` random
configs join the held-out set, each at a budget drawn from the held-out budgets
(:func:`coalora.allocate.random_at_budget`). A held-out config identical to a pool config (same id) is
dropped: held-out means never in the pool. Writes

    pool/<id>.json, heldout/<id>.json   configs (Config.to_dict) with budget, source (milp | random), cost,
                                         weighting, and for milp configs the proven optimality gap
    configs.csv                          id, set, source, budget, bits, cost
"""

from __future__ import annotations

import csv
import io
import time

import numpy as np

from coalora.allocate import allocate_budget, random_at_budget
from coalora.artifacts import write_text_atomic
from coalora.calibrate import CostTable
from coalora.params import Params
from coalora.space import SPEC_INDEX, Config
from coalora.stages.core import Stage, StageContext

CSV_COLUMNS = ("id", "set", "source", "budget", "bits", "cost")


def budget_grid(budget_min: float, budget_max: float, size: int) -> tuple[list[float], list[float]]:
    """(pool budgets, held-out budgets): the grid's even and odd positions, rounded to 6 decimals."""
    grid = [round(float(b), 6) for b in np.linspace(budget_min, budget_max, size)]
    return grid[0::2], grid[1::2]


def _milp_configs(table: CostTable, budgets: list[float], cost: np.ndarray, bpp: np.ndarray,
                  numel: np.ndarray) -> tuple[list[Config], list[float]]:
    """One integer program per budget; (configs, seconds per solve). ``gap``: the proven optimality gap."""
    configs, seconds = [], []
    for budget in budgets:
        started = time.perf_counter()
        result = allocate_budget(cost, bpp, numel, budget)
        seconds.append(time.perf_counter() - started)
        configs.append(Config.from_indices(_global(table, result.idx), table.layers, budget=budget, source="milp",
                                           cost=result.objective, gap=result.gap, weighting=table.weighting))
    return configs, seconds


def _global(table: CostTable, idx: np.ndarray) -> list[int]:
    """Column indices of the table → indices into all_specs() (the same unless the table is a subset)."""
    return [SPEC_INDEX[table.specs[int(c)]] for c in idx]


def _unique(configs: list[Config], exclude: set[str] = frozenset()) -> list[Config]:
    """The first config of every id not in ``exclude``, in order."""
    seen, kept = set(exclude), []
    for config in configs:
        if config.id not in seen:
            seen.add(config.id)
            kept.append(config)
    return kept


def _csv(rows: list[tuple[str, Config]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, c in rows:
        writer.writerow([c.id, name, c.meta["source"], c.meta["budget"], f"{c.bits:.6f}", f"{c.meta['cost']:.6e}"])
    return buffer.getvalue()


def run(params: Params, ctx: StageContext) -> dict:
    """Allocate: solve the grid, draw the random held-out configs, deduplicate, write; returns a summary."""
    p = params.allocate
    table = CostTable.load(ctx.input("calibrate"))
    cost, bpp, numel = table.selected.numpy(), table.bits_per_param.numpy(), table.numel.numpy()
    pool_budgets, heldout_budgets = budget_grid(p.budget_min, p.budget_max, p.grid_size)
    pool_all, pool_seconds = _milp_configs(table, pool_budgets, cost, bpp, numel)
    heldout_milp, heldout_seconds = _milp_configs(table, heldout_budgets, cost, bpp, numel)
    rng = np.random.default_rng(params.seed)
    randoms = []
    for _ in range(p.n_random_heldout):
        budget = float(rng.choice(heldout_budgets))
        idx = random_at_budget(bpp, numel, budget, p.random_tolerance, rng)
        randoms.append(Config.from_indices(_global(table, idx), table.layers, budget=budget, source="random",
                                           cost=float(cost[np.arange(len(idx)), idx].sum()),
                                           weighting=table.weighting))
    pool = _unique(pool_all)
    heldout = _unique(heldout_milp + randoms, exclude={c.id for c in pool})
    for name, configs in (("pool", pool), ("heldout", heldout)):
        (ctx.out / name).mkdir()
        for config in configs:
            config.save(ctx.out / name / f"{config.id}.json")
    write_text_atomic(ctx.out / "configs.csv", _csv([("pool", c) for c in pool] + [("heldout", c) for c in heldout]))
    seconds = pool_seconds + heldout_seconds
    return {
        "weighting": table.weighting,
        "pool": len(pool),
        "heldout": len(heldout),
        "heldout_random": sum(c.meta["source"] == "random" for c in heldout),
        "duplicates_dropped": len(pool_all) + len(heldout_milp) + len(randoms) - len(pool) - len(heldout),
        "pool_bits": [round(min(c.bits for c in pool), 4), round(max(c.bits for c in pool), 4)],
        "heldout_bits": [round(min(c.bits for c in heldout), 4), round(max(c.bits for c in heldout), 4)]
        if heldout else [],
        "milp_gap_max": float(max(c.meta["gap"] for c in pool_all + heldout_milp)),
        "solve_seconds_mean": round(float(np.mean(seconds)), 4),
        "solve_seconds_max": round(float(np.max(seconds)), 4),
    }


STAGE = Stage(
    name="allocate",
    fn=run,
    params=("seed", "allocate"),
    deps=("calibrate",),
    code=("coalora/allocate.py", "coalora/space.py", "coalora/calibrate.py", "coalora/stages/allocate.py"),
    description="budgeted integer programs: the initial pool (seen) and held-out (unseen) configs",
)
