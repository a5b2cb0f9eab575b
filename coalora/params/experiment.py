"""The sections of the methods and their comparison: the adapter, training, the configuration search,
evaluation, the report and the studies (stages train, evaluate, report; ``coalora study``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from coalora.params.base import Section, distinct_bits


class ConfigNetParams(Section):
    """θ, the configuration-aware network (METHOD.md §3): seven embeddings of width ``embed_dim`` →
    LayerNorm → Linear(7·embed_dim → hidden) → SiLU → Linear(hidden → r·r); last layer init N(0, init_std)."""

    embed_dim: int = Field(ge=1)
    hidden: int = Field(ge=1)
    init_std: float = Field(ge=0)


class LoraParams(Section):
    """The LoRA adapter shared by every configuration: ΔW = (alpha/rank)·B·U·A, and the cache of quantized
    weights that makes switching configuration cheap (bounded to ``cache_mb`` megabytes)."""

    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    confignet: ConfigNetParams
    cache_mb: int = Field(ge=0)


# The training methods (METHOD.md §4, §6); coalora.train.methods holds one table row per name.
TRAIN_METHODS = ("coalora", "coalora-frozen", "coalora-random", "qlora", "lqlora", "shared", "qlora-bnb")


class TrainParams(Section):
    """Configuration-aware training and the baselines, all at the same target configs (METHOD.md §4, §6).

    The **target set**: for each value of ``target_bits`` the pool config nearest to it; every method is
    trained for (and later scored at) exactly these configs. Compute is counted in **config-steps** (one
    forward+backward of one configuration on one batch): a per-config method (qlora, lqlora, qlora-bnb) trains
    ``steps_per_config`` steps (= config-steps) for each target; a joint method (the coalora family, shared)
    gets ``joint_compute`` × the config-steps of ONE per-config method over the whole target set, i.e.
    ``joint_compute · steps_per_config · len(targets)`` config-steps, taken as that many / K steps of K configs
    each. ``k``: configs per coalora step, their losses summed. ``data``: ``text`` (LM loss on the C4-schema
    fine-tuning text) or ``instruct`` (loss on response tokens only). ``eval_sequences``: held-out sequences of
    the fixed batch scored before and after training. ``seed``: the training seed (LoRA init, batch order,
    config draws, search); null = the top-level ``seed`` (the seeds study varies it over one base model).
    """

    methods: list[Literal[TRAIN_METHODS]] = Field(min_length=1)
    target_bits: list[float] = Field(min_length=1)
    k: int = Field(ge=1)
    steps_per_config: int = Field(ge=1)
    joint_compute: float = Field(gt=0, le=100)
    lr: float = Field(gt=0, le=1)
    grad_clip: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=8, le=8192)
    dtype: Literal["float32", "bfloat16"]
    data: Literal["text", "instruct"]
    eval_sequences: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    seed: int | None = Field(ge=0)

    @field_validator("target_bits")
    @classmethod
    def _bits_in_range(cls, bits: list[float]) -> list[float]:
        return distinct_bits(bits)

    @field_validator("methods")
    @classmethod
    def _distinct(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"{methods} repeats a method")
        return methods


class EvaluateParams(Section):
    """Stage ``evaluate``: which (method, config) rows are scored, under the ``eval`` protocol.

    Every method (and the quantized base without adapter, ``none``) is scored at every **target** config and
    at every config of the common **unseen** set (``allocate.unseen``); a method that drew other configs in
    training (the coalora family: its pool) is also scored at the drawn config nearest each of
    ``seen_budgets`` (**seen** rows); full precision and the bitsandbytes NF4 QLoRA are **reference** rows.
    ``sets``: the row kinds scored (``target`` always; the compute study scores only targets).
    """

    seen_budgets: list[float]
    sets: list[Literal["target", "seen", "unseen"]] = Field(min_length=1)

    @field_validator("sets")
    @classmethod
    def _target_first(cls, sets: list[str]) -> list[str]:
        if "target" not in sets or len(set(sets)) != len(sets):
            raise ValueError(f"{sets}: must include 'target' (every comparison is made there), each kind once")
        return sets

    @field_validator("seen_budgets")
    @classmethod
    def _budgets_in_range(cls, bits: list[float]) -> list[float]:
        return distinct_bits(bits)


class HvAccuracy(Section):
    """Hypervolume of accuracy fronts: points (bits / bits_scale, 1 − accuracy), both minimised."""

    bits_scale: float = Field(gt=0)
    reference: list[float] = Field(min_length=2, max_length=2)


class HvPerplexity(Section):
    """Hypervolume of perplexity fronts: points (bits / bits_scale, ln(ppl) / ln(ppl_max)), both minimised;
    a perplexity of ``ppl_max`` or worse scores y ≥ 1 (nothing, with reference y = 1)."""

    bits_scale: float = Field(gt=0)
    ppl_max: float = Field(gt=1)
    reference: list[float] = Field(min_length=2, max_length=2)


class HvParams(Section):
    """Normalisation and reference point of every hypervolume (written next to each value)."""

    accuracy: HvAccuracy
    perplexity: HvPerplexity


class BootstrapParams(Section):
    """Paired bootstrap over benchmark items and perplexity windows: every difference the report states
    carries a ``confidence`` interval from ``resamples`` resamples drawn with generator ``seed``."""

    resamples: int = Field(ge=1000, le=100000)
    seed: int = Field(ge=0)
    confidence: float = Field(gt=0.5, lt=1)


class ClaimsParams(Section):
    """Margins of the claims table (``report/claims.json``), in the units of each claim's metric.

    ``equivalence_points``: "coalora ≈ per-config" holds when the interval of the accuracy gap lies within
    ±this many points (or above 0); ``equivalence_ppl_ratio``: likewise for the perplexity ratio, within
    [1/ratio, ratio] (or below 1); ``unseen_points`` / ``unseen_ppl_ratio``: "unseen within 1% accuracy / 2%
    perplexity of seen" (1.0 points, 1.02); ``superiority_points``: a "greater than" claim does not hold when
    its interval lies below this margin.
    """

    equivalence_points: float = Field(gt=0)
    equivalence_ppl_ratio: float = Field(gt=1)
    unseen_points: float = Field(gt=0)
    unseen_ppl_ratio: float = Field(gt=1)
    superiority_points: float = Field(gt=0)


class ReportParams(Section):
    """Stage ``report``: summary metrics over the evaluation table, intervals, claims, and the report.

    ``serve_k``: the number of configurations K in "cost to serve K configurations": a per-config method
    trains K runs; a joint method trains once; each then switches to (quantizes) each of the K configs.
    ``baseline``: the per-config method gaps are stated against.
    """

    hv: HvParams
    serve_k: int = Field(ge=1)
    baseline: Literal["qlora", "lqlora"]
    bootstrap: BootstrapParams
    claims: ClaimsParams


class StudyParams(Section):
    """``coalora study``: runs beside the pipeline over its data, base model and pool (no stage reads this).

    ``compute``: joint-compute multipliers of the compute study (coalora only, the per-config baseline at its
    default); ``seeds``: training seeds of the seeds study (every method).
    """

    compute: list[float] = Field(min_length=1)
    seeds: list[int] = Field(min_length=2)

    @field_validator("compute")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(not 0 < v <= 100 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{values}: each multiplier must be in (0, 100] and distinct")
        return values

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, values: list[int]) -> list[int]:
        if any(v < 0 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{values}: seeds must be non-negative and distinct")
        return values


class SearchParams(Section):
    """The Pareto configuration search interleaved with coalora's training (METHOD.md §5).

    A joint run of S steps holds ``rounds`` + 1 rounds: round 0 at step 0 (measure only), round r at step
    ⌊r·S/rounds⌋. Each round re-measures f1 (the held-out loss on a fixed slice of ``f1_sequences``
    sequences) of every seen config with the current adapter and θ, proposes ``q`` new configs (coalora:
    qLogNEHVI over ``n_candidates`` candidates, ``mc_samples`` quasi-MC samples; coalora-random: q of the
    same candidates at random; coalora-frozen: none), then keeps the non-dominated configs of each of
    ``n_segments`` equal bits segments over the whole range. Hypervolumes: points (bits/8, f1/f1_scale),
    f1_scale the worst f1 of the initial pool at step 0, reference ``hv_reference``.
    """

    rounds: int = Field(ge=1)
    q: int = Field(ge=1)
    n_segments: int = Field(ge=1)
    n_candidates: int = Field(ge=1)
    mc_samples: int = Field(ge=1)
    f1_sequences: int = Field(ge=1)
    hv_reference: list[float] = Field(min_length=2, max_length=2)

    @model_validator(mode="after")
    def _enough_candidates(self) -> "SearchParams":
        if self.n_candidates < self.q:
            raise ValueError(f"n_candidates ({self.n_candidates}) must be at least q ({self.q})")
        if min(self.hv_reference) <= 0:
            raise ValueError(f"hv_reference {self.hv_reference} must be positive (normalised objectives)")
        return self
