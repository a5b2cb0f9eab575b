"""The training methods as data: one row per method, read by the one training loop (METHOD.md §4, §6).

| method         | model     | θ   | LoRA init          | runs                 | configs per step              | search |
|----------------|-----------|-----|--------------------|----------------------|-------------------------------|--------|
| coalora        | CoAModel  | yes | A random, B = 0    | one over the pool    | ``train.k`` sampled from pool | ehvi   |
| coalora-frozen | CoAModel  | yes | A random, B = 0    | one over the pool    | ``train.k`` sampled from pool | none   |
| coalora-random | CoAModel  | yes | A random, B = 0    | one over the pool    | ``train.k`` sampled from pool | random |
| qlora          | CoAModel  | no  | A random, B = 0    | one per target       | that target                   |        |
| lqlora         | CoAModel  | no  | rank-r SVD of W    | one per target       | that target (residual quant.) |        |
| shared         | CoAModel  | no  | A random, B = 0    | one over the targets | 1 sampled from the targets    |        |
| qlora-bnb      | peft+bnb  | no  | peft's (B = 0)     | one, uniform NF4     | the uniform QLoRA config      |        |

The pool methods (sample from the pool) run search rounds (``coalora.search``): ``ehvi`` proposes new
configs by qLogNEHVI, ``random`` the same number of random new candidates (the paper's "random extension"
ablation), ``none`` keeps the initial pool (the "frozen pool" ablation) and only re-measures its f1.

Compute is counted in config-steps (one forward+backward of one configuration on one batch). A per-config
run trains ``train.steps_per_config`` steps of one config each. A joint run (the coalora family, shared) gets

    C_joint = ⌊joint_compute · steps_per_config · n_targets⌋ config-steps,  taken as ⌊C_joint / K⌋ steps of K

so with ``joint_compute`` = 1 every joint method spends what ONE per-config method spends over the whole
target set (the equal-compute default of the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from coalora.errors import UserError
from coalora.params import TRAIN_METHODS, TrainParams


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
        name: the method's name in ``train.methods`` and under ``artifacts/train/``.
        backend: ``coa`` (our CoAModel on NF-k double-quantized weights) or ``bnb`` (peft LoRA on
            bitsandbytes NF4 layers).
        confignet: train θ (the configuration-aware network).
        init: ``random`` (A random, B = 0) or ``svd`` (LQ-LoRA: A, B from the rank-r SVD of W, the residual
            W − B·A quantized).
        runs: ``per_config`` (one fresh run for each target), ``joint`` (one run over ``sample_from``), or
            ``uniform`` (one run at the uniform QLoRA config).
        sample_from: where a joint run draws each step's configs: the training ``pool`` or the ``targets``.
        k_from_params: draw ``train.k`` configs per step (else exactly 1).
        description: one line for summaries.
        search: how a pool method's search rounds propose configs: ``ehvi``, ``random`` or ``none``
            (``none`` for every method that does not draw from the pool).
    """

    name: str
    backend: Literal["coa", "bnb"]
    confignet: bool
    init: Literal["random", "svd"]
    runs: Literal["per_config", "joint", "uniform"]
    sample_from: Literal["pool", "targets", "none"]
    k_from_params: bool
    description: str
    search: Literal["ehvi", "random", "none"]

    @property
    def has_pool(self) -> bool:
        """Draws from a training pool, which search rounds measure (and, unless ``none``, rebuild)."""
        return self.runs == "joint" and self.sample_from == "pool"

    def k(self, p: TrainParams) -> int:
        """Configs per step."""
        return p.k if self.k_from_params else 1

    def steps(self, p: TrainParams, n_targets: int) -> int:
        """Steps of ONE run of this method (the module docstring's budget).

        Raises:
            UserError: naming ``train.joint_compute`` when a joint run would get no step at all.
        """
        if self.runs != "joint":
            return p.steps_per_config
        steps = int(p.joint_compute * p.steps_per_config * n_targets) // self.k(p)
        if steps < 1:
            raise UserError(f"train.joint_compute: {p.joint_compute} × {p.steps_per_config} steps × {n_targets} "
                            f"targets gives {self.name} less than one step of K = {self.k(p)} configs; allowed: "
                            f"at least {self.k(p) / (p.steps_per_config * n_targets):.4g}")
        return steps

    def config_steps(self, p: TrainParams, n_targets: int) -> int:
        """Config-steps of the whole method: steps × configs per step, summed over its runs."""
        runs = n_targets if self.runs == "per_config" else 1
        return runs * self.steps(p, n_targets) * self.k(p)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("coalora", "coa", True, "random", "joint", "pool", True,
           "one LoRA + θ, K pool configs per step, losses summed; pool grown by log-NEHVI search rounds", "ehvi"),
    Method("coalora-frozen", "coa", True, "random", "joint", "pool", True,
           "coalora without search: the initial pool throughout (ablation)", "none"),
    Method("coalora-random", "coa", True, "random", "joint", "pool", True,
           "coalora with random new configs instead of EHVI proposals (ablation)", "random"),
    Method("qlora", "coa", False, "random", "per_config", "none", False,
           "a fresh LoRA per target config", "none"),
    Method("lqlora", "coa", False, "svd", "per_config", "none", False,
           "a LoRA per target config from the SVD of W; the residual quantized", "none"),
    Method("shared", "coa", False, "random", "joint", "targets", False,
           "one LoRA, no θ, one target config sampled per step", "none"),
    Method("qlora-bnb", "bnb", False, "random", "uniform", "none", False,
           "classic QLoRA: peft LoRA on bitsandbytes NF4 (4.127 bits)", "none"),
)}

assert tuple(METHODS) == TRAIN_METHODS, "coalora.params.TRAIN_METHODS and the table must name the same methods"


def check_pool_methods(train: TrainParams, search_rounds: int, pool_size: int, n_targets: int) -> None:
    """Fail before any training when a pool method of ``train.methods`` cannot run: it draws ``train.k``
    distinct pool configs per step, and needs a step for every search round.

    Raises:
        UserError: naming ``train.k`` (pool too small) or the round setting (``search.round_steps``).
    """
    from coalora.search import round_steps

    pool_methods = [METHODS[name] for name in train.methods if METHODS[name].has_pool]
    if pool_methods and train.k > pool_size:
        raise UserError(f"train.k: {train.k} configs per step, but the pool holds only {pool_size}; "
                        f"lower train.k or enlarge the pool (allocate.grid_size)")
    for method in pool_methods:
        round_steps(method.steps(train, n_targets), search_rounds)
