"""``coalora adapt``: a deployable model for a new memory budget or configuration, on the fly (DESIGN.md).

From the project's artifacts — the base model (``artifacts/base_model``), the cost table
(``artifacts/calibrate``, budget mode only) and the trained adapter + θ
(``artifacts/train/coalora/adapter.safetensors``: placed by ``coalora.trained``, read and split into A, B
and θ by ``coalora.model.adapter``; no model is built) — it

    1. allocate   solves the budget's integer program on the recorded cost table (or reads a config file);
    2. quantize   quantizes each target weight ONCE into packed storage;
    3. fold       evaluates θ once per layer (one batched call) and folds U into the adapter: B' = B·U;
    4. write      ``OUT/model`` and ``OUT/adapter`` (a peft LoRA adapter), atomically.

``OUT/model`` is, by default, a **packed** model folder (``coalora.deploy.folder``): each target layer's weight
is replaced by its packed storage, config.json names the quantization method "coalora" with the config id,
average bits, per-layer specs and the digests of the weight files, and after ``import coalora``
``AutoModelForCausalLM.from_pretrained`` builds it with ``PackedLinear`` layers that dequantize on the fly: it
holds the bits the budget pays for. ``dense=True`` (``--dense``) writes the dense folder instead, for tools that
cannot import coalora: W̃ in the model's dtype plus coalora's config and packed record. The folding and the
folder's files are ``coalora.model.export``.

Only what is needed is loaded: the target weights are read straight from the base model's safetensors files
(no transformers import, no model construction), and the output model folder is the base folder's files with
the target weights replaced. A base model without safetensors files takes the slow path through
``transformers`` (:func:`coalora.model.load_base`) and a temporary dense copy in the safetensors layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coalora.allocate import solve_budget
from coalora.artifacts import ARTIFACTS, atomic_folder, verify_manifest, write_json
from coalora.calibrate.cost_table import CostTable
from coalora.errors import UserError
from coalora.model.adapter import TrainedAdapter, parse_adapter, read_adapter
from coalora.model.export import (CONFIG_FILE, INDEX, dense_weights, fold_config, peft_config, quantize_weights,
                                  read_weights, weight_shards, write_model_files, write_model_from,
                                  write_peft_adapter, write_quantization_record)
from coalora.quant import QuantizedTensor
from coalora.trained import adapter_file

RECORD = "adapt.json"  # marks a folder as an adapt output (so a later run may replace it)
METHOD = "coalora"     # the method whose adapter is adapted: the one adapter (+ θ) serving every config


@dataclass
class Timer:
    """Named wall-clock splits, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def rounded(self) -> dict[str, float]:
        return {**{k: round(v, 4) for k, v in self.seconds.items()}, "total": round(sum(self.seconds.values()), 4)}


# ---------------------------------------------------------------------------------------------------------
# Reading the artifacts
# ---------------------------------------------------------------------------------------------------------

def stage_folder(root: Path, stage: str) -> Path:
    """``artifacts/<stage>``, verified against its manifest; UserError saying which stage to run."""
    folder = Path(root) / ARTIFACTS / stage
    problem = verify_manifest(folder)
    if problem:
        raise UserError(f"adapt needs the output of stage {stage}: {problem}; run `coalora stage {stage}` first")
    return folder


def compute_dtype(header: dict[str, Any], default: str) -> torch.dtype:
    """The dtype W̃ was used in during training (the adapter header's ``dtype``), else ``model.dtype``."""
    name = header.get("dtype", default)
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"adapt: the adapter header's dtype {name!r} is not one of float32, bfloat16, float16")
    return getattr(torch, name)


def load_trained_adapter(train_dir: Path, alpha: float, dropout: float) -> TrainedAdapter:
    """The train stage's coalora adapter, split into A, B and θ."""
    path = Path(train_dir) / adapter_file(METHOD)
    if not path.is_file():
        raise UserError(f"adapt: {path} not found (the train stage wrote no CoA-LoRA adapter); "
                        f"run `coalora stage train` first")
    try:
        return parse_adapter(*read_adapter(path), alpha=alpha, dropout=dropout)
    except ValueError as exc:
        raise UserError(f"adapt: {path}: {exc}; run `coalora stage train` again") from None


