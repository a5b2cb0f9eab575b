"""Cross-field checks: rules relating keys of different sections, or the params to the model, that must hold
before any stage runs (a stage failing on them would come after the earlier stages were rebuilt for nothing).

Two lists, each of plain functions returning the problems they find, one line each naming the keys and what
is allowed (an empty list: fine):

* ``PARAMS_CHECKS``: ``check(params)``, the params alone. :func:`load_checked` runs them right after loading,
  on params.yaml alone and with the profile; every command loads its params through it (``coalora params``
  included), so nothing starts on a file that breaks them.
* ``PROJECT_CHECKS``: ``check(params, root)``, the params against the project, e.g. ``quant.target_modules``
  against the base model's layers. ``coalora run`` and ``coalora stage`` run them before any stage.

To add a rule, write a function and append it to its list. The stages keep their own checks against what
they actually read (the allocated pool, the data); these catch the same mistakes from the params, early.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

from coalora.artifacts import ARTIFACTS
from coalora.errors import ParamsError, UserError

if TYPE_CHECKING:  # pragma: no cover
    from coalora.params import Params

log = logging.getLogger("coalora.checks")


def targets_within_budgets(params: "Params") -> list[str]:
    """Every ``train.target_bits`` at most ``allocate.budget_max``: the pool holds no config above it."""
    above = [b for b in params.train.target_bits if b > params.allocate.budget_max]
    if not above:
        return []
    return [f"train.target_bits: {above} above allocate.budget_max ({params.allocate.budget_max}); the pool "
            f"holds no config above it: lower the targets or raise allocate.budget_max"]


def pool_methods(params: "Params") -> list[str]:
    """The methods of ``train.methods`` that train on the pool (coalora and its ablations)."""
    from coalora.train.methods import METHODS

    return [name for name in params.train.methods if METHODS[name].has_pool]


def k_within_pool(params: "Params") -> list[str]:
    """``train.k`` distinct pool configs per step: the pool holds at most a config per budget of the grid."""
    pool_size = params.allocate.grid_size
    if params.train.k <= pool_size or not pool_methods(params):
        return []
    return [f"train.k: {params.train.k} configs per step, but the pool holds at most {pool_size} "
            f"(allocate.grid_size); lower train.k or raise allocate.grid_size"]


def rounds_within_steps(params: "Params") -> list[str]:
    """Every search round needs a training step of the joint run (``search.rounds`` ≤ its steps)."""
    from coalora.search.rounds import round_steps
    from coalora.train.methods import METHODS

    for name in pool_methods(params):
        try:
            round_steps(METHODS[name].steps(params.train, len(params.train.target_bits)), params.search.rounds)
        except UserError as exc:
            return [str(exc)]
    return []


def f1_within_held_out(params: "Params") -> list[str]:
    """On instruction data the search measures f1 on held-out rows: at most ``train.eval_sequences``."""
    n, held = params.search.f1_sequences, params.train.eval_sequences
    if params.train.data != "instruct" or n <= held or not pool_methods(params):
        return []
    return [f"search.f1_sequences: {n} rows, but instruction data holds out only train.eval_sequences = "
            f"{held}; lower it"]


PARAMS_CHECKS: list[Callable[["Params"], list[str]]] = [
    targets_within_budgets, k_within_pool, rounds_within_steps, f1_within_held_out,
]


def run_params_checks(params: "Params", source: str = "params.yaml") -> None:
    """Raise ParamsError listing every problem the ``PARAMS_CHECKS`` find (prefixed with ``source``)."""
    problems = [problem for check in PARAMS_CHECKS for problem in check(params)]
    if problems:
        raise ParamsError("\n".join(f"{source}: {problem}" for problem in problems))


def load_checked(root: Path | str, profile: str | None) -> "Params":
    """:func:`coalora.params.load_params` plus the ``PARAMS_CHECKS``, on params.yaml alone (what a run
    without the profile and ``dvc repro`` use) and on the merged params."""
    import os

    from coalora.params import load_params

    profile = profile if profile is not None else os.environ.get("COALORA_PROFILE") or None
    params = load_params(root, profile)
    if profile:
        run_params_checks(load_params(root, ""), f"params.yaml (on its own, whatever profiles/{profile}.yaml "
                                                 f"overrides)")
        run_params_checks(params, f"params.yaml + profiles/{profile}.yaml")
    else:
        run_params_checks(params)
    return params


# ---------------------------------------------------------------------------------------------------------
# Project checks
# ---------------------------------------------------------------------------------------------------------

class _TokenizerShape:
    """What the built-in model's config reads from its tokenizer, before the tokenizer exists."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_token_id = self.eos_token_id = self.pad_token_id = 0

    def __len__(self) -> int:
        return self.vocab_size


