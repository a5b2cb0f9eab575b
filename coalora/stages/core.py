"""The stage mechanism: a stage is a function ``fn(params, ctx) -> summary`` plus its declarations.

A stage reads only its declared params sections and the outputs of its declared upstream stages, writes
only into ``ctx.out`` (a temporary folder that atomically becomes ``artifacts/<name>/``), and returns a
small JSON-able summary. DVC (``dvc.yaml``) and Prefect (``tasks/``) both run stages through
:func:`run_stage`; neither holds any stage logic.

The cache key of a stage is what DVC hashes too: the values of its params sections, the digests of its
input artifacts and the digest of its code. A changed parameter therefore re-runs exactly the stages that
read it, and their downstream stages through the changed input digests.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import coalora
from coalora import parallel
from coalora.artifacts import (ARTIFACTS, RECORD, atomic_folder, content_id, folder_digest, read_json,
                               sha256_file, verify_manifest, write_json)
from coalora.errors import ArtifactError, UserError, file_error
from coalora.params import Params

log = logging.getLogger("coalora.stages")

WORK = ".work"
SOURCE_ROOT = Path(coalora.__file__).resolve().parent.parent


@dataclass
class StageContext:
    """What a running stage may touch.

    Attributes:
        root: the project root (params.yaml lives here).
        out: the temporary output folder; it becomes ``artifacts/<name>/`` when the stage returns.
        work: ``artifacts/.work/<name>/``, kept across failed attempts (checkpoints of long stages); removed
            after success.
        inputs: upstream stage name → its verified output folder.
        progress: show progress bars.
    """

    root: Path
    out: Path
    work: Path
    inputs: dict[str, Path]
    progress: bool = True

    def input(self, name: str) -> Path:
        if name not in self.inputs:
            raise KeyError(f"stage did not declare {name!r} as an input; declared: {sorted(self.inputs)}")
        return self.inputs[name]


@dataclass(frozen=True)
class Stage:
    """A stage's declarations: the single source DVC and Prefect both read.

    Attributes:
        name: the stage name (``coalora stage NAME``, ``artifacts/NAME``).
        fn: ``fn(params, ctx) -> summary``.
        params: top-level params.yaml sections the stage reads.
        deps: upstream stages whose output folders it reads.
        code: source paths (relative to the repository root; a folder means its ``.py`` files) whose content
            is part of the key besides what the stage's module imports, which is found from its source
            (:func:`code_paths`). Needed only for files read without an import.
        metrics: JSON files inside the output folder for ``dvc metrics show``.
        plots: CSV/JSON files inside the output folder for ``dvc plots show``.
        description: one line for ``coalora stages`` and dvc.yaml.
        extra: anything else; ``data_parallel: True`` lets the stage run under ``accelerate launch``
            (``coalora.parallel``), ``dvc_plots``: the report's plot definitions.
    """

    name: str
    fn: Callable[[Params, StageContext], dict]
    params: tuple[str, ...]
    deps: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def out_dir(self, root: Path) -> Path:
        return Path(root) / ARTIFACTS / self.name

    def work_dir(self, root: Path) -> Path:
        return Path(root) / ARTIFACTS / WORK / self.name


def code_paths(stage: Stage) -> tuple[str, ...]:
    """The source files of the stage's key (and of its dvc.yaml ``deps``): every project module its module
    imports, transitively (:mod:`coalora.stages.code`), plus the declared ``code`` paths."""
    from coalora.stages.code import expand, module_closure

    found = set(module_closure(SOURCE_ROOT, stage.fn.__module__)) | set(expand(SOURCE_ROOT, stage.code))
    return tuple(sorted(found))


def code_digest(stage: Stage) -> str:
    """sha256 over the sorted (path, content digest) of the stage's source files (:func:`code_paths`)."""
    return content_id([(rel, sha256_file(SOURCE_ROOT / rel)) for rel in code_paths(stage)], length=64)


def input_problems(stage: Stage, root: Path) -> dict[str, str]:
    """Upstream stage name → what is wrong with its output folder, for each unusable one."""
    problems = {dep: verify_manifest(Path(root) / ARTIFACTS / dep) for dep in stage.deps}
    return {dep: problem for dep, problem in problems.items() if problem}


