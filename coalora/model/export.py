"""Deployment files: θ folded into a standard peft LoRA adapter, and the quantized model folder (METHOD.md §3).

What ``coalora adapt`` writes (its one implementation; ``coalora.deploy.folder`` reads the packed folder).

For a config C, θ gives U_i = θ(C_i, block_i, type_i) once per layer, and

    ΔW_i = (α/r)·B_i·U_i·A_i = (α/r)·B'_i·A_i   with   B'_i = B_i·U_i,

so the adapter (A_i, B'_i) is an ordinary LoRA: peft loads it on the quantized model and computes exactly
what the CoAModel computes under C.

The base model's folder is copied with its target weights replaced (:func:`write_model_files`; from a loaded
model: :func:`write_model_from`). A dense quantized model folder holds two views of the same weights:

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

from coalora.artifacts import read_json, write_json
from coalora.errors import UserError
from coalora.model.confignet import ConfigNet, block_index, spec_field_tensor
from coalora.quant import QuantizedTensor, quantize
from coalora.threads import serial_below

if TYPE_CHECKING:  # pragma: no cover
    from coalora.model.adapter import TrainedAdapter
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


def fold_config(adapter: "TrainedAdapter", config: "Config") -> dict[str, torch.Tensor]:
    """The peft tensors for ``config``: θ evaluated once per layer (ONE batched call), B' = B·U."""
    names = list(config)
    with serial_below(sum(b.numel() for b in adapter.b.values())):  # tiny ops on small models
        block_ids = torch.tensor([block_index(n) for n in names], dtype=torch.int64)
        type_ids = adapter.confignet.type_index(names) if adapter.confignet is not None else block_ids
        u = confignet_u(adapter.confignet, config, names, block_ids, type_ids)  # (L, r, r) or None
        return fold_factors(adapter.a, adapter.b, u, names)


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


def dense_weights(packed: Mapping[str, QuantizedTensor], dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """The dense folder's replacement of each ``<layer>.weight``: W̃ dequantized from the packed storage (so
    bitwise ``fake_quantize``), in ``dtype``."""
    replaced = {}
    for name, qt in packed.items():
        with serial_below(qt.numel):
            replaced[name] = {"weight": qt.dequantize(dtype)}
    return replaced


# ---------------------------------------------------------------------------------------------------------
# The model folder's files
# ---------------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
INDEX = "model.safetensors.index.json"


def weight_shards(folder: Path) -> dict[str, list[str]]:
    """Safetensors file name → the tensor names it holds (one file, or the shards of an index)."""
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        shards: dict[str, list[str]] = {}
        for name, shard in read_json(folder / INDEX)["weight_map"].items():
            shards.setdefault(shard, []).append(name)
        return shards
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {"model.safetensors": list(f.keys())}


def read_weights(folder: Path, shards: dict[str, list[str]], names: list[str],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Just the ``<layer>.weight`` tensors of ``names``, cast to the compute dtype; KeyError when one is missing."""
    from safetensors import safe_open

    where = {t: shard for shard, tensors in shards.items() for t in tensors}
    weights = {}
    for shard in sorted({where[f"{n}.weight"] for n in names}):
        with safe_open(str(folder / shard), framework="pt") as f:
            for n in names:
                if where[f"{n}.weight"] == shard:
                    weights[n] = f.get_tensor(f"{n}.weight").to(dtype)
    return weights


def write_model_files(src: Path, out: Path, shards: dict[str, list[str]],
                      replaced: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """Copy the base folder's non-weight files, and write its safetensors with the target weights replaced.

    ``replaced[layer]`` maps suffixes to the tensors that take the place of ``<layer>.weight``: ``{"weight": W̃}``
    for a dense folder, the packed buffers for a packed one (an index's weight map is rewritten to match).
    Floating tensors are cast to ``dtype`` (the compute dtype the model was trained in; integer buffers are
    kept) and ``config.json`` records it, so ``from_pretrained(out)`` builds exactly the model the adapter was
    trained on.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != INDEX:
            shutil.copyfile(path, out / path.name)  # follows the hub cache's symlinks
    weight_map, found, total = {}, set(), 0
    for shard in shards:
        tensors = {}
        for name, t in load_file(str(src / shard)).items():
            layer = name.removesuffix(".weight")
            parts = replaced.get(layer, {"weight": t}) if name.endswith(".weight") else {None: t}
            found.add(layer if layer in replaced and name.endswith(".weight") else None)
            for suffix, tensor in parts.items():
                key = name if suffix is None else f"{layer}.{suffix}"
                tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                weight_map[key] = shard
                total += tensors[key].nbytes
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    missing = [name for name in replaced if name not in found]
    if missing:  # never leave a target layer dense (or unloadable) by accident
        raise UserError(f"adapt: the base checkpoint in {src} has no tensor(s) "
                        f"{', '.join(f'{n}.weight' for n in missing[:4])}")
    if (src / INDEX).is_file():
        index = read_json(src / INDEX)
        metadata = {**index.get("metadata", {}), "total_size": total}
        write_json(out / INDEX, {**index, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})
    _record_dtype(out / "config.json", dtype)


def _record_dtype(config_json: Path, dtype: torch.dtype) -> None:
    if not config_json.is_file():
        return
    config = read_json(config_json)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    if any(config.get(k) != name for k in keys):
        write_json(config_json, {**config, **{k: name for k in keys}})


def write_model_from(model, tokenizer, out: Path, replaced: dict[str, dict[str, torch.Tensor]],
                     dtype: torch.dtype) -> None:
    """:func:`write_model_files` for a loaded model (no safetensors folder to start from): the model (and the
    tokenizer, when not None) is saved in that layout first, then written from there."""
    import shutil

    staging = out.parent / f".{out.name}-base"
    model.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    try:
        write_model_files(staging, out, weight_shards(staging), replaced, dtype)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
