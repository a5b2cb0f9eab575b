"""The Pareto configuration search interleaved with training (METHOD.md §5).

    encoding  a config as GP input: per-layer bits per parameter in [0, 1]; bits are linear in it
    gp        the f1 GP (botorch SingleTaskGP, float64) and qLogNEHVI with exact bits
    propose   candidate configs around the pool (local moves + random), EHVI or random choice of q
    rounds    one search round on a JSON state: re-measure f1, propose, rebuild the segmented pool, log

botorch is imported inside the functions that use it, so importing this package stays cheap.
"""

from coalora.search.rounds import MODES, RoundSetup, new_state, pool_configs, round_steps, search_round

__all__ = ["MODES", "RoundSetup", "new_state", "pool_configs", "round_steps", "search_round"]
