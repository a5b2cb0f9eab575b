"""Training checkpoints: safetensors + JSON, digest-verified, written atomically, never pickled.

A checkpoint is a folder ``<run_dir>/step-<NNNNNNNN>/`` (``final/`` for a finished run) holding

    adapter.safetensors     the model's adapter_state_dict (LoRA factors, and θ where trained)
    optimizer.safetensors   AdamW state flattened: ``state.<param index>.<key>`` (exp_avg, exp_avg_sq, step)
    rng.safetensors         generator states as uint8 tensors: batches, configs, torch's global generator
    state.json              step, losses, seconds, pool ids, param-group hyperparameters, Python and NumPy
                            RNG states, and whatever the caller adds (per-config progress, eval losses)
    MANIFEST.json           sha256 of every file above (coalora.artifacts' manifest: the digest)

It is written into a temporary folder beside its final name and renamed into place, so a kill leaves
either the whole checkpoint or none. Loading verifies the digest first.

**Corruption policy (ours).** :func:`read_checkpoint` raises :class:`CheckpointError` naming the folder and
the files that differ. :func:`latest_checkpoint` then falls back to the previous intact checkpoint (the last
two are kept), with a warning naming the corrupt one, which is renamed ``corrupt-…`` so it is never read
again. Falling back is safe because training is deterministic: resuming from an older step replays the
same steps and ends with the same weights.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coalora.artifacts import atomic_folder, read_json, verify_manifest, write_json
from coalora.errors import ArtifactError

log = logging.getLogger("coalora.train.checkpoint")

STATE = "state.json"
FINAL = "final"
KEEP = 2  # step checkpoints kept per run: the latest, and the one to fall back to
_STEP = re.compile(r"^step-(\d{8})$")


class CheckpointError(ArtifactError):
    """A checkpoint is corrupt (digest mismatch), incomplete or foreign."""


@dataclass
class Checkpoint:
    """A checkpoint in memory: tensor files by stem (``adapter`` → tensors) and the JSON state."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def write_checkpoint(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write ``<stem>.safetensors`` for every entry of ``tensors`` and ``state.json`` into ``folder``, atomically.

    An existing folder of the same name is replaced whole (atomic_folder's rename).
    """
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        for stem, named in tensors.items():
            # clone: safetensors refuses tensors sharing storage, and views must not keep big parents alive
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in named.items()},
                      str(tmp / f"{stem}.safetensors"))
        write_json(tmp / STATE, state)
    return folder


def read_checkpoint(folder: Path) -> Checkpoint:
    """Verify ``folder`` against its digest and load it.

    Raises:
        CheckpointError: naming the folder and what is wrong (files differing from the digest, no digest).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    problem = verify_manifest(folder)
    if problem:
        raise CheckpointError(f"corrupt checkpoint: {problem}; delete {folder} to start that run afresh")
    tensors = {p.stem: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    return Checkpoint(folder, tensors, read_json(folder / STATE))


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The step checkpoints of a run, oldest first."""
    if not Path(run_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest intact step checkpoint of a run, falling back past corrupt ones (module docstring)."""
    for folder in reversed(step_checkpoints(run_dir)):
        try:
            return read_checkpoint(folder)
        except CheckpointError as exc:
            log.warning("%s; falling back to the previous checkpoint", exc)
            os.replace(folder, folder.with_name(f"corrupt-{folder.name}"))
    return None


def prune(run_dir: Path, keep: int = KEEP) -> None:
    """Remove all but the newest ``keep`` step checkpoints of a run."""
    folders = step_checkpoints(run_dir)
    for folder in folders[:len(folders) - keep]:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Optimizer and RNG state ↔ tensors + JSON
# ---------------------------------------------------------------------------------------------------------

def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``optimizer.state_dict()``: tensors as ``state.<i>.<key>``, the rest JSON-able.

    Returns:
        (tensors, meta) with meta = {"param_groups": [...], "scalars": {"<i>.<key>": value}}.
    """
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The inverse of :func:`optimizer_state`, into an optimizer built over the same parameters."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(meta["param_groups"]):
        raise CheckpointError(f"checkpoint has {len(meta['param_groups'])} parameter groups, the optimizer "
                              f"{len(current)}")
    groups = []
    for now, saved in zip(current, meta["param_groups"]):
        # JSON turned tuples (betas) into lists; give them back the type the optimizer uses
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """uint8 state tensors of the named generators plus torch's global generator (``torch``)."""
    return {**{name: g.get_state() for name, g in generators.items()}, "torch": torch.get_rng_state()}


def load_rng_tensors(generators: dict[str, torch.Generator], tensors: dict[str, torch.Tensor]) -> None:
    for name, g in generators.items():
        g.set_state(tensors[name])
    torch.set_rng_state(tensors["torch"])


def host_rng_state() -> dict:
    """Python's and NumPy's global RNG states as JSON (nothing in training draws from them today, but a
    library might, and a resumed run must see what the uninterrupted one saw)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def load_host_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