def budget_config(root: Path, budget: float, adapter: TrainedAdapter):
    """The cheapest config within ``budget`` bits on the calibrate stage's recorded cost table."""
    from coalora.errors import ArtifactError
    from coalora.space import SPEC_INDEX, Config

    try:
        table = CostTable.load(stage_folder(root, "calibrate"))
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"adapt: the calibrate stage's cost table is unreadable ({exc}); "
                            f"run `coalora stage calibrate` again") from None
    if dict(table.layers) != adapter.layers:
        raise UserError("adapt: the cost table (calibrate) and the trained adapter (train) are for different "
                        "layers; run `coalora stage train` again after `coalora stage calibrate`")
    cost, bpp, numel = table.selected.numpy(), table.bits_per_param.numpy(), table.numel.numpy()
    idx, objective = solve_budget(cost, bpp, numel, float(budget))
    indices = [SPEC_INDEX[table.specs[int(c)]] for c in idx]
    return Config.from_indices(indices, table.layers, budget=float(budget), source="milp", cost=objective,
                               weighting=table.weighting)


def file_config(path: Path, adapter: TrainedAdapter):
    """A config file (``Config.to_dict`` JSON, or hand-written) validated against the adapter's layers."""
    from coalora.space import Config

    return Config.load(path, adapter.layers)


# ---------------------------------------------------------------------------------------------------------
# The base model's files
# ---------------------------------------------------------------------------------------------------------

def base_folder(base_dir: Path) -> Path | None:
    """The local folder holding the base model's safetensors, or None (then the slow path loads the model).

    ``builtin`` models live in the base stage's folder; local folders are used in place; hub models are
    looked up in the local Hugging Face cache (never downloaded).
    """
    from coalora.model.load import base_reference

    ref = base_reference(base_dir)
    if ref["source"] == "builtin":
        folder = Path(base_dir) / ref["path"]
    elif ref["source"] == "local" or Path(ref["path"]).expanduser().is_dir():
        folder = Path(ref["path"]).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref["path"], "config.json", revision=ref.get("revision"))
        folder = Path(found).parent if isinstance(found, str) else None
    if folder is None or not ((folder / "model.safetensors").is_file() or (folder / INDEX).is_file()):
        return None
    return folder


# ---------------------------------------------------------------------------------------------------------
# adapt
# ---------------------------------------------------------------------------------------------------------

def check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier adapt output (it might be anything)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORD).is_file())):
        raise UserError(f"--out: {out} exists and is not an earlier `coalora adapt` output; choose a new "
                        f"folder or remove it")


def adapt(root: Path | str, params, out: Path | str, budget: float | None = None,
          config_path: Path | str | None = None, dense: bool = False) -> dict[str, Any]:
    """Build ``out/model`` and ``out/adapter`` for a budget or a config file (module docstring).

    Args:
        root: the project folder (``artifacts/`` below it).
        params: the validated Params (``model.dtype`` and ``lora`` when the adapter header lacks the dtype /
            LoRA settings it was trained with).
        out: the output folder; written atomically; an earlier adapt output there is replaced.
        budget: average bits over the quantized layers; exactly one of ``budget`` / ``config_path``.
        config_path: a config JSON file.
        dense: write the dense model folder (W̃) instead of the packed one.

    Returns:
        The summary also written to ``out/adapt.json`` (config id, bits, timings in seconds, paths).

    Raises:
        UserError: both or neither of budget/config, an infeasible budget, a config for other layers,
            missing or corrupt artifacts, an ``out`` that is not an adapt output.
    """
    if (budget is None) == (config_path is None):
        raise UserError("adapt: give exactly one of --budget BITS or --config FILE")
    root, out = Path(root), Path(out)
    check_out(out)
    timer = Timer()
    base_dir, train_dir = stage_folder(root, "base_model"), stage_folder(root, "train")
    adapter = load_trained_adapter(train_dir, params.lora.alpha, params.lora.dropout)
    dtype = compute_dtype(adapter.header, params.model.dtype)
    timer.lap("load")
    config = budget_config(root, budget, adapter) if budget is not None else file_config(Path(config_path), adapter)
    timer.lap("allocate")
    source = _Base(base_dir, list(config), dtype)
    timer.lap("load")
    packed = quantize_weights(source.weights, config)
    del source.weights  # the packed storage is all that is kept from here on
    timer.lap("quantize")
    folded = fold_config(adapter, config)
    timer.lap("fold")
    summary = _summary(config, adapter, packed, out, dense)
    with atomic_folder(out) as tmp:
        write_model(source, tmp / "model", packed, config, dtype, dense)
        lora = peft_config(list(config), adapter.rank, adapter.alpha, adapter.dropout, summary["model"])
        write_peft_adapter(folded, lora, tmp / "adapter")
        timer.lap("write")
        write_json(tmp / RECORD, {**summary, "seconds": timer.rounded(), "base_path": source.path})
    timer.lap("write")  # the returned (printed) figure adds the commit: manifest digest + rename
    return {**summary, "seconds": timer.rounded(), "base_path": source.path}


