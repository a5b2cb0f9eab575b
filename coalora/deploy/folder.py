"""The packed model folder: what ``coalora adapt`` writes, and everything checked before one tensor is loaded.

A packed model folder is a Hugging Face model folder whose target layers hold packed storage instead of weights:

    model.safetensors (or shards + index)   every tensor of the base model, except that each target layer's
        ``<layer>.weight`` matrix is replaced by its packed buffers: ``<layer>.weight`` (the uint8 stream of NF
        codes), ``.scale_codes``, ``.scale2``, ``.offset`` (``coalora.quant.linear.buffer_layout``; the float scales
        as int16/int32 bit patterns); biases, embeddings, norms and head as they were, in the compute dtype. A
        transformers without coalora refuses the folder (size mismatch on ``<layer>.weight``) rather than building
        those layers at random.
    config.json   the model's config plus ``quantization_config``, which makes the folder self-describing:

        {"quant_method": "coalora", "format": "coalora.packed-model/1",
         "config_id": "…", "bits": 3.21, "exact_bits": 3.22,           # the Config's id and average bits
         "layers": {"model.layers.0.self_attn.q_proj": "b4-s8-fp32-64-256", …},   # spec of every target layer
         "shapes": {"model.layers.0.self_attn.q_proj": [out, in], …},
         "files": {"model.safetensors": {"bytes": 1234, "sha256": "…"}},  # digest of every weight file
         "meta": {"budget": 3.25, "source": "milp", …}}

    coalora_config.json   the Config itself (``Config.save``), as in the dense folder.

Loading (``coalora.deploy.hf``) runs :func:`check_folder` first — recorded layers and specs consistent with the
config id, every weight file present with its recorded size and sha256, every packed tensor present with the
dtype and shape its spec and shape give, every target layer an ``nn.Linear`` of the recorded shape in the model
being built — and raises ``ArtifactError`` naming the file or layer and what differs, before anything is loaded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coalora.artifacts import read_json, sha256_file, write_json
from coalora.errors import ArtifactError

QUANT_METHOD = "coalora"
FORMAT = "coalora.packed-model/1"
CONFIG_KEYS = ("quant_method", "format", "config_id", "bits", "exact_bits", "layers", "shapes", "files", "meta")
SAFETENSORS_DTYPES = {"uint8": "U8", "int16": "I16", "int32": "I32"}  # torch dtype name → safetensors code


@dataclass(frozen=True)
class PackedLayout:
    """A parsed, validated ``quantization_config``.

    Attributes:
        config: the Config (layer → QuantSpec, shapes, meta); its id equals the recorded one.
        files: weight file name → {"bytes": int, "sha256": str}.
    """

    config: Any  # coalora.space.Config (imported lazily: it imports torch)
    files: dict[str, dict[str, Any]]


def _fail(message: str) -> ArtifactError:
    return ArtifactError(f"packed model: {message}")


def file_record(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of one weight file."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def quantization_config(config, files: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for ``config`` and the digests of the weight files."""
    return {
        "quant_method": QUANT_METHOD, "format": FORMAT, "config_id": config.id, "bits": config.bits,
        "exact_bits": config.exact_bits, "layers": {name: config[name].key for name in config},
        "shapes": {name: list(shape) for name, shape in config.shapes.items()},
        "files": {name: dict(record) for name, record in sorted(files.items())}, "meta": dict(config.meta),
    }


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a model folder: its index's shards, else ``model.safetensors``."""
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(read_json(index)["weight_map"].values()))
    return ["model.safetensors"]


def record_packed_model(folder: Path, config) -> dict[str, Any]:
    """Add ``quantization_config`` (with the digests of the weight files as written) to ``folder/config.json``.

    Call it last: the digests must be those of the final files. Returns the entry written.
    """
    folder = Path(folder)
    entry = quantization_config(config, {name: file_record(folder / name) for name in weight_files(folder)})
    write_json(folder / "config.json", {**read_json(folder / "config.json"), "quantization_config": entry})
    return entry


