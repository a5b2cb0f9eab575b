"""Search rounds interleaved with training (METHOD.md §5), as pure functions of a JSON state.

A joint run of S steps with ``search.rounds`` = R holds R + 2 rounds, at steps

    s_0 = 0,   s_r = ⌊r·S/(R + 1)⌋  (r = 1..R),   s_{R+1} = S

Round r, with the model as trained up to s_r:
  1. re-measure f1 (held-out loss on the fixed ``f1`` slice) of EVERY seen config with the current adapter
     and θ (defect (b) of the reference: it measured once, untrained, and never again). Round 0 only
     measures: it fixes ``f1_scale`` = the worst f1 of the initial pool, the normaliser of every later HV.
  2. (rounds 1..R, mode ``ehvi`` or ``random``) propose q NEW configs (``propose``), measure their f1. Never
     proposed: a seen config, or one of the ``excluded`` (the common unseen set no method may draw);
  3. (same rounds and modes) rebuild the pool: the segmented rule over all seen configs (U = ``n_segments``
     equal segments of bits over their WHOLE range, the non-dominated of each: ``coalora.pareto``), plus the
     ``keep`` configs (the targets every method is scored at) whatever the rule says;
  4. log the pool, its front and its hypervolume.
The last round (R + 1, at the end of training) only measures: every proposal is made while there are
steps left to train on it, so a config enters the pool only where it can still be drawn. Whether it was
drawn is what training records (``Trainer.draws``), and that alone makes a config "seen" downstream.
Mode ``none`` (coalora-frozen) keeps the initial pool and only measures, so its log is comparable.

HV normalisation: points (bits/8, f1/f1_scale), reference ``search.hv_reference``; f1_scale is measured at
step 0, where every pool method has the same untrained adapter (B = 0), so HVs compare across methods too.

The state (``new_state``) is what ``Trainer.extra["search"]`` checkpoints, so a resumed run redoes at
most the round it was killed in, with the same result: every draw comes from generators seeded by
(seed, round), and torch's global generator is forked inside ``propose``, so the training stream is
untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from coalora.errors import UserError
from coalora.params import SearchParams
from coalora.pareto import hypervolume, non_dominated, normalise, segmented_pool
from coalora.search.encoding import encode, layer_weights
from coalora.search.gp import BITS_SCALE
from coalora.search.propose import candidate_set, propose
from coalora.space import Config, Layers

MODES = ("ehvi", "random", "none")
Evaluate = Callable[[list[Config]], dict[str, float]]  # configs → id → f1 under the current model


@dataclass(frozen=True)
class RoundSetup:
    """What stays the same across the rounds of one joint run.

    Attributes:
        mode: ``ehvi`` | ``random`` | ``none`` (the method's ``search``).
        evaluate: f1 of configs under the model as trained so far.
        layers: the quantized layers (their sizes weigh the bits of a config).
        params: ``search`` params (q, n_segments, n_candidates, hv_reference, mc_samples).
        k: configs per training step (the pool never shrinks below it).
        seed: the run's seed; round r draws from generators seeded by (seed, r).
    """

    mode: str
    evaluate: Evaluate
    layers: Layers
    params: SearchParams
    k: int
    seed: int

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"search mode must be one of {MODES} (got {self.mode!r})")


def round_steps(total_steps: int, rounds: int) -> list[int]:
    """[s_0 = 0, s_1, …, s_R, s_{R+1} = total_steps] (module docstring).

    Raises:
        UserError: naming ``search.rounds`` when two rounds would fall on the same step.
    """
    if rounds + 1 > total_steps:
        raise UserError(f"search.rounds: {rounds} proposal rounds need at least {rounds + 1} training steps "
                        f"(each followed by steps that can train on its proposals), but the joint run trains only "
                        f"{total_steps}; lower search.rounds or raise train.joint_compute")
    return [0] + [r * total_steps // (rounds + 1) for r in range(1, rounds + 1)] + [total_steps]


def new_state(pool: Sequence[Config], keep: Sequence[Config] = (), excluded: Sequence[Config] = ()) -> dict:
    """The JSON state before round 0: the initial pool, all seen, none measured.

    Args:
        pool: the initial pool.
        keep: configs the pool always keeps (the targets); each must be in ``pool``.
        excluded: configs never proposed (the common unseen set).
    """
    ids = {c.id for c in pool}
    missing = [c.id for c in keep if c.id not in ids]
    if missing:
        raise ValueError(f"search: configs to keep {missing} are not in the initial pool")
    seen = [{"id": c.id, "indices": c.spec_indices().tolist(), "bits": c.bits, "f1": None, "round": 0}
            for c in pool]
    return {"seen": seen, "pool": [c.id for c in pool], "keep": [c.id for c in keep],
            "excluded": [c.spec_indices().tolist() for c in excluded], "f1_scale": None, "rounds": []}


def configs_by_id(state: dict, layers: Layers) -> dict[str, Config]:
    """Every seen config, in the order seen."""
    return {e["id"]: Config.from_indices(e["indices"], layers) for e in state["seen"]}


def pool_configs(state: dict, layers: Layers) -> list[Config]:
    """The current pool, in (bits, id) order (the order the trainer draws from)."""
    seen = configs_by_id(state, layers)
    return sorted((seen[i] for i in state["pool"]), key=lambda c: (c.bits, c.id))


def rebuild_pool(seen: list[dict], n_segments: int, k: int, keep: Sequence[str] = ()) -> list[str]:
    """Ids kept by the segmented rule over all seen, plus ``keep``; topped up by the lowest-f1 others when
    fewer than ``k`` remain (a step draws k distinct configs), which happens only with very few segments."""
    bits = [e["bits"] for e in seen]
    f1 = [e["f1"] for e in seen]
    kept = set(segmented_pool(bits, f1, n_segments)) | {i for i, e in enumerate(seen) if e["id"] in set(keep)}
    rest = sorted(set(range(len(seen))) - kept, key=lambda i: (f1[i], bits[i]))
    kept = list(kept) + rest[:max(0, k - len(kept))]
    return [seen[i]["id"] for i in sorted(kept, key=lambda i: (bits[i], seen[i]["id"]))]


def hv_normalisation(f1_scale: float) -> str:
    return f"points (bits/{BITS_SCALE:g}, f1/f1_scale), f1_scale = {f1_scale:.6f} (worst f1 of the initial " \
           f"pool at step 0)"


def round_log(state: dict, r: int, step: int, proposed: list[str], reference: Sequence[float],
              seconds: float) -> dict:
    """One entry of ``train.json``'s ``rounds``: the pool, its front, its hypervolume, the proposals."""
    by_id = {e["id"]: e for e in state["seen"]}
    pool = [{"id": i, "bits": by_id[i]["bits"], "f1": by_id[i]["f1"]} for i in state["pool"]]
    points = normalise([p["bits"] for p in pool], [p["f1"] / state["f1_scale"] for p in pool], BITS_SCALE)
    front = [p["id"] for p, keep in zip(pool, non_dominated(points)) if keep]
    return {"round": r, "step": step, "pool": pool, "front": front,
            "hypervolume": hypervolume(points, reference), "hv_reference": list(reference),
            "hv_normalisation": hv_normalisation(state["f1_scale"]), "proposed": proposed,
            "measured": [{"id": e["id"], "bits": e["bits"], "f1": e["f1"]} for e in state["seen"]],
            "seconds": round(seconds, 3)}


def search_round(state: dict, setup: RoundSetup, r: int, step: int, final: bool = False) -> dict:
    """Run round ``r`` at training step ``step`` (module docstring), updating ``state`` in place; returns its
    log entry. ``final``: the round at the end of training, which only measures."""
    started = time.perf_counter()
    seen = configs_by_id(state, setup.layers)
    for entry, f1 in zip(state["seen"], _measure(setup.evaluate, list(seen.values()))):
        entry["f1"] = f1
    if state["f1_scale"] is None:
        pool = set(state["pool"])
        state["f1_scale"] = max(e["f1"] for e in state["seen"] if e["id"] in pool)
    proposed: list[str] = []
    if setup.mode != "none" and r > 0 and not final:
        proposed = _propose_and_measure(state, setup, r)
        state["pool"] = rebuild_pool(state["seen"], setup.params.n_segments, setup.k, state["keep"])
    entry = round_log(state, r, step, proposed, setup.params.hv_reference, time.perf_counter() - started)
    entry["final"] = final
    state["rounds"].append(entry)
    return entry


def _measure(evaluate: Evaluate, configs: list[Config]) -> list[float]:
    losses = evaluate(configs)
    return [float(losses[c.id]) for c in configs]


def _propose_and_measure(state: dict, setup: RoundSetup, r: int) -> list[str]:
    """Propose q new configs, measure them, append them to ``seen``; returns their ids."""
    p, seed = setup.params, setup.seed
    rng = np.random.default_rng([seed, r])
    seen_keys = {tuple(e["indices"]) for e in state["seen"]} | {tuple(i) for i in state["excluded"]}
    pool_set = set(state["pool"])
    pool_indices = [e["indices"] for e in state["seen"] if e["id"] in pool_set]
    candidates = candidate_set(pool_indices, seen_keys, p.n_candidates, rng)
    x_seen = encode([e["indices"] for e in state["seen"]])  # (N, L)
    f1_norm = torch.tensor([e["f1"] for e in state["seen"]], dtype=torch.float64) / state["f1_scale"]
    chosen = propose(setup.mode, candidates, p.q, x_seen=x_seen, f1_norm=f1_norm,
                     weights=layer_weights(setup.layers),
                     reference=p.hv_reference, mc_samples=p.mc_samples, seed=seed * 1000 + r, rng=rng)
    new = [Config.from_indices(candidates[i], setup.layers) for i in chosen]
    for config, f1 in zip(new, _measure(setup.evaluate, new)):
        state["seen"].append({"id": config.id, "indices": config.spec_indices().tolist(), "bits": config.bits,
                              "f1": f1, "round": r})
    return [c.id for c in new]
