"""Candidate configs around the pool, and the choice of the q proposals (EHVI or random).

The space is discrete (432^L configs), so the acquisition is maximised over a finite candidate set:

* local moves (3/4 of the set): a pool config with 1 to ``MAX_CHANGED`` layers moved to a NEIGHBOURING
  spec: one of its five fields stepped to the adjacent allowed value (weight_bits 3 → 2 or 4, block0
  32 → 16 or 64, …), so a candidate is a small, valid edit of a good config;
* random configs (1/4): every layer's spec drawn uniformly, to reach regions the pool does not cover.

Candidates are deduplicated and never already seen, so every proposal is a NEW valid config (METHOD.md
§5 defect (a): the reference's search returned its start point and never proposed anything).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from coalora.quant import SPEC_FIELDS, all_specs
from coalora.search.encoding import encode
from coalora.search.gp import fit_f1_gp, greedy_choice, log_nehvi, objective_model

MAX_CHANGED = 3      # layers a local move edits at most
RANDOM_SHARE = 0.25  # share of the candidate set drawn uniformly at random


def _neighbour_table() -> list[list[int]]:
    """For each spec index, the indices of the specs one field-step away."""
    index = {spec: i for i, spec in enumerate(all_specs())}
    table = []
    for spec in all_specs():
        near = []
        for name, allowed in SPEC_FIELDS.items():
            pos = allowed.index(getattr(spec, name))
            for step in (-1, 1):
                if 0 <= pos + step < len(allowed):
                    fields = {**spec.to_dict(), name: allowed[pos + step]}
                    near.append(index[type(spec)(**fields)])
        table.append(near)
    return table


NEIGHBOURS = _neighbour_table()


def local_move(indices: Sequence[int], rng: np.random.Generator) -> list[int]:
    """A copy of ``indices`` with 1..MAX_CHANGED distinct layers moved to a neighbouring spec."""
    out = list(indices)
    n = int(rng.integers(1, min(MAX_CHANGED, len(out)) + 1))
    for layer in rng.choice(len(out), size=n, replace=False):
        near = NEIGHBOURS[out[layer]]
        out[layer] = int(near[int(rng.integers(len(near)))])
    return out


def candidate_set(pool: Sequence[Sequence[int]], seen: set[tuple[int, ...]], n: int,
                  rng: np.random.Generator) -> list[list[int]]:
    """Up to ``n`` distinct, never-seen configs (as spec-index lists): local moves of pool configs, then
    uniform random ones (module docstring). Tries at most 20·n draws, so a nearly exhausted space ends."""
    n_specs, n_layers = len(all_specs()), len(pool[0])
    n_local = n - int(round(RANDOM_SHARE * n))
    found: dict[tuple[int, ...], None] = {}
    for attempt in range(20 * n):
        if len(found) >= n:
            break
        if len(found) < n_local and attempt < 10 * n:
            cand = local_move(pool[int(rng.integers(len(pool)))], rng)
        else:
            cand = [int(i) for i in rng.integers(n_specs, size=n_layers)]
        key = tuple(cand)
        if key not in seen and key not in found:
            found[key] = None
    return [list(k) for k in found]


def propose(mode: str, candidates: list[list[int]], q: int, *, x_seen: torch.Tensor, f1_norm: torch.Tensor,
            weights: torch.Tensor, reference: Sequence[float], mc_samples: int, seed: int,
            rng: np.random.Generator) -> list[int]:
    """Indices into ``candidates`` of the q proposals.

    ``ehvi``: fit the f1 GP on the seen configs, then greedy sequential qLogNEHVI over the candidates
    (deterministic given ``seed``).
    ``random``: q candidates uniformly (the "random extension" ablation: the same candidate set, the same
    count, no model).
    """
    if not candidates:
        return []
    if mode == "random":
        return [int(i) for i in rng.choice(len(candidates), size=min(q, len(candidates)), replace=False)]
    if mode != "ehvi":
        raise ValueError(f"propose: mode must be 'ehvi' or 'random' (got {mode!r})")
    from linear_operator.utils.warnings import NumericalWarning

    # botorch draws from torch's global generator (pruning the noisy baseline samples from the posterior):
    # seed it from ``seed`` so a proposal is a function of its inputs, and fork it so training's stream,
    # which a resumed run must replay exactly, is left untouched
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(seed)
        # the kernel matrix can be near-singular (configs with equal per-layer bits share one input, the
        # fitted noise can be tiny); linear_operator then adds 1e-8 jitter and warns each time: harmless
        warnings.simplefilter("ignore", NumericalWarning)
        gp = fit_f1_gp(x_seen, f1_norm)
        acq = log_nehvi(objective_model(gp, weights), x_seen, reference, mc_samples, seed)
        return greedy_choice(acq, encode(candidates), q)
