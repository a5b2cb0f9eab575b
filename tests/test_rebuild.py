"""One way to rebuild a trained model (coalora.model.rebuild), and evaluation kept apart from training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from coalora.model import rebuild
from coalora.model.adapter import read_adapter, save_adapter
from coalora.model.rebuild import BACKENDS, Recipe
from test_coa import LORA, ids, one_thread, perturb, random_config, tiny_model  # noqa: F401 (one_thread: autouse)
from coalora.space import quantized_layers

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _trained(recipe: Recipe, tmp_path):
    """A model built and started from ``recipe``, its adapter moved away from the start, saved to a file."""
    base = tiny_model()
    layers = quantized_layers(base, TARGETS)
    model = rebuild.build(recipe, base, layers, LORA)
    rebuild.start(model, recipe)
    perturb(model, theta=0.05 if recipe.confignet else 0.0)
    save_adapter(model, tmp_path / "adapter.safetensors")
    return model, layers


@pytest.mark.parametrize("recipe", [Recipe("coa", True, "random", 3), Recipe("coa", False, "svd", 3)],
                         ids=["coalora", "lqlora"])
def test_a_rebuilt_model_computes_what_the_trained_one_computes(recipe, tmp_path):
    """Built from the recipe train.json records and the adapter file: the same logits under a config, also for
    LQ-LoRA, whose quantized base is the residual of the seeded SVD init (rebuilt, not stored)."""
    trained, layers = _trained(recipe, tmp_path)
    config = random_config(layers, seed=2)
    trained.set_config(config)
    tensors, _ = read_adapter(tmp_path / "adapter.safetensors")
    record = {"backend": recipe.backend, "confignet": recipe.confignet, "init": recipe.init, "seed": recipe.seed}
    model = rebuild.rebuild(Recipe.from_record(record), tiny_model(), layers, LORA, tensors)
    served = rebuild.serve(model, Recipe.from_record(record), config)
    with torch.no_grad():
        torch.testing.assert_close(served(ids()).logits, trained(ids()).logits, rtol=1e-4, atol=1e-5)
    if recipe.init == "svd":  # without the residual base the rebuilt model would quantize W, not W − B₀A₀
        plain = rebuild.rebuild(Recipe("coa", False, "random", 3), tiny_model(), layers, LORA, tensors)
        with torch.no_grad():
            assert not torch.allclose(rebuild.serve(plain, recipe, config)(ids()).logits, trained(ids()).logits)


def test_the_quantized_base_recipe_is_the_quantized_base_exactly():
    base = tiny_model()
    layers = quantized_layers(base, TARGETS)
    config = random_config(layers, seed=5)
    model = rebuild.serve(rebuild.rebuild(Recipe.quantized_base(0), base, layers, LORA, {}),
                          Recipe.quantized_base(0), config)
    from coalora.quant import fake_quantize

    for name in layers:
        w = tiny_model().get_submodule(name).weight.detach()
        assert torch.equal(model.get_submodule(name).weight, fake_quantize(w.float(), config[name]).to(w.dtype))


def test_backends_are_rows_of_one_table_and_an_unknown_one_is_named():
    assert set(BACKENDS) == {"coa", "bnb"}
    from coalora.train.methods import METHODS

    assert {m.backend for m in METHODS.values()} <= set(BACKENDS)
    with pytest.raises(ValueError, match="unknown backend 'gguf'; known: coa, bnb"):
        rebuild.build(Recipe("gguf", False, "random", 0), tiny_model(), {}, LORA)


def test_a_tensor_that_does_not_fit_is_refused(tmp_path):
    recipe = Recipe("coa", True, "random", 0)
    _, layers = _trained(recipe, tmp_path)
    tensors, _ = read_adapter(tmp_path / "adapter.safetensors")
    tensors.pop(next(iter(tensors)))
    with pytest.raises(ValueError, match="missing"):
        rebuild.rebuild(recipe, tiny_model(), layers, LORA, tensors)


def test_evaluation_does_not_load_the_training_package():
    """Importing coalora.evaluate and every module of it (in a fresh interpreter) loads no coalora.train module."""
    code = ("import importlib, pkgutil, sys, coalora.evaluate as e\n"
            "for m in pkgutil.iter_modules(e.__path__): importlib.import_module(f'coalora.evaluate.{m.name}')\n"
            "import coalora.stages.evaluate, coalora.stages.report, coalora.model.rebuild, coalora.adapt\n"
            "print(sorted(n for n in sys.modules if n == 'coalora.train' or n.startswith('coalora.train.')))\n"
            "print(len([n for n in sys.modules if n.startswith('coalora.evaluate.')]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split("\n")
    assert out[0] == "[]"
    assert int(out[1]) >= 10  # the modules were imported (a test that imported nothing could not fail)
