"""Stage ``allocate``: the initial training pool and the common unseen set (METHOD.md §5).

The **pool**: the integer program's least-cost config at each of ``allocate.grid_size`` budgets evenly
spaced on [budget_min, budget_max], solved on the calibrate stage's selected cost table (duplicates dropped).

The **unseen** set (``allocate.unseen``), held out of every method's training and of the search's candidates
(the train stage reads it): the least-cost configs at ``milp_budgets`` and random configs at
``random_budgets`` (:func:`coalora.allocate.random_at_budget`). An unseen config equal to a pool config, or
two equal unseen configs, cannot be held out: the stage stops naming the budget (choose budgets between the
pool's grid points). Writes

    pool/<id>.json, unseen/<id>.json   configs (Config.to_dict) with budget, source (milp | random), cost,
                                        weighting, and for milp configs the proven optimality gap
    configs.csv                         id, set, source, budget, bits, cost
"""

from __future__ import annotations

import time

import numpy as np

from coalora import interrupt
from coalora.allocate import allocate_budget, budget_range, random_at_budget
from coalora.artifacts import write_csv
from coalora.calibrate.cost_table import CostTable
from coalora.errors import UserError
from coalora.params import Params
from coalora.space import SPEC_INDEX, Config
from coalora.stages.core import Stage, StageContext

CSV_COLUMNS = ("id", "set", "source", "budget", "bits", "cost")


def budget_grid(budget_min: float, budget_max: float, size: int) -> list[float]:
    """The pool's budgets: ``size`` evenly spaced on [budget_min, budget_max], rounded to 6 decimals."""
    return [round(float(b), 6) for b in np.linspace(budget_min, budget_max, size)]


def _milp_configs(table: CostTable, budgets: list[float], cost: np.ndarray, bpp: np.ndarray,
                  numel: np.ndarray) -> tuple[list[Config], list[float]]:
    """One integer program per budget; (configs, seconds per solve). ``gap``: the proven optimality gap."""
    configs, seconds = [], []
    for budget in budgets:
        interrupt.check()
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


def _csv_rows(rows: list[tuple[str, Config]]) -> list[list]:
    """configs.csv rows (``CSV_COLUMNS``) of (set name, config) pairs."""
    return [[c.id, name, c.meta["source"], c.meta["budget"], f"{c.bits:.6f}", f"{c.meta['cost']:.6e}"]
            for name, c in rows]


def _check_budgets(budgets: list[float], key: str, bpp: np.ndarray, numel: np.ndarray) -> None:
    """UserError naming ``key`` when a budget lies outside what this model's configs can reach."""
    low, high = budget_range(bpp, numel)
    bad = [b for b in budgets if not low <= b <= high]
    if bad:
        raise UserError(f"{key}: {bad} bits cannot be reached by this model's configs; allowed: {low:.4f} … "
                        f"{high:.4f}")


def unseen_configs(table: CostTable, p, cost: np.ndarray, bpp: np.ndarray, numel: np.ndarray,
                   pool: list[Config], seed: int) -> tuple[list[Config], list[float]]:
    """The unseen set (module docstring); (configs, seconds per MILP solve).

    Raises:
        UserError: naming ``allocate.unseen.<field>`` when a budget is infeasible or its config coincides with
            a pool config or another unseen config.
    """
    u = p.unseen
    _check_budgets(u.milp_budgets, "allocate.unseen.milp_budgets", bpp, numel)
    _check_budgets(u.random_budgets, "allocate.unseen.random_budgets", bpp, numel)
    milp, seconds = _milp_configs(table, u.milp_budgets, cost, bpp, numel)
    rng = np.random.default_rng(seed)
    randoms = []
    for budget in u.random_budgets:
        idx = random_at_budget(bpp, numel, budget, u.random_tolerance, rng)
        randoms.append(Config.from_indices(_global(table, idx), table.layers, budget=budget, source="random",
                                           cost=float(cost[np.arange(len(idx)), idx].sum()),
                                           weighting=table.weighting))
    taken = {c.id: f"the pool config at budget {c.meta['budget']}" for c in pool}
    for key, configs in (("milp_budgets", milp), ("random_budgets", randoms)):
        for config in configs:
            if config.id in taken:
                raise UserError(f"allocate.unseen.{key}: budget {config.meta['budget']} gives the same config as "
                                f"{taken[config.id]}; an unseen config must differ from every pool and unseen "
                                f"config: choose budgets between the pool's grid points "
                                f"({p.budget_min} … {p.budget_max}, {p.grid_size} budgets)")
            taken[config.id] = f"the unseen config at budget {config.meta['budget']}"
    return milp + randoms, seconds


def allocate_pool(params: Params, ctx: StageContext) -> dict:
    """Allocate: solve the pool's grid, then the unseen set; write; returns a summary."""
    p = params.allocate
    table = CostTable.load(ctx.input("calibrate"))
    cost, bpp, numel = table.selected.numpy(), table.bits_per_param.numpy(), table.numel.numpy()
    grid = budget_grid(p.budget_min, p.budget_max, p.grid_size)
    _check_budgets(grid, "allocate.budget_min/budget_max", bpp, numel)
    pool_all, pool_seconds = _milp_configs(table, grid, cost, bpp, numel)
    pool = _unique(pool_all)
    unseen, unseen_seconds = unseen_configs(table, p, cost, bpp, numel, pool, params.seed)
    for name, configs in (("pool", pool), ("unseen", unseen)):
        (ctx.out / name).mkdir()
        for config in configs:
            config.save(ctx.out / name / f"{config.id}.json")
    write_csv(ctx.out / "configs.csv", CSV_COLUMNS,
              _csv_rows([("pool", c) for c in pool] + [("unseen", c) for c in unseen]))
    seconds = pool_seconds + unseen_seconds
    milp = pool_all + [c for c in unseen if c.meta["source"] == "milp"]
    return {
        "weighting": table.weighting,
        "pool": len(pool),
        "unseen": len(unseen),
        "unseen_random": sum(c.meta["source"] == "random" for c in unseen),
        "duplicates_dropped": len(pool_all) - len(pool),
        "pool_bits": [round(min(c.bits for c in pool), 4), round(max(c.bits for c in pool), 4)],
        "unseen_bits": [round(min(c.bits for c in unseen), 4), round(max(c.bits for c in unseen), 4)],
        "milp_gap_max": float(max(c.meta["gap"] for c in milp)),
        "solve_seconds_mean": round(float(np.mean(seconds)), 4),
        "solve_seconds_max": round(float(np.max(seconds)), 4),
    }


STAGE = Stage(
    name="allocate",
    fn=allocate_pool,
    params=("seed", "allocate"),
    deps=("calibrate",),
    description="budgeted integer programs: the initial pool and the common unseen set",
)
