"""The adapter file: its writer and reader, its header, and its split into A, B and θ.

    adapter.safetensors   the trained adapter's tensors (``CoAModel.adapter_state_dict()``: ``<layer>.lora_A``
                          (r, in), ``<layer>.lora_B`` (out, r), ``confignet.<name>``; peft's keys for the
                          bitsandbytes backend) and, under the one metadata key ``coalora.adapter``, a JSON
                          header: LoRA settings (rank, alpha, dropout), the compute dtype of W̃, θ's settings
                          and vocabularies, the layers in model order (name → [out, in]); the train stage adds
                          the method and the config ids, the bitsandbytes backend ``format: peft`` and its
                          quantizer.

This module is the one place that writes and reads the file's content: the train stage writes it, evaluation
and ``coalora adapt`` read it. Its name and place in the train stage's output (``<method>/adapter.safetensors``
for a joint method, ``<method>/<config id>/adapter.safetensors`` for a per-config one) are
``coalora.trained.adapter_file``, beside the stage's other files (so that reading the train stage's small
JSON files does not load the model package).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from coalora.model.coa import CONFIGNET, LORA_A, LORA_B
from coalora.model.confignet import ConfigNet, vocabulary

if TYPE_CHECKING:  # pragma: no cover
    from coalora.model.coa import CoAModel

ADAPTER_META = "coalora.adapter"  # safetensors metadata key of the adapter file's JSON header


def coa_header(coa: "CoAModel") -> dict[str, Any]:
    """What a reader needs beside a CoAModel's tensors: LoRA settings, θ vocabularies, the layers in model order."""
    net = coa.confignet
    return {
        "rank": coa.lora.rank, "alpha": coa.lora.alpha, "dropout": coa.lora.dropout,
        "dtype": str(coa.layers[coa.layer_names[0]].weight.dtype).removeprefix("torch."),  # compute dtype of W̃
        "use_confignet": net is not None,
        "confignet": coa.lora.confignet.model_dump() if net is not None else None,
        "n_blocks": net.n_blocks if net is not None else None,
        "matrix_types": net.matrix_types if net is not None else None,
        "layers": {n: list(coa.shapes[n]) for n in coa.layer_names},
    }


def write_adapter(path: Path | str, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """The adapter file: ``tensors`` as safetensors with ``header`` (JSON-able) under ``coalora.adapter``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key only, its JSON with sorted keys: safetensors writes metadata in hash-map order, so two
    # keys give run-dependent bytes, and the stage's output digest (its downstream cache keys) would change.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={ADAPTER_META: json.dumps(header, sort_keys=True)})


def save_adapter(coa: "CoAModel", path: Path | str, **extra: Any) -> None:
    """A CoAModel's adapter file: ``adapter_state_dict()`` with :func:`coa_header` plus ``extra`` (JSON-able)."""
    write_adapter(path, coa.adapter_state_dict(), {**coa_header(coa), **extra})


def read_adapter(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header) of an adapter file; the header is ``{}`` when the file has none of ours.

    Raises:
        ValueError: the file is not a readable safetensors file or its header is not JSON.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        header = json.loads(meta[ADAPTER_META]) if ADAPTER_META in meta else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its {ADAPTER_META} header is not JSON ({exc})") from None
    return tensors, header


# ---------------------------------------------------------------------------------------------------------
# A, B and θ, without a model
# ---------------------------------------------------------------------------------------------------------

@dataclass
class TrainedAdapter:
    """A CoA-LoRA adapter file in memory, split into its factors.

    Attributes:
        layers: name → (out, in), in model order when the file's header records it.
        a, b: name → A (r, in), B (out, r).
        confignet: θ, or None for a plain-LoRA adapter.
        rank, alpha, dropout: the LoRA settings it was trained with.
        header: the file's JSON header.
    """

    layers: dict[str, tuple[int, int]]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    confignet: ConfigNet | None
    rank: int
    alpha: float
    dropout: float
    header: dict[str, Any] = field(default_factory=dict)


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
