"""Zero-shot benchmarks through lm-eval's OWN task definitions, pointed at local files.

The task YAMLs we write only ``include:`` the installed lm-eval definitions (prompt, choices, metrics) and
override where the data comes from: the JSONL files of the data stage (``coalora.data.layout``), whether
they hold the real benchmarks or the embedded world's. Everything runs offline on an in-memory model (the
full-precision base, or later a quantized one) through lm-eval's Hugging Face wrapper ``HFLM``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator, Sequence

import yaml

from coalora.artifacts import read_jsonl
from coalora.data import layout
from coalora.errors import UserError

# task → (lm-eval definition relative to lm_eval/tasks, the split our file plays). BoolQ and WinoGrande
# are evaluated on their validation split, ARC on its test split (as lm-eval does).
TASKS: dict[str, tuple[str, str]] = {
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "winogrande": ("winogrande/default.yaml", "validation"),
}
SPLIT_KEYS = ("training_split", "validation_split", "test_split")


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(os.path.dirname(lm_eval.tasks.__file__))


def task_config(task: str, data_file: Path, cache_dir: Path | None = None) -> dict:
    """The YAML mapping of one task: lm-eval's definition plus local-data overrides."""
    definition, split = TASKS[task]
    kwargs: dict = {"data_files": {split: str(Path(data_file).resolve())}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir).resolve())
    config = {
        "include": str(lm_eval_tasks_dir() / definition),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": kwargs,
    }
    config.update({key: None for key in SPLIT_KEYS})
    config[f"{split}_split"] = split
    return config


def write_task_configs(data_dir: Path | str, out_dir: Path | str, tasks: Sequence[str]) -> Path:
    """Write ``<out_dir>/<task>.yaml`` for each task (absolute paths, so any working directory works).

    Args:
        data_dir: a data stage output folder (layout.py).
        out_dir: the folder to write; it should hold nothing else, since lm-eval indexes every YAML in it.
        tasks: names from ``TASKS``.

    Returns:
        ``out_dir``, ready for ``TaskManager(include_path=out_dir, include_defaults=False)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task not in TASKS:
            raise UserError(f"eval.tasks: unknown task {task!r}; allowed: {', '.join(TASKS)}")
        data_file = layout.data_file(Path(data_dir), task)
        if not data_file.is_file():
            raise UserError(f"eval.tasks: {task}: benchmark file {data_file} not found (run the data stage)")
        config = task_config(task, data_file, cache_dir=out_dir / ".datasets")
        (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out_dir


def chance_level(task: str, items: Sequence[dict]) -> float:
    """Accuracy of uniform guessing: 1/2 for BoolQ and WinoGrande, the mean of 1/#choices for ARC."""
    if task.startswith("arc"):
        return sum(1.0 / len(item["choices"]["text"]) for item in items) / max(1, len(items))
    return 0.5


_PATCH_LOCK = threading.Lock()
_PATCH_STATE: dict = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _without_run_metadata() -> Iterator[None]:
    """Skip what ``simple_evaluate`` adds to its results about the machine: ``add_env_info`` (torch's
    collect_env, ~1.8 s per call, more than scoring a small model) and ``get_git_commit_hash`` (spawns git).
    We read only the metrics; the task definitions and scoring are untouched. Reference-counted under a
    lock, so rows scored in parallel threads restore lm-eval's functions exactly once, after the last."""
    import lm_eval.evaluator as evaluator

    with _PATCH_LOCK:
        if _PATCH_STATE["depth"] == 0:
            _PATCH_STATE["saved"] = evaluator.add_env_info, evaluator.get_git_commit_hash
            evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda storage: None), (lambda: None)
        _PATCH_STATE["depth"] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_STATE["depth"] -= 1
            if _PATCH_STATE["depth"] == 0:
                evaluator.add_env_info, evaluator.get_git_commit_hash = _PATCH_STATE["saved"]


def run_benchmarks(model, tokenizer, data_dir: Path | str, tasks: Sequence[str], limit: int | None,
                   batch_size: int, seed: int, work_dir: Path | str) -> dict[str, dict]:
    """Zero-shot accuracy of an in-memory model on the local benchmark files, through ``lm_eval``.

    Args:
        model: a ``transformers`` causal LM (any module HFLM accepts), already on its device.
        tokenizer: its tokenizer.
        data_dir: the data stage output folder.
        tasks: benchmark names (``TASKS``).
        limit: the first ``limit`` items of each task (None: all).
        batch_size: sequences per forward pass.
        seed: python/numpy/torch/fewshot seeds for lm-eval (the caller's torch RNG state is restored).
        work_dir: scratch folder for the generated task YAMLs and the datasets cache.

    Returns:
        task → ``{"acc", "acc_norm" (None when the task has none), "n", "chance"}``.
    """
    import datasets.config
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(dict.fromkeys(tasks))
    include_path = Path(work_dir) / "lm_eval_tasks"
    shutil.rmtree(include_path, ignore_errors=True)     # no stale task files or datasets cache
    write_task_configs(data_dir, include_path, tasks)
    quiet = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets")]
    levels = [logger.level for logger in quiet]
    was_training = model.training
    # The files are local; the one request ``datasets`` would still make is its download-count ping for the
    # packaged "json" builder (a HEAD to S3 unless HF_UPDATE_DOWNLOAD_COUNTS=0 was set before import).
    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    try:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        with torch.random.fork_rng(devices=[]), _without_run_metadata():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=0, limit=limit, bootstrap_iters=0, log_samples=False,
                task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        model.train(was_training)
    results = {}
    for task in tasks:
        metrics = out["results"][task]
        n = int(out["n-samples"][task]["effective"])
        items = read_jsonl(layout.data_file(Path(data_dir), task))[:n]
        acc_norm = metrics.get("acc_norm,none")
        results[task] = {
            "acc": float(metrics["acc,none"]),
            "acc_norm": None if acc_norm is None else float(acc_norm),
            "n": n,
            "chance": round(chance_level(task, items), 4),
        }
    return results
