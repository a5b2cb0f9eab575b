"""The calibrate stage's files: ``costs.safetensors`` (cost tables, numel, bits_per_param) and ``costs.json``
(the index), written and read by :class:`CostTable` alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coalora.artifacts import read_json, write_json
from coalora.errors import ArtifactError
from coalora.quant import QuantSpec

TABLE = {"fisher": "cost_fisher", "squared": "cost_squared"}  # weighting → tensor name in costs.safetensors
COSTS_FILE, INDEX_FILE, FISHER_FILE = "costs.safetensors", "costs.json", "fisher.safetensors"


@dataclass(frozen=True)
class CostTable:
    """The calibrate stage's output in memory.

    Attributes:
        layers: name → (out, in), in model order.
        specs: the C specs, in column order.
        tables: ``"cost_fisher"`` / ``"cost_squared"`` → (L, C) float64 (``cost_fisher`` only when computed).
        weighting: the weighting the allocation uses (``fisher`` | ``squared``).
        n_sequences: calibration sequences behind the Fisher (0 when not computed).
    """

    layers: dict[str, tuple[int, int]]
    specs: tuple[QuantSpec, ...]
    tables: dict[str, torch.Tensor]
    weighting: str
    n_sequences: int

    @property
    def selected(self) -> torch.Tensor:
        """(L, C) the table of the recorded weighting."""
        return self.tables[TABLE[self.weighting]]

    @property
    def numel(self) -> torch.Tensor:
        """(L,) int64 weights per layer."""
        return torch.tensor([o * i for o, i in self.layers.values()], dtype=torch.int64)

    @property
    def bits_per_param(self) -> torch.Tensor:
        """(C,) float64 bpp of each spec."""
        return torch.tensor([s.bits_per_param for s in self.specs], dtype=torch.float64)

    def save(self, folder: Path) -> None:
        """Write ``costs.safetensors`` (cost tables, numel, bits_per_param) and ``costs.json`` (the index)."""
        from safetensors.torch import save_file

        tensors = {**self.tables, "numel": self.numel, "bits_per_param": self.bits_per_param}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(folder) / COSTS_FILE))
        write_json(Path(folder) / INDEX_FILE, {
            "layers": list(self.layers), "shapes": [list(s) for s in self.layers.values()],
            "specs": [s.key for s in self.specs], "weighting": self.weighting, "selected": TABLE[self.weighting],
            "tables": sorted(self.tables), "n_sequences": self.n_sequences,
        })

    @classmethod
    def load(cls, folder: Path) -> "CostTable":
        """Read a calibrate output folder; ArtifactError when the files disagree with each other."""
        from safetensors.torch import load_file

        folder = Path(folder)
        index = read_json(folder / INDEX_FILE)
        tensors = load_file(str(folder / COSTS_FILE))
        layers = {name: tuple(shape) for name, shape in zip(index["layers"], index["shapes"])}
        specs = tuple(QuantSpec.from_key(k) for k in index["specs"])
        tables = {k: tensors[k] for k in index["tables"]}
        table = cls(layers, specs, tables, index["weighting"], index["n_sequences"])
        expected = (len(layers), len(specs))
        if any(tuple(t.shape) != expected for t in tables.values()) or \
                not torch.equal(tensors["bits_per_param"], table.bits_per_param) or \
                not torch.equal(tensors["numel"], table.numel):
            raise ArtifactError(f"{folder}: {COSTS_FILE} does not match {INDEX_FILE}; run `coalora stage calibrate`")
        return table
