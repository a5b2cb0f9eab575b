"""``coalora adapt``: a deployable model for a new memory budget or configuration, on the fly (DESIGN.md).

From the project's artifacts — the base model (``artifacts/base_model``), the cost table
(``artifacts/calibrate``, budget mode only) and the trained adapter + θ
(``artifacts/train/coalora/adapter.safetensors``) — it

    1. allocate   solves the budget's integer program on the recorded cost table (or reads a config file);
    2. quantize   quantizes each target weight ONCE into packed storage;
    3. fold       evaluates θ once per layer (one batched call) and folds U into the adapter: B' = B·U;
    4. write      ``OUT/model`` and ``OUT/adapter`` (a peft LoRA adapter), atomically.

``OUT/model`` is, by default, a **packed** model folder (``coalora.deploy.folder``): each target layer's weight
is replaced by its packed storage, config.json names the quantization method "coalora" with the config id,
average bits, per-layer specs and the digests of the weight files, and after ``import coalora``
``AutoModelForCausalLM.from_pretrained`` builds it with ``PackedLinear`` layers that dequantize on the fly: it
holds the bits the budget pays for. ``dense=True`` (``--dense``) writes the dense folder instead, for tools that
cannot import coalora: W̃ in the model's dtype plus coalora's config and packed record
(``coalora.model.export``).

Only what is needed is loaded: the target weights are read straight from the base model's safetensors files
(no transformers import, no model construction), and the output model folder is the base folder's files with
the target weights replaced. A base model without safetensors files takes the slow path through
``transformers`` (:func:`coalora.model.load_base`) and a temporary dense copy in the safetensors layout.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coalora.allocate import solve_budget
from coalora.artifacts import atomic_folder, read_json, verify_manifest, write_json
from coalora.calibrate import CostTable
from coalora.errors import UserError
from coalora.model.coa import CONFIGNET, LORA_A, LORA_B, read_adapter, serial_below
from coalora.model.confignet import ConfigNet, block_index, vocabulary
from coalora.model.export import (CONFIG_FILE, confignet_u, fold_factors, peft_config, quantize_weights,
                                  write_peft_adapter, write_quantization_record)
from coalora.quant import QuantizedTensor

ARTIFACTS = "artifacts"
ADAPTER_FILE = Path("coalora") / "adapter.safetensors"  # inside the train stage's output
RECORD = "adapt.json"  # marks a folder as an adapt output (so a later run may replace it)
STAGE_OF = {"base_model": "base_model", "calibrate": "calibrate", "train": "train"}


@dataclass
class TrainedAdapter:
    """The train stage's adapter in memory.

    Attributes:
        layers: name → (out, in), in model order when the file's header records it.
        a, b: name → A (r, in), B (out, r).
        confignet: θ, or None for a plain-LoRA adapter.
        rank, alpha, dropout: the LoRA settings it was trained with.
    """

    layers: dict[str, tuple[int, int]]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    confignet: ConfigNet | None
    rank: int
    alpha: float
    dropout: float
    header: dict[str, Any] = field(default_factory=dict)


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


def _natural(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def parse_adapter(tensors: dict[str, torch.Tensor], header: dict[str, Any], alpha: float,
                  dropout: float) -> TrainedAdapter:
    """Split an adapter file's tensors into A, B and θ; ``alpha``/``dropout`` are used when the header lacks them.

    Raises:
        ValueError: the tensors are not a CoA-LoRA adapter (stray keys, unpaired factors, mixed ranks).
    """
    a = {k[: -len(LORA_A) - 1]: v for k, v in tensors.items() if k.endswith(f".{LORA_A}")}
    b = {k[: -len(LORA_B) - 1]: v for k, v in tensors.items() if k.endswith(f".{LORA_B}")}
    theta = {k[len(CONFIGNET) + 1:]: v for k, v in tensors.items() if k.startswith(f"{CONFIGNET}.")}
    stray = sorted(set(tensors) - {f"{n}.{LORA_A}" for n in a} - {f"{n}.{LORA_B}" for n in b}
                   - {f"{CONFIGNET}.{k}" for k in theta})
    if not a or set(a) != set(b) or stray:
        raise ValueError(f"not a CoA-LoRA adapter: {len(a)} lora_A / {len(b)} lora_B tensors, "
                         f"unexpected {stray[:4]}")
    ranks = {int(t.shape[0]) for t in a.values()} | {int(t.shape[1]) for t in b.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter factors have mixed ranks {sorted(ranks)}")
    shapes = {n: (int(b[n].shape[0]), int(a[n].shape[1])) for n in a}
    recorded = header.get("layers")
    order = list(recorded) if isinstance(recorded, dict) and set(recorded) == set(a) else sorted(a, key=_natural)
    rank = ranks.pop()
    net = ConfigNet.from_state_dict(theta, rank, *vocabulary(order)) if theta else None
    return TrainedAdapter({n: shapes[n] for n in order}, a, b, net, rank, float(header.get("alpha", alpha)),
                          float(header.get("dropout", dropout)), header)


def compute_dtype(header: dict[str, Any], default: str) -> torch.dtype:
    """The dtype W̃ was used in during training (the adapter header's ``dtype``), else ``model.dtype``."""
    name = header.get("dtype", default)
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"adapt: the adapter header's dtype {name!r} is not one of float32, bfloat16, float16")
    return getattr(torch, name)


def load_trained_adapter(train_dir: Path, alpha: float, dropout: float) -> TrainedAdapter:
    path = Path(train_dir) / ADAPTER_FILE
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

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
INDEX = "model.safetensors.index.json"


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
        replaced = {}
        for name, qt in packed.items():
            with serial_below(qt.numel):
                replaced[name] = {"weight": qt.dequantize(dtype)}
        source.write(out, replaced)
        write_quantization_record(out, packed, config)
        return
    from coalora.deploy.folder import record_packed_model

    source.write(out, {name: packed_buffers(qt) for name, qt in packed.items()})
    config.save(out / CONFIG_FILE)
    record_packed_model(out, config)


def fold_config(adapter: TrainedAdapter, config) -> dict[str, torch.Tensor]:
    """The peft tensors for ``config``: θ evaluated once per layer (ONE batched call), B' = B·U."""
    names = list(config)
    with serial_below(sum(b.numel() for b in adapter.b.values())):  # tiny ops on small models
        block_ids = torch.tensor([block_index(n) for n in names], dtype=torch.int64)
        type_ids = adapter.confignet.type_index(names) if adapter.confignet is not None else block_ids
        u = confignet_u(adapter.confignet, config, names, block_ids, type_ids)  # (L, r, r) or None
        return fold_factors(adapter.a, adapter.b, u, names)


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
        import shutil

        # No safetensors to start from: save the loaded model in that layout first, then write from it.
        staging = out.parent / f".{out.name}-base"
        self.model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        try:
            write_model_files(staging, out, weight_shards(staging), replaced, self.dtype)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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
