"""One way to build a method's model: fresh for training, or rebuilt from its trained adapter (METHOD.md §6).

A method's model is described by its :class:`Recipe` — the backend, θ or not, the LoRA init and the seed it
was drawn from — which is what the train stage records of every method in ``train.json`` (``backend``,
``confignet``, ``init``, ``seed``): training builds from ``Recipe.of(method, seed)``, evaluation from
``Recipe.from_record(train.json)``. The backend is a row of :data:`BACKENDS`, looked up the way peft
dispatches on a layer's type; each row says how the model is built on a base model, which header its adapter
file carries, which model serves it under a config, and why it cannot run here (if so):

    coa  CoAModel(base, layers, θ if ``confignet``): NF-k double-quantized weights, any config; served merged,
         every layer W̃ + (α/r)·B·U·A (``CoAModel.merged``)
    bnb  peft LoRA on bitsandbytes NF4 layers (``coalora.model.bnb_lora``): the uniform QLoRA config only; served
         as peft's model

Init (:func:`start`): ``svd`` is LQ-LoRA's — A, B from the seeded rank-r SVD of W and the residual
W − (α/r)·B₀·A₀ as the quantized base — else A random from the seed and B = 0. A rebuilt model is started
the same way before its trained A, B (and θ) are loaded, so an LQ-LoRA model quantizes the same residual it
was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

if TYPE_CHECKING:  # pragma: no cover
    from coalora.params import LoraParams
    from coalora.space import Config, Layers


@dataclass(frozen=True)
class Recipe:
    """How a method's model is built (module docstring).

    Attributes:
        backend: a key of :data:`BACKENDS` (``coa`` or ``bnb``).
        confignet: the model has θ.
        init: ``random`` (A random, B = 0) or ``svd`` (LQ-LoRA).
        seed: the seed of the init (and of torch's global generator when the model is built).
    """

    backend: str
    confignet: bool
    init: str
    seed: int

    @classmethod
    def of(cls, method, seed: int) -> "Recipe":
        """A ``coalora.train.methods.Method`` row trained with ``seed``."""
        return cls(method.backend, method.confignet, method.init, seed)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Recipe":
        """What the train stage recorded of a method (its ``train.json``)."""
        return cls(str(record["backend"]), bool(record["confignet"]), str(record["init"]), int(record["seed"]))

    @classmethod
    def quantized_base(cls, seed: int) -> "Recipe":
        """The quantized base model without an adapter: a CoAModel without θ, B = 0 (so W' = W̃ exactly)."""
        return cls("coa", False, "random", seed)


@dataclass(frozen=True)
class Backend:
    """One row of :data:`BACKENDS`.

    Attributes:
        build: (base model, layers, lora, recipe) → the trainable model (modifies the base in place).
        header: model → its adapter file's header (``coalora.model.adapter``).
        serve: (model, config) → a Hugging Face causal LM computing the model under ``config``.
        unavailable: () → None when the backend can run here, else why not.
    """

    build: Callable[..., torch.nn.Module]
    header: Callable[[Any], dict]
    serve: Callable[[Any, "Config"], torch.nn.Module]
    unavailable: Callable[[], str | None]


def _coa_build(base, layers: "Layers", lora: "LoraParams", recipe: Recipe):
    from coalora.model.coa import CoAModel

    return CoAModel(base, dict(layers), lora, use_confignet=recipe.confignet)


def _coa_header(model) -> dict:
    from coalora.model.adapter import coa_header

    return coa_header(model)


def _coa_serve(model, config: "Config"):
    model.set_config(config)  # quantizes every layer, evaluates θ once
    return model.merged().eval()


def _bnb_build(base, layers: "Layers", lora: "LoraParams", recipe: Recipe):
    from coalora.model.bnb_lora import BnbLoraModel

    return BnbLoraModel(base, layers, lora)  # quantizes to NF4 on construction


def _bnb_serve(model, config: "Config"):
    model.set_config(config)  # checks that it is the uniform config
    return model.peft.get_base_model().eval()


def _bnb_unavailable() -> str | None:
    from coalora.model.bnb_lora import skip_reason

    return skip_reason()


BACKENDS: dict[str, Backend] = {
    "coa": Backend(_coa_build, _coa_header, _coa_serve, lambda: None),
    "bnb": Backend(_bnb_build, lambda model: model.adapter_metadata(), _bnb_serve, _bnb_unavailable),
}


def backend(recipe: Recipe) -> Backend:
    """The recipe's row of :data:`BACKENDS`; ValueError naming the known ones."""
    if recipe.backend not in BACKENDS:
        raise ValueError(f"unknown backend {recipe.backend!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[recipe.backend]


def build(recipe: Recipe, base: torch.nn.Module, layers: "Layers", lora: "LoraParams") -> torch.nn.Module:
    """A trainable model on ``base`` (seeded: module initialisers such as θ's draw from the global generator)."""
    row = backend(recipe)
    torch.manual_seed(recipe.seed)
    return row.build(base, layers, lora, recipe)


def start(model, recipe: Recipe) -> None:
    """Start afresh from the recipe's seed: LQ-LoRA's SVD init with the residual as the quantized base, or
    A random, B = 0 (module docstring)."""
    if recipe.init == "svd":
        model.set_residual_base(model.init_lqlora(recipe.seed))
    else:
        model.reset_lora(recipe.seed)


def rebuild(recipe: Recipe, base: torch.nn.Module, layers: "Layers", lora: "LoraParams",
            tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The trained model: built and started as in training, then its adapter tensors loaded (none: the
    started model, e.g. the quantized base with B = 0).

    Raises:
        ValueError: the tensors do not fit the model (missing, unexpected or mis-shaped).
    """
    model = build(recipe, base, layers, lora)
    start(model, recipe)
    if tensors:
        model.load_adapter_state_dict(dict(tensors))
    return model


def serve(model, recipe: Recipe, config: "Config") -> torch.nn.Module:
    """The Hugging Face causal LM computing ``model`` under ``config`` (module docstring)."""
    return backend(recipe).serve(model, config)


def adapter_header(model, recipe: Recipe) -> dict:
    """The JSON header of the model's adapter files."""
    return backend(recipe).header(model)
