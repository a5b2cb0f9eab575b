"""Which (method, config) rows the evaluation scores, and the checks that keep their labels honest.

Row kinds (the ``set`` column) for the methods the train stage trained, plus the quantized base without an
adapter (``none``) and full precision (``full``):

    target     every target config (the train stage's ``targets.json``), for every method and ``none``
    seen       a config the method drew in training other than the targets (``<method>/configs/``): for each
               β of ``evaluate.seen_budgets`` the drawn non-target config nearest β (the coalora family's
               pool; per-config methods and shared drew only the targets)
    unseen     every config of the common unseen set (the allocate stage's ``unseen/``), for every method
               and ``none``; no method ever drew one (:func:`check_never_drawn` asserts it)
    reference  ``full`` (the base model unquantized, no adapter) and ``qlora-bnb`` (bitsandbytes NF4 at its
               uniform config: the classic QLoRA as an outside reference point)

A joint method serves every config with its one adapter; a per-config method serves a config with the
adapter of its target nearest in bits (itself at a target). How far an unseen config is from training:
``layers_from_trained``, the fewest layers in which it differs from any config any method drew.

Planning reads only small JSON files, so it is cheap and the job ids ``<method>__<config id>`` are stable
for the same inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from coalora.artifacts import read_json
from coalora.errors import ArtifactError
from coalora.trained import DRAWN, JOINT_RUNS, adapter_file, read_targets, trained_methods

SEP = "__"
UNIFORM = "uniform"           # Candidate.stage of the qlora-bnb config (bitsandbytes NF4 on every layer)
NONE, FULL = "none", "full"   # the reference models: quantized base without adapter; full precision
SETS = ("target", "seen", "unseen", "reference")


@dataclass(frozen=True)
class Candidate:
    """A config file somewhere in the inputs: id, bits, and where it lives (stage name, path inside it)."""

    id: str
    bits: float
    stage: str
    path: str


FULL_PRECISION = Candidate("full-precision", 16.0, FULL, "")  # bits: replaced by the model's dtype when scored


@dataclass(frozen=True)
class Job:
    """One row to score.

    Attributes:
        method: a trained method's name, ``none`` or ``full``.
        config: the config to quantize with (``FULL_PRECISION`` for ``full``).
        set: the row kind (``SETS``).
        budgets: for seen rows, the ``seen_budgets`` that selected it.
        adapter: the adapter file relative to the train stage's output (None for ``none`` and ``full``).
        adapter_config: for per-config methods, the target whose adapter serves this row.
        layers_from_trained: unseen rows: the fewest layers in which the config differs from a drawn one.
    """

    method: str
    config: Candidate
    set: str
    budgets: tuple[float, ...] = ()
    adapter: str | None = None
    adapter_config: str | None = None
    layers_from_trained: int | None = None

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


def nearest(candidates: Sequence[Candidate], bits: float) -> Candidate | None:
    """The candidate nearest in bits (ties: lower bits, then id); None when there is none."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (abs(c.bits - bits), c.bits, c.id))


def targets(train_dir: Path, allocate_dir: Path) -> list[Candidate]:
    """The target configs, as allocate pool files, in target order."""
    ids = [t["id"] for t in read_targets(train_dir)["targets"]]
    pool = {c.id: c for c in config_candidates(Path(allocate_dir) / "pool", "allocate", "pool")}
    missing = [i for i in ids if i not in pool]
    if missing:
        raise ArtifactError(f"train stage targets {missing[:3]} are not in the allocate stage's pool; run "
                            f"`coalora stage train` again")
    return [pool[i] for i in ids]


def check_never_drawn(records: dict[str, dict], unseen: Sequence[Candidate]) -> None:
    """Assert that no method drew an unseen config (``config_draws`` of every train.json).

    Raises:
        ArtifactError: naming the method and the config; the comparison would call a trained config unseen.
    """
    ids = {c.id for c in unseen}
    for method, record in records.items():
        drawn = ids & set(record.get("config_draws", {}))
        if drawn:
            raise ArtifactError(f"evaluate: {method} drew unseen configs {sorted(drawn)[:3]} in training; the "
                                f"unseen set must be held out of every method (run `coalora stage train` again)")


