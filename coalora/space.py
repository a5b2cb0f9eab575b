"""Configurations: which linear layers are quantized, and a spec for each of them (METHOD.md §2).

    quantized_layers   discover the quantized layers of a model (name → (out_features, in_features))
    Config             an immutable mapping layer name → QuantSpec, with bits, id and JSON round trip
    config_from_rules  a hand-written config: one spec for all, or name rules (exact > longest > ``*``)

A config's **bits** is the average storage per parameter over the quantized layers only,

    bits = Σ_i bpp(c_i)·numel_i / Σ_i numel_i,      bpp(c) = b0 + b1/B0 + b2/(B0·B1),

where embeddings, norms and the LM head are NOT counted (they stay in 16 bits). ``exact_bits`` replaces
``bpp·numel`` by the exact storage of each matrix (partial blocks and the fp32 offset included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from coalora.artifacts import content_id, read_json, write_json
from coalora.errors import UserError
from coalora.quant import SPEC_FIELDS, QuantSpec, all_specs, storage_bits

TARGET_FIELD = "quant.target_modules"
RESERVED = ("layers", "bits", "exact_bits", "id")  # keys of to_dict() that are not free metadata
SPEC_INDEX: dict[QuantSpec, int] = {spec: i for i, spec in enumerate(all_specs())}

Layers = Mapping[str, tuple[int, int]]


# ---------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------

def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks: the ``nn.ModuleList`` holding the most parameters.

    Decoder models keep their blocks in one list (``model.layers`` for Llama/Qwen2, ``transformer.h`` for
    GPT-2, ``model.decoder.layers`` for OPT); it holds nearly all the weights, and a list nested inside a
    block (MoE experts) holds fewer than the list of blocks around it, so "most parameters" finds it
    without knowing the architecture.

    Raises:
        UserError: the model has no ModuleList with parameters.
    """
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[0]):
                best = (size, name, module)
    if best is None:
        raise UserError(f"{TARGET_FIELD}: found no transformer blocks (an nn.ModuleList of layers) in "
                        f"{type(model).__name__}; only decoder models with a list of blocks are supported")
    return best[1], best[2]


