"""Zero-shot benchmarks through lm-eval's OWN task definitions, pointed at local files.

The task YAMLs we write only ``include:`` the installed lm-eval definitions (prompt, choices, metrics) and
override where the data comes from: the JSONL files of the data stage (``coalora.data.layout``), whether
they hold the real benchmarks or the embedded world's. Everything runs offline on an in-memory model (the
full-precision base, or later a quantized one) through lm-eval's Hugging Face wrapper ``HFLM``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import yaml

from coalora.artifacts import read_jsonl
from coalora.data import layout
from coalora.errors import UserError
from coalora.threads import SharedPatch

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


TEMPLATE_CACHE = 1024  # compiled prompt templates kept (a task has a handful; rows reuse them)


# lm-eval modules that draw tqdm bars (per task while building requests, per batch of requests)
_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


def _no_bar(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


def _apply_lm_eval_patches() -> tuple:
    """Three things ``simple_evaluate`` does that are not scoring, removed for the block:

    * the run metadata it adds about the machine: ``add_env_info`` (torch's collect_env, ~1.8 s per call,
      more than scoring a small model) and ``get_git_commit_hash`` (spawns git); we read only the metrics;
    * ``lm_eval.utils.apply_template`` compiles its Jinja prompt template anew for EVERY document and field
      (``env.from_string``, ~2–5 ms each: tens of seconds per row at thousands of items); the compiled
      template of a given source is the same object every time, so ``from_string`` is memoised by source.
      Rendering, and so every prompt, is unchanged;
    * its progress bars (several per row: thousands of lines in a non-interactive log, a scroll of bars on a
      terminal); the stage reports progress per row instead (coalora.progress).

    Task definitions and scoring are untouched. A :class:`coalora.threads.SharedPatch`, so rows scored in
    parallel threads restore lm-eval's functions exactly once, after the last."""
    import lm_eval.evaluator as evaluator
    import lm_eval.utils as utils

    modules = [importlib.import_module(name) for name in _BAR_MODULES]
    saved = (evaluator.add_env_info, evaluator.get_git_commit_hash, utils.env.from_string,
             [module.tqdm for module in modules])
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda storage: None), (lambda: None)
    utils.env.from_string = functools.lru_cache(maxsize=TEMPLATE_CACHE)(utils.env.from_string)
    for module in modules:
        module.tqdm = _no_bar
    return saved


def _undo_lm_eval_patches(saved: tuple) -> None:
    import lm_eval.evaluator as evaluator
    import lm_eval.utils as utils

    evaluator.add_env_info, evaluator.get_git_commit_hash, from_string, bars = saved
    del utils.env.from_string  # the instance attribute; the class's method shows again
    assert utils.env.from_string == from_string
    for name, bar in zip(_BAR_MODULES, bars):
        importlib.import_module(name).tqdm = bar


_lm_eval_patches = SharedPatch(_apply_lm_eval_patches, _undo_lm_eval_patches)


class Benchmarks:
    """lm-eval's own task objects for a data folder's benchmark files: built once (YAMLs written, datasets
    loaded, documents indexed), then scored on any number of in-memory models (one per evaluation row).

    Args:
        data_dir: the data stage output folder.
        tasks: benchmark names (``TASKS``).
        limit: the first ``limit`` items of each task (None: all).
        work_dir: scratch folder for the generated task YAMLs and the datasets cache.
    """

    def __init__(self, data_dir: Path | str, tasks: Sequence[str], limit: int | None, work_dir: Path | str):
        from lm_eval.tasks import TaskManager

        self.data_dir, self.limit = Path(data_dir), limit
        self.names = list(dict.fromkeys(tasks))
        include_path = Path(work_dir) / "lm_eval_tasks"
        shutil.rmtree(include_path, ignore_errors=True)     # no stale task files or datasets cache
        write_task_configs(self.data_dir, include_path, self.names)
        with _quiet(), _offline_datasets():
            # our folder only: without a manager, simple_evaluate would index all ~14k built-in task YAMLs
            self.manager = TaskManager(include_path=str(include_path), include_defaults=False)
            loaded = self.manager.load(self.names)
        self.tasks = [loaded["tasks"][name] for name in self.names]
        self.chance = {t: round(chance_level(t, read_jsonl(layout.data_file(self.data_dir, t))[:limit]), 4)
                       for t in self.names}

    def score(self, model, tokenizer, batch_size: int, seed: int) -> dict[str, dict]:
        """Zero-shot accuracy of ``model`` (a ``transformers`` causal LM on its device) through lm-eval's
        Hugging Face wrapper ``HFLM`` (:meth:`score_lm`; the model's train/eval mode is restored)."""
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        try:
            return self.score_lm(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), seed)
        finally:
            model.train(was_training)

    def score_lm(self, lm, seed: int) -> dict[str, dict]:
        """Zero-shot accuracy of any ``lm_eval.api.model.LM`` on the tasks.

        Args:
            lm: the model as lm-eval sees it (``HFLM``, or a stand-in in tests).
            seed: python/numpy/torch/fewshot seeds for lm-eval (the caller's torch RNG state is restored).

        Returns:
            task → ``{"acc", "acc_norm" (None when the task has none), "n", "chance", "items"}``; ``items``:
            ``{"acc": [0|1 per item], "acc_norm": [...] or None}`` in document order (the per-item results a
            paired bootstrap resamples).
        """
        import torch
        from lm_eval import simple_evaluate

        with _quiet(), _offline_datasets(), torch.random.fork_rng(devices=[]), _lm_eval_patches:
            out = simple_evaluate(
                model=lm, tasks=self.tasks, num_fewshot=0, limit=self.limit, bootstrap_iters=0,
                log_samples=True, task_manager=self.manager, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
        return {task: self._task_result(task, out) for task in self.names}

    def _task_result(self, task: str, out: dict) -> dict:
        metrics = out["results"][task]
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        acc_norm = metrics.get("acc_norm,none")
        items_norm = [int(s["acc_norm"]) for s in samples] if acc_norm is not None else None
        return {
            "acc": float(metrics["acc,none"]),
            "acc_norm": None if acc_norm is None else float(acc_norm),
            "n": len(samples),
            "chance": self.chance[task],
            "items": {"acc": [int(s["acc"]) for s in samples], "acc_norm": items_norm},
        }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' loggers at ERROR for the block."""
    quiet = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _offline_datasets() -> Iterator[None]:
    """The files are local; the one request ``datasets`` would still make is its download-count ping for the
    packaged "json" builder (a HEAD to S3 unless HF_UPDATE_DOWNLOAD_COUNTS=0 was set before import)."""
    import datasets.config

    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    try:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts


def run_benchmarks(model, tokenizer, data_dir: Path | str, tasks: Sequence[str], limit: int | None,
                   batch_size: int, seed: int, work_dir: Path | str) -> dict[str, dict]:
    """Zero-shot accuracy of one in-memory model on the local benchmark files (:class:`Benchmarks`, built
    for this one call); task → ``{"acc", "acc_norm", "n", "chance", "items"}``."""
    return Benchmarks(data_dir, tasks, limit, work_dir).score(model, tokenizer, batch_size, seed)