def parse_layout(qc: Mapping[str, Any]) -> PackedLayout:
    """Validate a ``quantization_config`` mapping; ArtifactError naming the key that is wrong.

    The specs must parse, the shapes cover the same layers, and the recorded ``config_id`` must be the content
    id of the specs (a config.json edited by hand, or from another model, fails here).
    """
    from coalora.errors import UserError
    from coalora.space import Config

    if qc.get("format") != FORMAT:
        raise _fail(f"quantization_config.format is {qc.get('format')!r}; this coalora reads {FORMAT!r}")
    missing = [k for k in CONFIG_KEYS if k not in qc]
    if missing:
        raise _fail(f"quantization_config lacks {missing}; the folder was not written by `coalora adapt`")
    layers, shapes = qc["layers"], qc["shapes"]
    if not isinstance(layers, Mapping) or not isinstance(shapes, Mapping) or set(layers) != set(shapes):
        raise _fail("quantization_config.layers and .shapes must map the same layer names")
    bad = [name for name, s in shapes.items()
           if not (isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s))]
    if bad:
        raise _fail(f"quantization_config.shapes[{bad[0]!r}] must be [out_features, in_features], got {shapes[bad[0]]}")
    try:
        config = Config.from_dict({"layers": dict(layers), "id": qc["config_id"], **dict(qc["meta"])},
                                  {name: tuple(shapes[name]) for name in layers})
    except (UserError, ValueError, TypeError) as exc:
        raise _fail(f"quantization_config: {exc}") from None
    files = qc["files"]
    if not isinstance(files, Mapping) or not files or not all(
            isinstance(r, Mapping) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            for r in files.values()):
        raise _fail("quantization_config.files must map each weight file to {'bytes': int, 'sha256': str}")
    return PackedLayout(config, {name: dict(r) for name, r in files.items()})


def check_files(layout: PackedLayout, paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """Each weight file the loader will read is recorded, present, of its recorded size and sha256.

    Returns the tensors of every file: name → {"dtype": safetensors code, "shape": [...]}, from the headers.
    """
    paths = {Path(p).name: Path(p) for p in paths}
    unrecorded = sorted(set(paths) - set(layout.files))
    if unrecorded:
        raise _fail(f"weight file(s) {unrecorded} are not recorded in config.json (recorded: {sorted(layout.files)})")
    tensors: dict[str, dict[str, Any]] = {}
    for name, record in sorted(layout.files.items()):
        path = paths.get(name)
        if path is None or not path.is_file():
            raise _fail(f"weight file {name} is missing (config.json records it)")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise _fail(f"{path} is {size} bytes, config.json records {record['bytes']}: the file is truncated "
                        f"or was replaced; write the folder again with `coalora adapt`")
        if sha256_file(path) != record["sha256"]:
            raise _fail(f"{path} does not match its sha256 recorded in config.json: the file is corrupt; "
                        f"write the folder again with `coalora adapt`")
        tensors.update(safetensors_header(path))
    return tensors


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """tensor name → {"dtype", "shape"} from a safetensors file's JSON header (no tensor is read)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in header.items() if k != "__metadata__"}


def check_tensors(layout: PackedLayout, tensors: Mapping[str, Mapping[str, Any]]) -> None:
    """Every target layer's packed tensors are present with the dtype and shape of its spec and shape (a dense
    ``<layer>.weight`` matrix left in the checkpoint fails as a wrong dtype and shape)."""
    from coalora.quant.linear import buffer_layout

    for name, spec in layout.config.items():
        shape = layout.config.shapes[name]
        for buf, (dtype, buf_shape) in buffer_layout(spec, shape).items():
            want = {"dtype": SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")], "shape": list(buf_shape)}
            got = tensors.get(f"{name}.{buf}")
            if got is None:
                raise _fail(f"layer {name}: tensor {name}.{buf} is missing from the checkpoint")
            if dict(got) != want:
                raise _fail(f"layer {name}: {name}.{buf} is {got['dtype']} {got['shape']}, but spec {spec.key} for "
                            f"a {shape[0]}×{shape[1]} weight stores {want['dtype']} {want['shape']}")


def check_model(layout: PackedLayout, modules: Mapping[str, Any]) -> None:
    """Each target layer is an ``nn.Linear`` of the recorded (out, in) in the model being built."""
    import torch

    for name, (out_f, in_f) in layout.config.shapes.items():
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            found = "not in the model" if module is None else f"a {type(module).__name__}"
            raise _fail(f"layer {name} is {found}; the quantization config is for a different model")
        if (module.out_features, module.in_features) != (out_f, in_f):
            raise _fail(f"layer {name} is {module.out_features}×{module.in_features} in the model but "
                        f"{out_f}×{in_f} in the quantization config: the config is for a different model")


def check_folder(qc: Mapping[str, Any], checkpoint_files: Iterable[Path], modules: Mapping[str, Any]) -> PackedLayout:
    """All checks of a packed folder before loading (module docstring); returns the layout."""
    layout = parse_layout(qc)
    check_model(layout, modules)
    check_tensors(layout, check_files(layout, checkpoint_files))
    return layout