def matches_target(name: str, entry: str) -> bool:
    """peft's rule for one ``target_modules`` entry: the module name equals it or ends with ``.entry``;
    besides, an entry that is a valid regular expression matches when it full-matches the whole name
    (``r".*\\.(q|v)_proj"``; a plain name such as ``q_proj`` never full-matches a dotted path by accident).
    """
    if name == entry or name.endswith("." + entry):
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def quantized_layers(model: torch.nn.Module, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The quantized layers: every ``nn.Linear`` inside the transformer blocks matching ``target_modules``.

    Only modules inside the list of blocks (:func:`find_blocks`) are considered, so the LM head and the
    embeddings are never quantized, whatever the patterns say. Names are full module names, e.g.
    ``model.layers.7.self_attn.q_proj``; an entry matches as in :func:`matches_target`.

    Args:
        model: a causal LM (any architecture with a ModuleList of blocks).
        target_modules: ``quant.target_modules`` entries.

    Returns:
        name → (out_features, in_features), in model order (``named_modules``).

    Raises:
        UserError: naming ``quant.target_modules`` and the entries that match no linear layer (a typo such as
            ``qq_proj`` would otherwise quietly quantize fewer layers).
    """
    prefix, blocks = find_blocks(model)
    layers: dict[str, tuple[int, int]] = {}
    used: set[str] = set()
    for sub_name, module in blocks.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = f"{prefix}.{sub_name}" if prefix else sub_name
        matched = {entry for entry in target_modules if matches_target(name, entry)}
        if matched:
            used |= matched
            layers[name] = (int(module.out_features), int(module.in_features))
    unmatched = [entry for entry in target_modules if entry not in used]
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in blocks.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"{TARGET_FIELD}: {', '.join(map(repr, unmatched))} "
                        f"match{'es' if len(unmatched) == 1 else ''} no linear layer inside the blocks "
                        f"'{prefix}.N'; linear layers there end in: {', '.join(kinds) or 'none'}")
    return layers


def model_weights(model: torch.nn.Module, layers: Layers) -> dict[str, torch.Tensor]:
    """The weight tensors (out, in) of the named layers, as stored in the model (no copy)."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight for name in layers}


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

def average_bits(bpp: Sequence[float], numel: Sequence[int]) -> float:
    """Σ bpp_i·numel_i / Σ numel_i in float64, summed in layer order.

    The ONE formula for a config's bits: ``Config.bits`` and the allocation's budget check both call it, so
    "bits ≤ budget" means the same thing in both places, to the last bit of the float.
    """
    total = sum(int(n) for n in numel)
    return sum(float(b) * int(n) for b, n in zip(bpp, numel)) / total


def _spec_error(layer: str, message: str) -> UserError:
    return UserError(f"config: layer {layer!r}: {message}")


def parse_spec(value: Any, where: str) -> QuantSpec:
    """A spec from a QuantSpec, a key (``"b4-s8-fp32-64-256"``) or a dict of the five fields.

    Raises:
        UserError: naming ``where`` (a layer or a rule), the bad field and its allowed values.
    """
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        try:
            return QuantSpec.from_key(value)
        except ValueError as exc:
            raise _spec_error(where, str(exc)) from None
    if not isinstance(value, Mapping):
        raise _spec_error(where, f"spec must be a mapping of {list(SPEC_FIELDS)} or a key like "
                                 f"'b4-s8-fp32-64-256', got {type(value).__name__}")
    unknown = sorted(set(value) - set(SPEC_FIELDS))
    missing = [f for f in SPEC_FIELDS if f not in value]
    if unknown or missing:
        raise _spec_error(where, f"spec has unknown fields {unknown} and missing fields {missing}; "
                                 f"expected exactly {list(SPEC_FIELDS)}")
    for field, allowed in SPEC_FIELDS.items():
        got = value[field]
        if isinstance(got, bool) or got not in allowed or type(got) is float:
            raise _spec_error(where, f"{field} must be one of {list(allowed)}, got {got!r}")
    return QuantSpec(**{f: value[f] for f in SPEC_FIELDS})


class Config(Mapping):
    """A quantization config: a spec for every quantized layer, immutable, in layer order.

    ``config[name]`` is the layer's QuantSpec; ``config.shapes[name]`` its (out, in); ``config.meta`` free
    JSON-able metadata (``budget``, ``source``, ``cost``…) that is written with it but is not part of its id.

    Attributes:
        bits: Σ bpp_i·numel_i / Σ numel_i over the quantized layers (embeddings, norms, head not counted).
        exact_bits: Σ storage_bits_i / Σ numel_i (partial blocks and per-matrix offsets included).
        id: content id of the canonical JSON of the layers' specs (two configs with the same specs for the
            same layer names share it, whatever their metadata).
    """

    def __init__(self, specs: Mapping[str, QuantSpec], layers: Layers, **meta: Any):
        missing = [name for name in layers if name not in specs]
        unknown = [name for name in specs if name not in layers]
        if missing or unknown:
            raise ValueError(f"Config: layers without a spec {missing}, specs for unknown layers {unknown}")
        clash = sorted(set(meta) & set(RESERVED))
        if clash:
            raise ValueError(f"Config: metadata keys {clash} are reserved")
        self._specs = {name: specs[name] for name in layers}  # model order, whatever the input order
        self.shapes = {name: (int(layers[name][0]), int(layers[name][1])) for name in layers}
        self.meta = dict(meta)
        self.id = content_id({name: spec.to_dict() for name, spec in self._specs.items()})

    def __getitem__(self, name: str) -> QuantSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Config(id={self.id}, layers={len(self)}, bits={self.bits:.4f})"

    def numel(self) -> list[int]:
        return [out * inp for out, inp in self.shapes.values()]

    @property
    def bits(self) -> float:
        return average_bits([spec.bits_per_param for spec in self._specs.values()], self.numel())

    @property
    def exact_bits(self) -> float:
        stored = sum(storage_bits(spec, self.shapes[name]) for name, spec in self._specs.items())
        return stored / sum(self.numel())

    def spec_indices(self) -> torch.Tensor:
        """(n_layers,) int64: each layer's spec as its index into ``all_specs()`` (a compact encoding)."""
        return torch.tensor([SPEC_INDEX[spec] for spec in self._specs.values()], dtype=torch.int64)

    def layer_bits(self) -> torch.Tensor:
        """(n_layers,) float64: each layer's bpp."""
        return torch.tensor([spec.bits_per_param for spec in self._specs.values()], dtype=torch.float64)

    @classmethod
    def from_indices(cls, indices: Sequence[int], layers: Layers, **meta: Any) -> "Config":
        """The inverse of :meth:`spec_indices`: index ``indices[i]`` of ``all_specs()`` for layer ``i``."""
        specs = all_specs()
        if len(indices) != len(layers):
            raise ValueError(f"Config.from_indices: {len(indices)} indices for {len(layers)} layers")
        return cls({name: specs[int(i)] for name, i in zip(layers, indices)}, layers, **meta)

    def to_dict(self) -> dict[str, Any]:
        """``{"layers": {name: spec fields}, "bits", "exact_bits", "id", **meta}``."""
        return {"layers": {name: spec.to_dict() for name, spec in self._specs.items()},
                "bits": self.bits, "exact_bits": self.exact_bits, "id": self.id, **self.meta}

    @classmethod
    def from_dict(cls, d: Any, layers: Layers) -> "Config":
        """Validate ``d`` (as written by :meth:`to_dict`, or hand-written) against the model's layers.

        A layer's spec may be a dict of the five fields or a key string. ``bits`` and ``exact_bits`` are
        derived and recomputed; an ``id`` that disagrees with the layers means the file was edited or
        damaged and is an error (delete the ``id`` key to accept an edit). Other keys become metadata.

        Raises:
            UserError: naming the unknown or missing layers, or the layer and field of a bad spec.
        """
        if not isinstance(d, Mapping) or not isinstance(d.get("layers"), Mapping):
            raise UserError("config: must be a mapping with a 'layers' mapping (layer name → spec)")
        given = d["layers"]
        unknown = [name for name in given if name not in layers]
        if unknown:
            raise UserError(f"config: unknown layer(s) {_shorten(unknown)}; the model's quantized layers are "
                            f"{_shorten(list(layers))}")
        missing = [name for name in layers if name not in given]
        if missing:
            raise UserError(f"config: missing spec for layer(s) {_shorten(missing)}; every quantized layer "
                            f"needs one")
        specs = {name: parse_spec(given[name], name) for name in layers}
        meta = {k: v for k, v in d.items() if k not in RESERVED}
        config = cls(specs, layers, **meta)
        if "id" in d and d["id"] != config.id:
            raise UserError(f"config: id {d['id']!r} does not match its layers (content id {config.id}); the "
                            f"file was edited or damaged (remove 'id' to accept the edit)")
        return config

    def save(self, path: Path | str) -> None:
        """Write :meth:`to_dict` as JSON, atomically."""
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path | str, layers: Layers) -> "Config":
        """Read and validate a config file (:meth:`from_dict`); errors name the file."""
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise UserError(f"config: file {path} not found") from None
        except ValueError as exc:
            raise UserError(f"config: {path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data, layers)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None


def _shorten(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------------
# Hand-written configs
# ---------------------------------------------------------------------------------------------------------

def _rule_rank(pattern: str, name: str) -> tuple[int, int] | None:
    """How specifically ``pattern`` names layer ``name``: (3, ·) exact, (2, len) suffix/regex, (1, 0) ``*``."""
    if pattern == "*":
        return (1, 0)
    if pattern == name:
        return (3, 0)
    if matches_target(name, pattern):
        return (2, len(pattern))
    return None


def config_from_rules(rules: Any, layers: Layers, **meta: Any) -> Config:
    """A config written by hand.

    ``rules`` is one spec for every layer (a QuantSpec, a key ``"b4-s8-fp32-64-256"``, a dict of the five
    fields, or ``{"spec": …}``), or ``{"rules": [{"pattern": p, "spec": s}, …]}``. A pattern matches a layer
    as a ``target_modules`` entry does (equal name, ``.``-suffix, or full-match regex); ``*`` matches all.
    Precedence, most specific first (torchao style):

        1. the exact layer name;
        2. the longest matching suffix / regex pattern (by pattern length; a tie goes to the earlier rule);
        3. the default ``*``.

    Raises:
        UserError: a bad spec (naming the rule), a pattern that matches no layer, or layers left without a
            spec (naming them).
    """
    if isinstance(rules, Mapping) and "rules" in rules:
        entries = rules["rules"]
    elif isinstance(rules, Mapping) and "spec" in rules:
        entries = [{"pattern": "*", "spec": rules["spec"]}]
    else:
        entries = [{"pattern": "*", "spec": rules}]
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise UserError("config rules: 'rules' must be a non-empty list of {pattern, spec}")
    chosen: dict[str, tuple[tuple[int, int], QuantSpec]] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or set(entry) != {"pattern", "spec"}:
            raise UserError(f"config rules: rule {n} must have exactly the keys 'pattern' and 'spec'")
        pattern = entry["pattern"]
        spec = parse_spec(entry["spec"], f"rule {n} ({pattern})")
        hits = [(name, rank) for name in layers if (rank := _rule_rank(pattern, name)) is not None]
        if not hits:
            raise UserError(f"config rules: rule {n} pattern {pattern!r} matches no quantized layer; layers are "
                            f"{_shorten(list(layers))}")
        for name, rank in hits:
            if name not in chosen or rank > chosen[name][0]:  # strict: a tie keeps the earlier rule
                chosen[name] = (rank, spec)
    uncovered = [name for name in layers if name not in chosen]
    if uncovered:
        raise UserError(f"config rules: no rule covers layer(s) {_shorten(uncovered)}; add a '*' default")
    return Config({name: spec for name, (_, spec) in chosen.items()}, layers, **({"source": "rules"} | meta))