def write_model(source: "_Base", out: Path, packed: dict[str, QuantizedTensor], config, dtype: torch.dtype,
                dense: bool) -> None:
    """``out``: the packed model folder (``coalora.deploy.folder``), or with ``dense`` the dense one (each W̃
    dequantized from the packed storage, so bitwise ``fake_quantize``, plus coalora's config and packed record)."""
    from coalora.quant.linear import packed_buffers

    if dense:
        source.write(out, dense_weights(packed, dtype))
        write_quantization_record(out, packed, config)
        return
    from coalora.deploy.folder import record_packed_model

    source.write(out, {name: packed_buffers(qt) for name, qt in packed.items()})
    config.save(out / CONFIG_FILE)
    record_packed_model(out, config)


class _Base:
    """The base model's target weights, and how to write the quantized model folder from it."""

    def __init__(self, base_dir: Path, names: list[str], dtype: torch.dtype):
        self.base_dir, self.dtype, self.model = base_dir, dtype, None
        self.folder = base_folder(base_dir)
        if self.folder is not None:
            self.shards = weight_shards(self.folder)
            try:
                self.weights = read_weights(self.folder, self.shards, names, dtype)
                self.path = "safetensors"
                return
            except KeyError:  # names stored differently in the checkpoint: let transformers map them
                pass
        self._load_model(names)

    def _load_model(self, names: list[str]) -> None:
        from coalora.model.load import load_base

        self.model, self.tokenizer = load_base(self.base_dir, str(self.dtype).removeprefix("torch."))
        modules = dict(self.model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserError(f"adapt: the trained adapter's layers {missing[:4]} are not in the base model; "
                            f"run `coalora stage train` again")
        self.weights = {n: modules[n].weight.detach() for n in names}
        self.path = "transformers"

    def write(self, out: Path, replaced: dict[str, dict[str, torch.Tensor]]) -> None:
        """The model folder with each target ``<layer>.weight`` replaced (``write_model_files``)."""
        if self.model is None:
            write_model_files(self.folder, out, self.shards, replaced, self.dtype)
            return
        write_model_from(self.model, self.tokenizer, out, replaced, self.dtype)


def _summary(config, adapter: TrainedAdapter, packed, out: Path, dense: bool) -> dict[str, Any]:
    packed_bytes = sum(qt.nbytes for qt in packed.values())
    return {
        "format": "dense" if dense else "packed",
        "config_id": config.id, "bits": config.bits, "exact_bits": config.exact_bits,
        "budget": config.meta.get("budget"), "source": config.meta.get("source"), "layers": len(config),
        "packed_bytes": packed_bytes, "rank": adapter.rank, "alpha": adapter.alpha,
        "confignet": adapter.confignet is not None,
        "model": str((out / "model").resolve()), "adapter": str((out / "adapter").resolve()),
    }
