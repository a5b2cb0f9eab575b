"""Which (method, config) rows the evaluation scores: seen and unseen configs at each budget.

For a method m with seen set S_m (the configs it was trained for or drew from) and the held-out set H (the
allocate stage's ``heldout/``, never in any pool), and each budget β of ``evaluate.budgets``:

    seen row    argmin_{c ∈ S_m}      |bits(c) − β|      (ties: the lower bits, then the id)
    unseen row  argmin_{c ∈ H \\ S_m}  |bits(c) − β|

Rows selected by two budgets are scored once. S_m by method (read from the train stage's output):

    coalora family (joint, with θ)   its final pool ``train/<m>/pool/*.json``; while no search wrote one,
                                     the allocate stage's pool
    shared (joint, no θ)             the configs it trained on (``train.json["configs"]``)
    qlora, lqlora (per-config)       their trained target configs; an unseen config is served by the adapter
                                     of the target nearest in bits
    qlora-bnb (uniform)              its uniform NF4 config only: one seen row, no unseen rows

Planning reads only small JSON files (train.json, config files' ``bits``), so it is cheap and the job ids
``<method>__<config id>`` are stable for the same inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from coalora.artifacts import read_json
from coalora.errors import ArtifactError

ADAPTER = "adapter.safetensors"
SEP = "__"
UNIFORM = "uniform"  # Candidate.stage of the qlora-bnb config (bitsandbytes NF4 on every layer)


@dataclass(frozen=True)
class Candidate:
    """A config file somewhere in the inputs: id, bits, and where it lives (stage name, path inside it)."""

    id: str
    bits: float
    stage: str
    path: str


@dataclass(frozen=True)
class Job:
    """One row to score.

    Attributes:
        method: the method name (a folder of the train stage's output).
        config: the config to quantize with.
        seen: whether the config is in the method's seen set S_m.
        budgets: the budgets that selected it.
        adapter: the adapter file, relative to the train stage's output.
        adapter_config: for per-config methods, the trained config whose adapter serves this row.
    """

    method: str
    config: Candidate
    seen: bool
    budgets: tuple[float, ...]
    adapter: str
    adapter_config: str | None

    @property
    def id(self) -> str:
        return f"{self.method}{SEP}{self.config.id}"

    def to_dict(self) -> dict:
        return {**asdict(self), "id": self.id, "budgets": list(self.budgets)}


def config_candidates(folder: Path, stage: str, rel: str) -> list[Candidate]:
    """Every ``<folder>/*.json`` config as a Candidate (bits from the file's recorded ``bits``)."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        data = read_json(path)
        if "bits" not in data or "id" not in data:
            raise ArtifactError(f"{path}: not a config file (no bits / id); run the stage that wrote it again")
        out.append(Candidate(str(data["id"]), float(data["bits"]), stage, f"{rel}/{path.name}"))
    return out


def nearest(candidates: Sequence[Candidate], budget: float) -> Candidate | None:
    """The candidate nearest in bits to ``budget`` (ties: lower bits, then id); None when there is none."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (abs(c.bits - budget), c.bits, c.id))


def method_kind(method_dir: Path, record: dict) -> str:
    """``joint`` (one adapter), ``uniform`` (qlora-bnb) or ``per_config`` (an adapter per trained config)."""
    if (method_dir / ADAPTER).is_file():
        return "joint"
    if record.get("backend") == "bnb":
        return "uniform"
    return "per_config"


def seen_set(train_dir: Path, allocate_dir: Path, method: str, record: dict, kind: str) -> list[Candidate]:
    """S_m (module docstring)."""
    if kind == "joint" and record.get("confignet"):
        pool = Path(train_dir) / method / "pool"
        if pool.is_dir():
            return config_candidates(pool, "train", f"{method}/pool")
        return config_candidates(Path(allocate_dir) / "pool", "allocate", "pool")
    ids = list(record["configs"])
    if kind == "uniform":  # no config file: rebuilt from the model's layers when scored
        return [Candidate(cid, _uniform_bits(record, cid), UNIFORM, "") for cid in ids]
    return _trained(allocate_dir, ids)


def _uniform_bits(record: dict, config_id: str) -> float:
    """The uniform config's bits: recorded by the train stage, else the bpp of QLoRA's spec (every layer)."""
    recorded = (record.get("config_bits") or {}).get(config_id)
    if recorded is not None:
        return float(recorded)
    from coalora.quant import QLORA_SPEC

    return float(QLORA_SPEC.bits_per_param)


def _trained(allocate_dir: Path, config_ids: Sequence[str]) -> list[Candidate]:
    """The trained configs of a joint or per-config method as allocate pool files (targets are pool members)."""
    pool = {c.id: c for c in config_candidates(Path(allocate_dir) / "pool", "allocate", "pool")}
    missing = sorted(set(config_ids) - set(pool))
    if missing:
        raise ArtifactError(f"train stage configs {missing[:3]} are not in the allocate stage's pool; run "
                            f"`coalora stage train` again")
    return [pool[cid] for cid in config_ids]


def method_jobs(train_dir: Path, allocate_dir: Path, method: str, budgets: Sequence[float],
                heldout: Sequence[Candidate]) -> list[Job]:
    """The rows of one method (empty when the train stage skipped it)."""
    method_dir = Path(train_dir) / method
    record = read_json(method_dir / "train.json")
    if record.get("skipped"):
        return []
    kind = method_kind(method_dir, record)
    seen = seen_set(train_dir, allocate_dir, method, record, kind)
    if kind == "uniform":
        unseen: list[Candidate] = []
    else:
        ids = {c.id for c in seen}
        unseen = [c for c in heldout if c.id not in ids]
    picked: dict[str, tuple[Candidate, bool, list[float]]] = {}
    for budget in budgets:
        for config, is_seen in ((nearest(seen, budget), True), (nearest(unseen, budget), False)):
            if config is not None:
                picked.setdefault(config.id, (config, is_seen, []))[2].append(budget)
    jobs = []
    for config, is_seen, chosen_by in picked.values():
        adapter, adapter_config = _adapter(method, kind, seen, config)
        jobs.append(Job(method, config, is_seen, tuple(chosen_by), adapter, adapter_config))
    return sorted(jobs, key=lambda j: (not j.seen, j.config.bits, j.config.id))


def _adapter(method: str, kind: str, seen: Sequence[Candidate], config: Candidate) -> tuple[str, str | None]:
    if kind == "joint":
        return f"{method}/{ADAPTER}", None
    served_by = nearest(seen, config.bits)  # itself for a seen row
    return f"{method}/{served_by.id}/{ADAPTER}", served_by.id


def plan(train_dir: Path, allocate_dir: Path, budgets: Sequence[float]) -> list[Job]:
    """Every row, methods in the train stage's order (``train.json`` folders), seen before unseen."""
    train_dir = Path(train_dir)
    heldout = config_candidates(Path(allocate_dir) / "heldout", "allocate", "heldout")
    methods = trained_methods(train_dir)
    return [job for method in methods for job in method_jobs(train_dir, allocate_dir, method, budgets, heldout)]


def trained_methods(train_dir: Path) -> list[str]:
    """The methods the train stage wrote: those of ``TRAIN_METHODS`` in its order, then any other by name."""
    from coalora.params import TRAIN_METHODS

    names = sorted(p.parent.name for p in Path(train_dir).glob("*/train.json"))
    return [n for n in TRAIN_METHODS if n in names] + [n for n in names if n not in TRAIN_METHODS]