def layers_apart(a: dict, b: dict) -> int:
    """How many layers two config files (``Config.to_dict``) quantize differently."""
    return sum(spec != b["layers"].get(name) for name, spec in a["layers"].items())


def distances(folders: dict[str, Path], records: dict[str, dict], unseen: Sequence[Candidate]) -> dict[str, int]:
    """unseen id → the fewest layers in which it differs from any config any method drew."""
    drawn = [read_json(p) for m in records for p in sorted((folders["train"] / m / DRAWN).glob("*.json"))]
    if not drawn:
        raise ArtifactError(f"{folders['train']}: no method recorded the configs it drew ({DRAWN}/); run "
                            f"`coalora stage train` again")
    return {c.id: min(layers_apart(read_json(folders[c.stage] / c.path), d) for d in drawn) for c in unseen}


def _adapter(method: str, record: dict, config: Candidate, served: Sequence[Candidate]) -> tuple[str, str | None]:
    """(adapter file, the target serving the row) for a trained method."""
    if record["runs_kind"] == JOINT_RUNS:
        return adapter_file(method), None
    target = nearest(served, config.bits)  # itself at a target
    return adapter_file(method, target.id), target.id


def seen_rows(folders: dict[str, Path], method: str, record: dict, targets: Sequence[Candidate],
              seen_budgets: Sequence[float]) -> list[Job]:
    """The method's seen rows: the drawn non-target config nearest each budget (budgets sharing one config
    give one row)."""
    target_ids = {t.id for t in targets}
    drawn = [c for c in config_candidates(folders["train"] / method / DRAWN, "train", f"{method}/{DRAWN}")
             if c.id not in target_ids]
    picked: dict[str, tuple[Candidate, list[float]]] = {}
    for budget in seen_budgets:
        if (config := nearest(drawn, budget)) is not None:
            picked.setdefault(config.id, (config, []))[1].append(budget)
    return [Job(method, config, "seen", tuple(budgets), *_adapter(method, record, config, targets))
            for config, budgets in picked.values()]


def method_jobs(folders: dict[str, Path], method: str, record: dict, targets: Sequence[Candidate],
                unseen: Sequence[Candidate], far: dict[str, int], seen_budgets: Sequence[float]) -> list[Job]:
    """Every row of one trained method, targets first."""
    if record["runs_kind"] == "uniform":
        cid = record["configs"][0]
        return [Job(method, Candidate(cid, float(record["config_bits"][cid]), UNIFORM, ""), "reference",
                    adapter=adapter_file(method, cid), adapter_config=cid)]
    rows = [Job(method, t, "target", (), *_adapter(method, record, t, targets)) for t in targets]
    rows += seen_rows(folders, method, record, targets, seen_budgets)
    rows += [Job(method, u, "unseen", (), *_adapter(method, record, u, targets), layers_from_trained=far[u.id])
             for u in unseen]
    return rows


def plan(folders: dict[str, Path], seen_budgets: Sequence[float], sets: Sequence[str] = SETS) -> list[Job]:
    """Every row: ``full``, then ``none`` and each trained method (its targets, seen and unseen rows).

    Args:
        folders: stage name → output folder (``allocate``, ``train``).
        seen_budgets: ``evaluate.seen_budgets``.
        sets: the row kinds to keep (``evaluate.sets``; reference rows are always kept).

    Raises:
        ArtifactError: a method drew an unseen config, or an input is incomplete.
    """
    records = trained_methods(folders["train"])
    target_list = targets(folders["train"], folders["allocate"])
    unseen = config_candidates(folders["allocate"] / "unseen", "allocate", "unseen")
    check_never_drawn(records, unseen)
    far = distances(folders, records, unseen)
    jobs = [Job(FULL, FULL_PRECISION, "reference")]
    jobs += [Job(NONE, t, "target") for t in target_list]
    jobs += [Job(NONE, u, "unseen", layers_from_trained=far[u.id]) for u in unseen]
    for method, record in records.items():
        jobs += method_jobs(folders, method, record, target_list, unseen, far, seen_budgets)
    return [job for job in jobs if job.set in sets or job.set == "reference"]