def model_skeleton(params: "Params", root: Path):
    """The base model without weights (on torch's meta device), or None when it cannot be had offline.

    built-in: from ``model.builtin``; a local folder or a hub id in the local cache: from its config.json.
    Nothing is downloaded: a model that is not available locally is the base_model stage's error to report.
    """
    import torch

    from coalora.params import BUILTIN_MODEL

    m = params.model
    with torch.device("meta"):
        if m.name_or_path == BUILTIN_MODEL:
            from transformers import LlamaForCausalLM

            from coalora.model.builtin import builtin_config

            return LlamaForCausalLM(builtin_config(m.builtin, _TokenizerShape(m.builtin.vocab_size)))
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, local_files_only=True)
            return AutoModelForCausalLM.from_config(config)
        except (OSError, ValueError) as exc:
            log.debug("target_modules check skipped: no local config for %s (%s)", m.name_or_path, exc)
            return None


def target_modules_match(params: "Params", root: Path) -> list[str]:
    """Every ``quant.target_modules`` entry matches a linear layer inside the base model's blocks."""
    from coalora.space import quantized_layers

    model = model_skeleton(params, root)
    if model is None:
        return []
    try:
        quantized_layers(model, params.quant.target_modules)
    except UserError as exc:
        return [str(exc)]
    return []


class ProjectCheck(NamedTuple):
    """A check of the params against the project; it concerns the stages reading any of ``sections``."""

    fn: Callable[["Params", Path], list[str]]
    sections: frozenset[str]


PROJECT_CHECKS: list[ProjectCheck] = [
    ProjectCheck(target_modules_match, frozenset({"quant"})),
]


def run_project_checks(params: "Params", root: Path | str, sections: set[str] | None = None) -> None:
    """Raise UserError listing every problem the ``PROJECT_CHECKS`` concerning ``sections`` find (the params
    sections of the stages about to run; None: all checks)."""
    problems = [problem for check in PROJECT_CHECKS if sections is None or check.sections & sections
                for problem in check.fn(params, Path(root))]
    if problems:
        raise UserError("\n".join(problems))


# ---------------------------------------------------------------------------------------------------------
# Writable project
# ---------------------------------------------------------------------------------------------------------

STATE = (".coalora",)


def check_writable(root: Path | str, outputs: tuple[str, ...] = (ARTIFACTS,)) -> None:
    """Raise UserError naming the first folder (or state file) a run must write but cannot.

    The root itself (where ``artifacts/`` and ``.coalora/`` are created), every folder below ``artifacts/``
    (a stage replaces its output folder by renaming, which needs write access to the folder itself) and
    ``.coalora/`` with its files (Prefect's and MLflow's databases). Checked before anything starts, so a
    read-only project fails in a second with one line instead of after a stage's work.
    """
    import os

    root = Path(root).resolve()
    candidates = [root]
    for top in (*outputs, *STATE):
        base = root / top
        if base.exists():
            candidates.append(base)
            candidates += [path for path in base.rglob("*") if path.is_dir() or path.parent == base]
    for path in candidates:
        if not os.access(path, os.W_OK):
            kind = "folder" if path.is_dir() else "file"
            raise UserError(f"{path}: {kind} is not writable; coalora writes stage outputs under artifacts/ and "
                            f"its state under .coalora/ of {root}: make them writable (chmod -R u+w), or run "
                            f"from a writable copy of the project")
