"""Deployment: fold θ into a standard peft LoRA adapter, and save the quantized model (METHOD.md §3).

For a config C, θ gives U_i = θ(C_i, block_i, type_i) once per layer, and

    ΔW_i = (α/r)·B_i·U_i·A_i = (α/r)·B'_i·A_i   with   B'_i = B_i·U_i,

so the adapter (A_i, B'_i) is an ordinary LoRA: peft loads it on the quantized model and computes exactly
what the CoAModel computes under C.

A quantized model folder (:func:`save_quantized_model`) holds two views of the same weights:

    config.json, model.safetensors, tokenizer files   an ordinary Hugging Face folder whose target weights
        are the dequantized W̃ (in the model's dtype): ``AutoModelForCausalLM.from_pretrained(folder)`` alone
        computes exactly the quantized model;
    coalora_config.json                               the Config (per-layer specs, bits, id);
    coalora_quantized.safetensors                     the packed storage that is actually paid for: for each
        layer ``<layer>.weight_codes`` / ``.scale_codes`` / ``.scale2`` / ``.offset`` (``coalora.quant``
        QuantizedTensor), and under metadata key ``coalora.quantized`` the JSON ``{"config_id", "layers":
        {layer: QuantizedTensor.header()}}``. :func:`read_packed` rebuilds the tensors; each dequantizes
        bitwise to the W̃ in model.safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from coalora.artifacts import write_json
from coalora.model.coa import serial_below
from coalora.model.confignet import ConfigNet, spec_field_tensor
from coalora.quant import QuantizedTensor, quantize

if TYPE_CHECKING:  # pragma: no cover
    from coalora.model.coa import CoAModel
    from coalora.space import Config

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
CONFIG_FILE, PACKED_FILE, PACKED_META = "coalora_config.json", "coalora_quantized.safetensors", "coalora.quantized"


# ---------------------------------------------------------------------------------------------------------
# Folding θ into a peft adapter
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def confignet_u(net: ConfigNet | None, config: "Config", names: Sequence[str], block_ids: torch.Tensor,
                type_ids: torch.Tensor) -> torch.Tensor | None:
    """θ evaluated once for each of the L layers under ``config``: (L, r, r), or None without θ."""
    if net is None:
        return None
    fields = spec_field_tensor([config[n] for n in names]).to(block_ids.device)  # (L, 5)
    return net(fields, block_ids, type_ids)


@torch.no_grad()
def fold_factors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], u: torch.Tensor | None,
                 names: Sequence[str]) -> dict[str, torch.Tensor]:
    """peft tensors of the folded adapter: A_i (r, in) and B'_i = B_i·U_i (out, r), float32 on the CPU.

    Keys are peft's: ``base_model.model.<layer>.lora_A.weight`` / ``.lora_B.weight``.
    """
    tensors = {}
    for i, name in enumerate(names):
        b_i = b[name].to(torch.float32)
        folded = b_i if u is None else b_i @ u[i].to(torch.float32)  # (out, r)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a[name].detach().to("cpu", torch.float32).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = folded.detach().to("cpu").contiguous()
    return tensors


def fold_adapter(coa: "CoAModel", config: "Config") -> dict[str, torch.Tensor]:
    """The peft-format tensors of ``coa``'s adapter under ``config`` (θ evaluated once per layer, B' = B·U).

    Does not switch ``coa``'s configuration (no quantization happens).
    """
    u = confignet_u(coa.confignet, config, coa.layer_names, coa.block_ids, coa.type_ids)
    a = {n: coa.layers[n].lora_A for n in coa.layer_names}
    b = {n: coa.layers[n].lora_B for n in coa.layer_names}
    return fold_factors(a, b, u, coa.layer_names)


def peft_config(names: Sequence[str], rank: int, alpha: float, dropout: float,
                base_name_or_path: str) -> dict[str, Any]:
    """The fields of peft's ``LoraConfig`` for our adapter; ``target_modules`` are the exact layer names.

    Written by hand (not through peft) so that exporting does not import peft (seconds). ``use_rslora`` is
    False, so peft's scaling is α/r, ours.
    """
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name_or_path,
        "revision": None, "inference_mode": True, "r": int(rank), "lora_alpha": float(alpha),
        "lora_dropout": float(dropout), "target_modules": list(names), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_peft_adapter(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], out_dir: Path) -> None:
    """``out_dir/adapter_config.json`` + ``out_dir/adapter_model.safetensors``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(out_dir / ADAPTER_CONFIG, dict(config))


