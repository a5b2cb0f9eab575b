"""The Pareto search: encoding, candidates, proposals (new, valid, and they move), rounds on a JSON state,
and the three defects of the reference METHOD.md §5 names: (a) proposals move, (b) f1 is re-measured with
the current adapter every round, (c) segments cover the whole bits range.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from coalora.errors import UserError
from coalora.pareto import hypervolume, non_dominated, normalise, segmented_pool
from coalora.quant import SPEC_FIELDS, all_specs
from coalora.search import RoundSetup, new_state, pool_configs, round_steps, search_round
from coalora.search.encoding import bits_of, encode, layer_weights
from coalora.search.propose import NEIGHBOURS, candidate_set, local_move, propose
from coalora.search.rounds import rebuild_pool
from coalora.space import Config
from coalora.train import METHODS, eval_losses, train_method
from test_train import LAYERS, one_thread, search_params, tiny_pool, tiny_setup  # noqa: F401  (autouse fixture)

N_LAYERS = len(LAYERS)


def random_config(rng: np.random.Generator) -> Config:
    return Config.from_indices(rng.integers(len(all_specs()), size=N_LAYERS).tolist(), LAYERS)


def synthetic_f1(config: Config) -> float:
    """A smooth stand-in for the loss: lower bits hurt, most in the first layers (so the bits-f1 trade-off
    depends on WHICH layers are coarse, and a search has something to find)."""
    x = encode([config.spec_indices().tolist()])[0]
    weight = torch.linspace(2.0, 0.5, N_LAYERS, dtype=torch.float64)
    return float(1.0 + ((1 - x) ** 2 * weight).mean())


def synthetic_evaluate(configs: list[Config]) -> dict[str, float]:
    return {c.id: synthetic_f1(c) for c in configs}


# ---------------------------------------------------------------------------------------------------------
# Encoding and candidates
# ---------------------------------------------------------------------------------------------------------

def test_bits_are_exactly_linear_in_the_encoding():
    rng = np.random.default_rng(0)
    configs = [random_config(rng) for _ in range(20)] + tiny_pool()
    x = encode([c.spec_indices().tolist() for c in configs])
    assert x.shape == (len(configs), N_LAYERS) and x.dtype == torch.float64
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.allclose(bits_of(x, layer_weights(LAYERS)), torch.tensor([c.bits for c in configs],
                                                                          dtype=torch.float64), atol=1e-12)


def test_neighbours_differ_in_one_field_by_one_step():
    specs = all_specs()
    for i in (0, 100, 431):
        for j in NEIGHBOURS[i]:
            a, b = specs[i].to_dict(), specs[j].to_dict()
            changed = [f for f in SPEC_FIELDS if a[f] != b[f]]
            assert len(changed) == 1
            allowed = SPEC_FIELDS[changed[0]]
            assert abs(allowed.index(a[changed[0]]) - allowed.index(b[changed[0]])) == 1
    assert len(NEIGHBOURS[0]) == 5  # the first spec: every field at its first value, one way to step each


def test_local_moves_edit_one_to_three_layers():
    rng = np.random.default_rng(1)
    start = tiny_pool()[1].spec_indices().tolist()
    for _ in range(50):
        moved = local_move(start, rng)
        diff = [i for i, (a, b) in enumerate(zip(start, moved)) if a != b]
        assert 1 <= len(diff) <= 3 and all(moved[i] in NEIGHBOURS[start[i]] for i in diff)


def test_candidates_are_new_distinct_and_valid():
    rng = np.random.default_rng(2)
    pool = [c.spec_indices().tolist() for c in tiny_pool()]
    seen = {tuple(p) for p in pool}
    cands = candidate_set(pool, seen, 64, rng)
    assert len(cands) == 64 and len({tuple(c) for c in cands}) == 64
    assert not {tuple(c) for c in cands} & seen
    assert all(len(c) == N_LAYERS and all(0 <= i < len(all_specs()) for i in c) for c in cands)
    ids = {Config.from_indices(c, LAYERS).id for c in cands}  # valid configs, distinct ids
    assert len(ids) == 64 and not ids & {c.id for c in tiny_pool()}


# ---------------------------------------------------------------------------------------------------------
# Proposals
# ---------------------------------------------------------------------------------------------------------

def proposal_inputs(n_seen: int = 24, seed: int = 3):
    rng = np.random.default_rng(seed)
    seen = tiny_pool() + [random_config(rng) for _ in range(n_seen - 4)]
    keys = {tuple(c.spec_indices().tolist()) for c in seen}
    cands = candidate_set([c.spec_indices().tolist() for c in seen[:4]], keys, 96, rng)
    x = encode([c.spec_indices().tolist() for c in seen])
    f1 = torch.tensor([synthetic_f1(c) for c in seen], dtype=torch.float64)
    return seen, cands, x, f1 / f1.max()


def hv_gain(seen: list[Config], new: list[Config], scale: float) -> float:
    def hv(configs):
        pts = normalise([c.bits for c in configs], [synthetic_f1(c) / scale for c in configs])
        return hypervolume(pts, [1.1, 1.1])
    return hv(seen + new) - hv(seen)


@pytest.mark.parametrize("mode", ["ehvi", "random"])
def test_proposals_are_new_valid_configs_and_move(mode):
    """Defect (a): the reference's candidate search returned its start point; ours proposes q configs that
    were never seen, each a valid config."""
    seen, cands, x, f1n = proposal_inputs()
    chosen = propose(mode, cands, 4, x_seen=x, f1_norm=f1n, weights=layer_weights(LAYERS),
                     reference=[1.1, 1.1], mc_samples=32, seed=0, rng=np.random.default_rng(0))
    assert len(chosen) == 4 and len(set(chosen)) == 4
    new = [Config.from_indices(cands[i], LAYERS) for i in chosen]
    assert not {c.id for c in new} & {c.id for c in seen}
    assert all(2.0 < c.bits < 8.7 for c in new)


def test_ehvi_picks_better_than_random_candidates():
    """On a known f1, the EHVI choice improves the hypervolume more than any of ten random choices."""
    seen, cands, x, f1n = proposal_inputs()
    scale = max(synthetic_f1(c) for c in seen)
    kwargs = dict(x_seen=x, f1_norm=f1n, weights=layer_weights(LAYERS), reference=[1.1, 1.1], mc_samples=32,
                  seed=0)
    ehvi = propose("ehvi", cands, 4, rng=np.random.default_rng(0), **kwargs)
    gain = hv_gain(seen, [Config.from_indices(cands[i], LAYERS) for i in ehvi], scale)
    random_gains = [hv_gain(seen, [Config.from_indices(cands[i], LAYERS) for i in
                                   propose("random", cands, 4, rng=np.random.default_rng(s), **kwargs)], scale)
                    for s in range(10)]
    assert gain > max(random_gains) > 0  # measured: 0.016 against at most 0.005


def test_proposals_are_deterministic_and_leave_the_global_generator_alone():
    """botorch draws from torch's global generator: propose seeds a fork of it, so two calls agree whatever
    the generator's state, and the training stream (which a resumed run replays) is untouched."""
    seen, cands, x, f1n = proposal_inputs()
    before = torch.get_rng_state()
    runs = [propose("ehvi", cands, 3, x_seen=x, f1_norm=f1n, weights=layer_weights(LAYERS),
                    reference=[1.1, 1.1], mc_samples=16, seed=5, rng=np.random.default_rng(0)) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------------------------------------
# Rounds on the JSON state
# ---------------------------------------------------------------------------------------------------------

def run_rounds(mode: str, rounds: int = 3, seed: int = 7, evaluate=synthetic_evaluate, **overrides) -> dict:
    """Round 0, ``rounds`` proposal rounds, and the final measuring round, on a fixed f1."""
    p = search_params(q=3, n_candidates=24, n_segments=3, **overrides)
    state = new_state(tiny_pool())
    for r in range(rounds + 2):
        search_round(state, RoundSetup(mode, evaluate, LAYERS, p, k=2, seed=seed), r, 10 * r,
                     final=r == rounds + 1)
    return state


def test_round_steps_and_too_many_rounds():
    """R proposal rounds strictly inside the run, so steps follow each; the final round at the end."""
    assert round_steps(16, 2) == [0, 5, 10, 16]
    assert round_steps(10, 3) == [0, 2, 5, 7, 10]
    with pytest.raises(UserError, match=r"search\.rounds: 5 proposal rounds need at least 6 training steps"):
        round_steps(5, 5)


@pytest.mark.parametrize("mode", ["ehvi", "random"])
def test_each_round_proposes_q_new_configs_and_rebuilds_the_segmented_pool(mode):
    state = run_rounds(mode)
    json.dumps(state)  # the state is JSON (it lives in the checkpoint's state.json)
    ids = [e["id"] for e in state["seen"]]
    assert len(ids) == len(set(ids)) == 4 + 3 * 3
    assert state["rounds"][0]["proposed"] == [] == state["rounds"][-1]["proposed"]  # round 0, final: measure
    assert state["rounds"][-1]["final"] and not any(r["final"] for r in state["rounds"][:-1])
    proposed = [i for r in state["rounds"][1:] for i in r["proposed"]]
    assert len(proposed) == 9 and not set(proposed) & {c.id for c in tiny_pool()}
    for e in state["seen"]:
        assert e["bits"] == pytest.approx(Config.from_indices(e["indices"], LAYERS).bits)
    bits = [e["bits"] for e in state["seen"]]
    f1 = [e["f1"] for e in state["seen"]]
    assert state["pool"] == [ids[i] for i in sorted(segmented_pool(bits, f1, 3), key=lambda i: (bits[i], ids[i]))]
    assert [c.id for c in pool_configs(state, LAYERS)] == state["pool"]


def test_round_log_hypervolume_and_front_match_a_recomputation():
    state = run_rounds("ehvi")
    scale = state["f1_scale"]
    assert scale == pytest.approx(max(synthetic_f1(c) for c in tiny_pool()))
    for r in state["rounds"]:
        pts = np.array([[p["bits"] / 8, p["f1"] / scale] for p in r["pool"]])
        assert r["hypervolume"] == pytest.approx(hypervolume(pts, [1.1, 1.1]))
        assert r["front"] == [p["id"] for p, keep in zip(r["pool"], non_dominated(pts)) if keep]
        assert r["hv_reference"] == [1.1, 1.1] and "f1_scale" in r["hv_normalisation"]


def final_hv(mode: str, seed: int) -> float:
    return run_rounds(mode, rounds=3, seed=seed)["rounds"][-1]["hypervolume"]


def test_the_search_improves_the_pool_more_than_random_configs_or_none():
    """On a synthetic loss where WHICH layers are coarse matters, over several seeds: the final pool's
    hypervolume of the EHVI search beats that of random new configs, which beats the frozen pool."""
    seeds = range(4)
    hv = {mode: [final_hv(mode, s) for s in seeds] for mode in ("ehvi", "random", "none")}
    assert len(set(hv["none"])) == 1  # no proposals: the initial pool, whatever the seed
    assert all(r >= n for r, n in zip(hv["random"], hv["none"]))  # f1 fixed: new configs never shrink the front
    assert np.mean(hv["ehvi"]) > np.mean(hv["random"]) > np.mean(hv["none"])
    assert sum(e > r for e, r in zip(hv["ehvi"], hv["random"])) >= 3


def test_held_out_configs_are_never_proposed():
    """The common unseen set is excluded from the candidates: with every local move of the pool's lowest
    config held out, none of them is ever proposed."""
    from coalora.search.propose import NEIGHBOURS

    pool = tiny_pool()
    base = pool[0].spec_indices().tolist()
    held = [Config.from_indices(base[:i] + [n] + base[i + 1:], LAYERS) for i in range(N_LAYERS)
            for n in NEIGHBOURS[base[i]]]
    p = search_params(q=4, n_candidates=64, n_segments=3)
    state = new_state(pool, excluded=held)
    for r in range(3):
        search_round(state, RoundSetup("ehvi", synthetic_evaluate, LAYERS, p, k=2, seed=3), r, r)
    proposed = {i for r in state["rounds"] for i in r["proposed"]}
    assert len(proposed) == 8 and not proposed & {c.id for c in held}


def test_frozen_keeps_the_initial_pool_and_still_measures():
    state = run_rounds("none")
    assert [e["id"] for e in state["seen"]] == [c.id for c in tiny_pool()]
    assert all(r["proposed"] == [] for r in state["rounds"])
    assert all([p["id"] for p in r["pool"]] == [c.id for c in tiny_pool()] for r in state["rounds"])
    assert all(e["f1"] is not None for e in state["seen"])


def test_segments_cover_the_whole_range_in_a_round():
    """Defect (c): the 8.3-bit config is alone in the top segment and stays in the pool (the reference
    dropped everything above 6.5 bits)."""
    state = run_rounds("ehvi", rounds=1)
    top = tiny_pool()[-1]
    assert top.bits > 8 and top.id in state["pool"]


def test_the_pool_never_shrinks_below_k():
    seen = [{"id": str(i), "bits": 2.0 + i, "f1": 3.0 - i} for i in range(3)]  # one front
    assert rebuild_pool(seen, 1, k=2) == ["0", "1", "2"]
    seen = [{"id": str(i), "bits": 2.0 + i, "f1": 1.0 + i} for i in range(3)]  # "0" dominates the rest
    assert rebuild_pool(seen, 1, k=2) == ["0", "1"]  # topped up by the next-lowest f1


# ---------------------------------------------------------------------------------------------------------
# Interleaved with training
# ---------------------------------------------------------------------------------------------------------

def test_f1_is_re_measured_with_the_current_adapter_every_round(tmp_path):
    """Defect (b): the reference measured f1 once, untrained. Ours: every round's f1 of the initial pool
    configs changes as the adapter trains, and the last round's equals a fresh measurement with the final
    adapter and θ."""
    from coalora.train.runner import build_model

    setup = tiny_setup()
    method = METHODS["coalora"]
    run = train_method(method, setup, tmp_path).runs[0]
    rounds = run.search["rounds"]
    assert [r["step"] for r in rounds] == [0, 2, 5, 8]
    first = tiny_pool()[0].id
    f1_by_round = [next(m["f1"] for m in r["measured"] if m["id"] == first) for r in rounds]
    assert f1_by_round[3] < f1_by_round[2] < f1_by_round[1] < f1_by_round[0]  # each round sees the training
    model = build_model(method, setup)
    model.load_adapter_state_dict(run.adapter)
    measured = {m["id"]: m["f1"] for m in rounds[-1]["measured"]}
    configs = [Config.from_indices(e["indices"], LAYERS) for e in run.search["seen"]]
    fresh = eval_losses(model, configs, setup.f1_batch, setup.params.batch_size)
    assert fresh == pytest.approx(measured, rel=1e-6)
    assert all(r["proposed"] for r in rounds[1:3]) and not rounds[3]["proposed"]  # proposal rounds, then final


def test_proposals_are_trained_on_after_their_round(tmp_path):
    """Every proposal round is followed by training steps, and proposals kept in the pool are drawn in them:
    a config proposed in round r is seen (drawn), and its draws can only come after round r."""
    run = train_method(METHODS["coalora"], tiny_setup(steps_per_config=24), tmp_path).runs[0]  # 24 steps
    rounds = run.search["rounds"]
    assert [r["step"] for r in rounds] == [0, 8, 16, 24]
    for r in rounds[1:-1]:
        assert r["step"] < run.steps and r["proposed"]
        kept = [i for i in r["proposed"] if i in {p["id"] for p in r["pool"]}]
        assert any(run.draws.get(i, 0) > 0 for i in kept), r["round"]
    proposed = {i for r in rounds for i in r["proposed"]}
    assert proposed & set(run.draws)  # trained on: a proposal the evaluation may call seen


def test_search_does_not_disturb_the_training_stream(tmp_path):
    """Round 0 (at step 0) and the search draw nothing from the training generators: up to the first
    proposal round, the losses equal those of coalora-frozen, whose rounds only measure."""
    setup = tiny_setup(search=search_params(rounds=1))
    coalora = train_method(METHODS["coalora"], setup, tmp_path / "c").runs[0]
    frozen = train_method(METHODS["coalora-frozen"], setup, tmp_path / "f").runs[0]
    first = coalora.search["rounds"][1]["step"]
    assert 0 < first < coalora.steps
    assert coalora.losses[:first] == frozen.losses[:first]
    assert coalora.search["rounds"][1]["proposed"] and not frozen.search["rounds"][1]["proposed"]


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("search, message", [
    ({"q": 0}, "search.q: Input should be greater than or equal to 1"),
    ({"n_candidates": 2, "q": 4}, "search: Value error, n_candidates (2) must be at least q (4)"),
    ({"hv_reference": [1.1]}, "search.hv_reference: List should have at least 2 items"),
    ({"rounds": 2.5}, "search.rounds: Input should be a valid integer"),
])
def test_bad_search_params_name_the_key(repo_root, search, message):
    import yaml

    from coalora.errors import ParamsError
    from coalora.params import validate

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["search"].update(search)
    with pytest.raises(ParamsError, match=re.escape(message)):
        validate(raw)


def test_the_f1_slice_is_the_tail_of_the_held_out_text_and_too_short_text_is_refused():
    from coalora.train.batches import pack_stream, tail_windows
    from test_train import CharTokenizer, tiny_texts

    tok, texts = CharTokenizer(), tiny_texts(20, 2)
    stream = pack_stream(tok, texts)
    tail = tail_windows(tok, texts, 16, 3, head=4)
    total = len(stream) // 16
    assert torch.equal(tail["input_ids"], stream[(total - 3) * 16: total * 16].view(3, 16))
    with pytest.raises(UserError, match=r"search\.f1_sequences: 3 windows after the 1000 held-out ones"):
        tail_windows(tok, texts, 16, 3, head=1000)
