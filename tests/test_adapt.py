"""``coalora adapt`` end to end on a tiny fake project, and every bad input it must refuse (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from coalora.artifacts import atomic_folder, write_json
from coalora.calibrate.cost_table import CostTable
from coalora.cli import main
from coalora.model.adapter import save_adapter
from coalora.model.coa import CoAModel
from coalora.model.export import CONFIG_FILE, PACKED_FILE, read_packed
from coalora.quant import all_specs
from coalora.space import Config, quantized_layers
from test_coa import LORA, TARGETS, one_thread, perturb, random_config, tiny_model  # noqa: F401 (fixture)

TEXTS = [f"Zorp {i} is red and eats honey; Mip {i % 7} is blue and eats berries." for i in range(40)]


def synthetic_costs(layers: dict, specs) -> torch.Tensor:
    """A cost table shaped like real ones: error falls ~4× per extra bit, scaled by the layer's size."""
    bpp = torch.tensor([s.bits_per_param for s in specs], dtype=torch.float64)  # (C,)
    numel = torch.tensor([o * i for o, i in layers.values()], dtype=torch.float64)  # (L,)
    wiggle = torch.rand(len(layers), len(specs), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return numel[:, None] * torch.pow(4.0, -bpp)[None, :] * (1 + 0.1 * wiggle)


def make_project(root: Path, repo_root: Path, make_model=None) -> dict:
    """artifacts/{base_model,calibrate,train} in the stage layouts, each with its manifest.

    ``make_model(tokenizer)`` builds the base model (default: ``tiny_model``).
    """
    from coalora.model import train_tokenizer

    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    tokenizer = train_tokenizer(TEXTS, 300)
    model = (make_model or (lambda tok: tiny_model(seed=0, vocab=len(tok))))(tokenizer)
    layers = quantized_layers(model, TARGETS)
    with atomic_folder(root / "artifacts" / "base_model") as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        write_json(tmp / "base.json", {"source": "builtin", "path": "model", "revision": None})
    with atomic_folder(root / "artifacts" / "calibrate") as tmp:
        specs = all_specs()
        CostTable(layers, specs, {"cost_squared": synthetic_costs(layers, specs)}, "squared", 0).save(tmp)
    coa = CoAModel(model, layers, LORA)
    perturb(coa, theta=0.05)
    with atomic_folder(root / "artifacts" / "train") as tmp:
        (tmp / "coalora").mkdir()
        save_adapter(coa, tmp / "coalora" / "adapter.safetensors", step=100)
    return {"layers": layers, "adapter": coa.adapter_state_dict(), "vocab": len(tokenizer)}


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("project")
    return root, make_project(root, repo_root)


@pytest.fixture(autouse=True)
def no_profile(monkeypatch):
    monkeypatch.delenv("COALORA_PROFILE", raising=False)


def clone(project_root: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(project_root, dest, ignore=lambda folder, names: [n for n in names if n in drop])
    return dest


def coa_logits(root: Path, info: dict, config: Config, tokens: torch.Tensor) -> torch.Tensor:
    """What the trained CoAModel computes under ``config`` (the reference for the exported folders)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "artifacts" / "base_model" / "model")
    coa = CoAModel(model, info["layers"], LORA).eval()
    coa.load_adapter_state_dict(info["adapter"])
    coa.set_config(config)
    with torch.no_grad():
        return coa(tokens).logits


def exported_logits(out: Path, tokens: torch.Tensor, adapter: bool = True) -> torch.Tensor:
    """ONE from_pretrained for the quantized model (packed or dense), then peft's loader for the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    with torch.no_grad():
        model = PeftModel.from_pretrained(model, out / "adapter") if adapter else model
        return model.eval()(tokens).logits


def adapt(root: Path, *args: str) -> int:
    return main(["--root", str(root), "adapt", *args])


# ---------------------------------------------------------------------------------------------------------
# The happy paths
# ---------------------------------------------------------------------------------------------------------

def test_adapt_for_a_budget_builds_a_model_and_adapter_equal_to_the_coa_model(project, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from coalora.quant import fake_quantize
    from coalora.quant.linear import PackedLinear

    root, info = project
    out = tmp_path / "deploy"
    assert adapt(root, "--budget", "3.25", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    config = Config.load(out / "model" / CONFIG_FILE, info["layers"])
    assert config.bits <= 3.25 and config.meta["budget"] == 3.25 and config.meta["source"] == "milp"
    assert f"{config.bits:.4f} bits" in printed and "packed" in printed
    for split in ("allocate", "quantize", "fold", "write"):
        assert f"{split} " in printed
    record = json.loads((out / "adapt.json").read_text())
    assert record["config_id"] == config.id and record["base_path"] == "safetensors" and record["format"] == "packed"
    assert set(record["seconds"]) == {"load", "allocate", "quantize", "fold", "write", "total"}

    tokens = torch.randint(0, info["vocab"], (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exported_logits(out, tokens), coa_logits(root, info, config, tokens),
                               rtol=1e-4, atol=1e-5)
    # The packed layers hold exactly fake_quantize(W) of the base weights, in the spec the config names.
    base = AutoModelForCausalLM.from_pretrained(root / "artifacts" / "base_model" / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    for name in info["layers"]:
        layer = model.get_submodule(name)
        assert isinstance(layer, PackedLinear) and layer.spec == config[name]
        assert torch.equal(layer.dequantize(), fake_quantize(base.get_submodule(name).weight.detach(), config[name]))
    assert (out / "model" / "tokenizer.json").is_file() and not (out / "model" / PACKED_FILE).exists()


def test_dense_writes_the_dequantized_weights_and_the_packed_record(project, tmp_path, capsys):
    root, info = project
    out = tmp_path / "dense"
    assert adapt(root, "--budget", "3.25", "--out", str(out), "--dense") == 0
    assert "dense" in capsys.readouterr().out
    assert json.loads((out / "adapt.json").read_text())["format"] == "dense"
    assert "quantization_config" not in json.loads((out / "model" / "config.json").read_text())
    config = Config.load(out / "model" / CONFIG_FILE, info["layers"])
    packed, config_id = read_packed(out / "model" / PACKED_FILE)
    from safetensors.torch import load_file

    dense = load_file(str(out / "model" / "model.safetensors"))
    assert config_id == config.id
    assert all(torch.equal(packed[n].dequantize(), dense[f"{n}.weight"]) for n in info["layers"])
    tokens = torch.randint(0, info["vocab"], (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exported_logits(out, tokens), coa_logits(root, info, config, tokens),
                               rtol=1e-4, atol=1e-5)


def test_adapt_for_a_config_file_needs_no_cost_table_and_replaces_its_earlier_output(project, tmp_path):
    root, info = project
    bare = clone(root, tmp_path / "bare", drop=("calibrate",))
    config = random_config(info["layers"], seed=3)
    config.save(tmp_path / "config.json")
    out = tmp_path / "deploy"
    assert adapt(bare, "--config", str(tmp_path / "config.json"), "--out", str(out)) == 0
    assert adapt(bare, "--config", str(tmp_path / "config.json"), "--out", str(out)) == 0  # replaced
    assert Config.load(out / "model" / CONFIG_FILE, info["layers"]).id == config.id
    tokens = torch.randint(0, info["vocab"], (1, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(exported_logits(out, tokens), coa_logits(root, info, config, tokens),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense", [False, True], ids=["packed", "dense"])
def test_the_transformers_path_writes_the_same_model(project, tmp_path, monkeypatch, dense):
    root, info = project
    flag = ("--dense",) if dense else ()
    assert adapt(root, "--budget", "4.5", "--out", str(tmp_path / "fast"), *flag) == 0
    monkeypatch.setattr("coalora.adapt.base_folder", lambda base_dir: None)
    assert adapt(root, "--budget", "4.5", "--out", str(tmp_path / "slow"), *flag) == 0
    assert json.loads((tmp_path / "slow" / "adapt.json").read_text())["base_path"] == "transformers"
    from safetensors.torch import load_file

    fast = load_file(str(tmp_path / "fast" / "model" / "model.safetensors"))
    slow = load_file(str(tmp_path / "slow" / "model" / "model.safetensors"))
    assert set(fast) == set(slow) and all(torch.equal(fast[k], slow[k]) for k in fast)
    assert any(k.endswith(".scale_codes") for k in fast) != dense
    for part in ("adapter/adapter_model.safetensors", *([f"model/{PACKED_FILE}"] if dense else [])):
        assert (tmp_path / "fast" / part).read_bytes() == (tmp_path / "slow" / part).read_bytes()


def test_a_bfloat16_adapter_gives_a_bfloat16_model(project, tmp_path):
    from transformers import AutoModelForCausalLM

    root, info = project
    bare = clone(root, tmp_path / "bare", drop=("train",))
    model = AutoModelForCausalLM.from_pretrained(root / "artifacts" / "base_model" / "model", dtype=torch.bfloat16)
    coa = CoAModel(model, info["layers"], LORA).eval()
    coa.load_adapter_state_dict(info["adapter"])
    with atomic_folder(bare / "artifacts" / "train") as tmp:
        (tmp / "coalora").mkdir()
        save_adapter(coa, tmp / "coalora" / "adapter.safetensors")
    out = tmp_path / "deploy"
    assert adapt(bare, "--budget", "3.5", "--out", str(out)) == 0
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    config = Config.load(out / "model" / CONFIG_FILE, info["layers"])
    coa.set_config(config)
    packed_model = AutoModelForCausalLM.from_pretrained(out / "model")
    name = next(iter(info["layers"]))
    layer = packed_model.get_submodule(name)
    assert layer.compute_dtype == torch.bfloat16 and layer.dequantize().dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), coa.layers[name].weight_q)
    tokens = torch.randint(0, info["vocab"], (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = coa(tokens).logits.float()
    torch.testing.assert_close(exported_logits(out, tokens).float(), want, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------
# Bad input: exit status 2, a message naming the problem, nothing written
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", ["1.0", "9.0", "nan"])
def test_an_infeasible_budget_is_refused(project, tmp_path, capsys, budget):
    root, _ = project
    assert adapt(root, "--budget", budget, "--out", str(tmp_path / "out")) == 2
    assert "budget" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_exactly_one_of_budget_and_config(project, tmp_path, capsys):
    root, info = project
    random_config(info["layers"], seed=0).save(tmp_path / "c.json")
    assert adapt(root, "--budget", "3", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o")) == 2
    assert adapt(root, "--out", str(tmp_path / "o")) == 2
    assert capsys.readouterr().err.count("exactly one of --budget") == 2
    assert not (tmp_path / "o").exists()


def test_a_config_for_another_model_or_a_broken_file_is_refused(project, tmp_path, capsys):
    root, _ = project
    other = quantized_layers(tiny_model(n_layers=3), TARGETS)
    random_config(other, seed=0).save(tmp_path / "other.json")
    assert adapt(root, "--config", str(tmp_path / "other.json"), "--out", str(tmp_path / "o")) == 2
    assert "unknown layer(s) model.layers.2" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert adapt(root, "--config", str(tmp_path / "broken.json"), "--out", str(tmp_path / "o")) == 2
    assert adapt(root, "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage, args", [("train", ["--budget", "3"]), ("base_model", ["--budget", "3"]),
                                         ("calibrate", ["--budget", "3"])])
def test_missing_artifacts_name_the_stage_to_run(project, tmp_path, capsys, stage, args):
    root, _ = project
    bare = clone(root, tmp_path / "bare", drop=(stage,))
    assert adapt(bare, *args, "--out", str(tmp_path / "o")) == 2
    assert f"coalora stage {stage}" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_train_output_without_the_coalora_adapter_is_refused(project, tmp_path, capsys):
    root, _ = project
    bare = clone(root, tmp_path / "bare")
    shutil.rmtree(bare / "artifacts" / "train")
    with atomic_folder(bare / "artifacts" / "train") as tmp:
        (tmp / "qlora").mkdir()
    assert adapt(bare, "--budget", "3", "--out", str(tmp_path / "o")) == 2
    assert "coalora stage train" in capsys.readouterr().err


def test_a_corrupt_adapter_is_detected_by_digest(project, tmp_path, capsys):
    root, _ = project
    bare = clone(root, tmp_path / "bare")
    path = bare / "artifacts" / "train" / "coalora" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert adapt(bare, "--budget", "3", "--out", str(tmp_path / "o")) == 2
    assert "differ from the manifest" in capsys.readouterr().err


def test_an_unrelated_output_folder_is_never_replaced(project, tmp_path, capsys):
    root, _ = project
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    assert adapt(root, "--budget", "3", "--out", str(precious)) == 2
    assert "--out" in capsys.readouterr().err
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