def save_peft_adapter(coa: "CoAModel", config: "Config", out_dir: Path, base_name_or_path: str) -> None:
    """Fold ``coa``'s adapter under ``config`` and write it as a peft LoRA adapter folder.

    Load with ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(quantized_dir), out_dir)``.
    """
    lora = coa.lora
    write_peft_adapter(fold_adapter(coa, config),
                       peft_config(coa.layer_names, lora.rank, lora.alpha, lora.dropout, base_name_or_path), out_dir)


# ---------------------------------------------------------------------------------------------------------
# The quantized model
# ---------------------------------------------------------------------------------------------------------

def quantize_weights(weights: Mapping[str, torch.Tensor], config: "Config") -> dict[str, QuantizedTensor]:
    """Each layer's weight quantized ONCE with its spec into packed storage (``coalora.quant.quantize``).

    ``QuantizedTensor.dequantize()`` of the result equals ``fake_quantize`` bitwise, in the weight's dtype.
    """
    packed = {}
    for name in config:
        with serial_below(weights[name].numel()):
            packed[name] = quantize(weights[name].detach(), config[name])
    return packed


def write_packed(path: Path, packed: Mapping[str, QuantizedTensor], config: "Config") -> None:
    """``coalora_quantized.safetensors``: every layer's packed buffers and headers (module docstring)."""
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v.contiguous() for name, qt in packed.items() for k, v in qt.state_dict().items()}
    header = {"config_id": config.id, "layers": {name: qt.header() for name, qt in packed.items()}}
    # One metadata key only: safetensors writes metadata in hash-map order, so two keys give files that differ
    # byte for byte from run to run (and break content digests).
    save_file(tensors, str(path), metadata={PACKED_META: json.dumps(header)})


def read_packed(path: Path) -> tuple[dict[str, QuantizedTensor], str]:
    """(layer → QuantizedTensor, config id) from :func:`write_packed`'s file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[PACKED_META])
        packed = {name: QuantizedTensor.from_state_dict(
            {k: f.get_tensor(f"{name}.{k}") for k in ("weight_codes", "scale_codes", "scale2", "offset")}, h)
            for name, h in header["layers"].items()}
    return packed, header["config_id"]


def write_quantization_record(out_dir: Path, packed: Mapping[str, QuantizedTensor], config: "Config") -> None:
    """The two coalora files of a quantized model folder: the Config JSON and the packed storage."""
    config.save(Path(out_dir) / CONFIG_FILE)
    write_packed(Path(out_dir) / PACKED_FILE, packed, config)


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without LoRA factors (a CoAModel's inner model carries them)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}


def save_quantized_model(model, config: "Config", out_dir: Path, tokenizer,
                         packed: Mapping[str, QuantizedTensor] | None = None) -> dict[str, QuantizedTensor]:
    """Save the model quantized with ``config`` as a Hugging Face folder plus coalora's record (module doc).

    Args:
        model: a PreTrainedModel (or a CoAModel's ``.model``): its layers' weights W are quantized; the model
            itself is not modified.
        config: the Config; its layers are the model's quantized layers.
        out_dir: the folder to write (created).
        tokenizer: saved beside the model when not None.
        packed: the layers already quantized with ``config`` (:func:`quantize_weights`), so nothing is
            quantized twice; computed here when None.

    Returns:
        layer → QuantizedTensor (the packed storage written).
    """
    out_dir = Path(out_dir)
    state = _plain_state_dict(model)
    if packed is None:
        packed = quantize_weights({n: state[f"{n}.weight"] for n in config}, config)
    for name, qt in packed.items():
        state[f"{name}.weight"] = qt.dequantize(state[f"{name}.weight"].dtype)  # W̃ in the model's dtype
    model.save_pretrained(out_dir, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    write_quantization_record(out_dir, packed, config)
    return dict(packed)
