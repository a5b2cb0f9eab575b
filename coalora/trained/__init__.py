"""The train stage's output folder: its layout, and the one writer and reader of each of its files.

    <method>/adapter.safetensors              joint methods (coalora family, shared): the one adapter (+ θ)
    <method>/<config id>/adapter.safetensors  per-config methods (qlora, lqlora, qlora-bnb): one per config
    <method>/train.json                       :func:`method_record`: how the method's model was built (backend,
                                              confignet, init, seed: ``coalora.model.rebuild.Recipe``),
                                              steps, config-steps, seconds, losses, configs, K, target bits,
                                              compute rule, ``config_draws`` (config id → steps trained under
                                              it: a config is *seen* by a method iff it is drawn here); pool
                                              methods: ``rounds`` (per search round: step, pool with bits
                                              and f1, front, hypervolume and its reference, proposals)
    <method>/configs/<config id>.json         every config the method drew (``Config.save`` files)
    <method>/pool/<config id>.json            pool methods (coalora, coalora-frozen, coalora-random): the
                                              FINAL pool, each a ``Config.save`` file
    <method>/rounds.csv                       pool methods: round, id, bits, f1, in_pool, on_front
    <method>/loss.csv                         step, run, loss (per-config runs follow each other)
    targets.json                              the target set (id, bits, target bits), pool and unseen sizes,
                                              the training dtype and seed, steps per config
    metrics.json                              flat: final loss, held-out loss before/after, seconds per method

This package names the files and reads them; :mod:`coalora.trained.write` writes them (the train stage calls
it). Adapter files are named and placed here (:func:`adapter_file`), their content written and read by
``coalora.model.adapter``. The readers stay light (the report stage reads targets.json without loading the
model package), and the writers take the training package's results (``MethodResult``, ``TrainSetup``)
without importing it, so evaluation, which reads these files, never loads the training package.
"""

from __future__ import annotations

from pathlib import Path

from coalora.artifacts import read_json

TRAIN_JSON = "train.json"
TARGETS = "targets.json"
METRICS = "metrics.json"
LOSS_CSV = "loss.csv"
ROUNDS_CSV = "rounds.csv"
DRAWN = "configs"   # <method>/configs/: every config the method drew
POOL = "pool"       # <method>/pool/: a pool method's final pool
JOINT_RUNS = "joint"
ADAPTER_FILE = "adapter.safetensors"  # content: coalora.model.adapter


def adapter_file(method: str, run: str | None = None) -> str:
    """Where the train stage puts an adapter file, relative to its output: the one adapter of a joint method
    (``run`` None), else the adapter of the method's run for config id ``run``."""
    return f"{method}/{ADAPTER_FILE}" if run is None else f"{method}/{run}/{ADAPTER_FILE}"


def read_record(train_dir: Path, method: str) -> dict:
    """The method's train.json."""
    return read_json(Path(train_dir) / method / TRAIN_JSON)


def read_targets(train_dir: Path) -> dict:
    """targets.json: ``targets`` (id, bits, target_bits), ``pool``, ``unseen``, ``dtype``, ``seed``,
    ``steps_per_config``."""
    return read_json(Path(train_dir) / TARGETS)


def trained_methods(train_dir: Path) -> dict[str, dict]:
    """method → its train.json, for the methods the train stage trained (skipped ones left out), in the
    order of ``TRAIN_METHODS``, then any other by name."""
    from coalora.params import TRAIN_METHODS

    names = sorted(p.parent.name for p in Path(train_dir).glob(f"*/{TRAIN_JSON}"))
    ordered = [n for n in TRAIN_METHODS if n in names] + [n for n in names if n not in TRAIN_METHODS]
    records = {name: read_record(train_dir, name) for name in ordered}
    return {name: r for name, r in records.items() if not r.get("skipped")}