def input_folders(stage: Stage, root: Path) -> dict[str, Path]:
    """The verified output folders of the stage's upstream stages; ArtifactError when one is unusable."""
    for dep, problem in input_problems(stage, root).items():
        raise ArtifactError(f"stage {stage.name} needs the output of stage {dep}: {problem}; run "
                            f"`coalora run` (it rebuilds {dep}) or `coalora stage {dep}` first")
    return {dep: Path(root) / ARTIFACTS / dep for dep in stage.deps}


def stage_key(stage: Stage, params: Params, root: Path) -> str:
    """The cache key: params sections + input artifact digests + code digest (+ the library version)."""
    inputs = {dep: folder_digest(path) for dep, path in input_folders(stage, root).items()}
    return content_id({
        "stage": stage.name,
        "params": params.sections(stage.params),
        "inputs": inputs,
        "code": code_digest(stage),
        "version": coalora.__version__,
    }, length=64)


def fresh_summary(stage: Stage, params: Params, root: Path) -> dict | None:
    """The saved summary when the stage's output and its inputs are intact and it was built under the
    current key; None otherwise (never raises for a missing or corrupt input)."""
    out = stage.out_dir(root)
    if verify_manifest(out) is not None or input_problems(stage, root):
        return None  # an upstream output to rebuild first: this one is not fresh either
    record = read_json(out / RECORD)
    if record.get("key") != stage_key(stage, params, root):
        return None
    return record["summary"]


@contextmanager
def file_errors_as_user_errors(name: str) -> Iterator[None]:
    """A read-only folder or a full disk inside stage ``name`` is the user's to fix: a UserError (one line,
    exit 2, no retry by the orchestrator) naming the path, instead of an OSError traceback."""
    try:
        yield
    except OSError as exc:
        message = file_error(exc)
        if message is None:
            raise
        raise UserError(f"stage {name}: {message}") from exc


def run_stage(stage: Stage, params: Params, root: Path | str, *, force: bool = False,
              progress: bool = True) -> dict:
    """Run one stage (or return its saved summary when its output is fresh and ``force`` is False).

    A corrupt or foreign output folder fails verification and is rebuilt, never used. Under a multi-process
    launch (only for stages declaring ``data_parallel``) every rank runs the stage, the main process alone
    writes the output folder, and the work folder is removed once every rank is done.
    """
    root = Path(root)
    if parallel.launched() and not stage.extra.get("data_parallel"):
        raise UserError(f"stage {stage.name} runs in one process; under `accelerate launch` (here "
                        f"{parallel.world_size()} processes) only data-parallel stages run (train); "
                        f"run `coalora stage {stage.name}` without it")
    if not force and (summary := fresh_summary(stage, params, root)) is not None:
        log.info("stage %s: up to date", stage.name)
        return summary
    problem = verify_manifest(stage.out_dir(root))
    if stage.out_dir(root).exists() and problem:
        log.warning("stage %s: rebuilding: %s", stage.name, problem)
    key = stage_key(stage, params, root)
    inputs = input_folders(stage, root)
    work = stage.work_dir(root)
    with file_errors_as_user_errors(stage.name):
        work.mkdir(parents=True, exist_ok=True)
    log.info("stage %s: running", stage.name)
    started = time.perf_counter()
    # launched: the main process writes the atomic folder, the others a throwaway one (parallel.stage_output)
    output = (parallel.stage_output(lambda: atomic_folder(stage.out_dir(root))) if parallel.launched()
              else atomic_folder(stage.out_dir(root)))
    with file_errors_as_user_errors(stage.name), output as tmp:
        ctx = StageContext(root=root, out=tmp, work=work, inputs=inputs, progress=progress and parallel.is_main())
        summary = stage.fn(params, ctx)
        summary = {**summary, "seconds": round(time.perf_counter() - started, 2)}
        write_json(tmp / RECORD, {"stage": stage.name, "key": key, "summary": summary})
    parallel.wait()  # launched: no rank still reads the work folder
    if parallel.is_main():
        shutil.rmtree(work, ignore_errors=True)
    log.info("stage %s: done in %.1f s", stage.name, summary["seconds"])
    return summary
