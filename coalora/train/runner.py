"""Train one method (a row of ``methods.METHODS``): its runs, resumable from ``work/<run>/``.

A method is one or more *runs* (one Trainer each): a joint method has one run (``joint``) over the pool
(coalora) or the targets (shared); a per-config method one run per target config, named by its config
id, each starting afresh (LoRA re-initialised, new optimizer) with the same seed, so every target sees the
same initial A and the same batch sequence; qlora-bnb one run at the uniform NF4 config.

Every run checkpoints into ``work/<run>/step-N/``; a finished run leaves ``work/<run>/final/`` (adapter and
record, digest-verified), so a resumed method skips finished runs and continues the interrupted one.
Before training, each run scores the fixed held-out batch under each of its configs ("before"); after
training again ("after"): the loss-lowering check and the figures of the summary.

A pool method (coalora and its ablations) trains in segments between search rounds (``coalora.search``):
the round state lives in ``Trainer.extra["search"]``, so it is checkpointed with the weights, and a
checkpoint is also written right after each round, so a resumed run does not redo finished rounds.

Under ``accelerate launch`` (``coalora.parallel``) every rank runs all of this with the same seeds; the main
process alone writes checkpoints and final records, and its search-round result is the one every rank uses.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from coalora import parallel
from coalora.model import rebuild
from coalora.model.rebuild import Recipe
from coalora.params import LoraParams, SearchParams, TrainParams
from coalora.search import RoundSetup, pool_configs, round_steps, search_round
from coalora.search.rounds import new_state
from coalora.space import Config, Layers
from coalora.train import checkpoint as ckpt
from coalora.train.batches import Batches
from coalora.train.loop import LoopSettings, Trainer, eval_losses
from coalora.train.methods import Method

log = logging.getLogger("coalora.train")

JOINT = "joint"
FINAL_TAIL = 10  # final_loss: the mean training loss over the last 1/10 of a run's steps


@dataclass
class TrainSetup:
    """Everything a method's runs share.

    Attributes:
        params, lora, seed: ``train``, ``lora`` and ``seed`` of params.yaml.
        load_model: returns a fresh full-precision base model (each method gets its own copy).
        layers: the quantized layers (name → (out, in)).
        pool: the training pool (coalora draws from it).
        targets: the target set (module docstring of ``targets``).
        batches: the training batch source.
        eval_batch: the fixed held-out batch, (N, T) tensors.
        progress: show progress bars.
        search: ``search`` of params.yaml (needed by the pool methods only).
        f1_batch: the fixed held-out slice f1 is measured on in search rounds, (n, T) tensors.
        unseen: the common unseen set: the search never proposes these (no method may draw them).
    """

    params: TrainParams
    lora: LoraParams
    seed: int
    load_model: Callable[[], torch.nn.Module]
    layers: Layers
    pool: list[Config]
    targets: list[Config]
    batches: Batches
    eval_batch: dict[str, torch.Tensor]
    progress: bool = True
    search: SearchParams | None = None
    f1_batch: dict[str, torch.Tensor] | None = None
    unseen: list[Config] = field(default_factory=list)


@dataclass
class RunResult:
    """One finished run: its adapter, and what train.json records of it (``search``: a pool method's round
    state, ``coalora.search.rounds``: seen configs with f1, the final pool ids, the per-round log)."""

    name: str
    configs: list[str]
    steps: int
    seconds: float
    losses: list[tuple[int, float]]
    draws: dict[str, int]
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    adapter: dict[str, torch.Tensor]
    search: dict | None = None

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // FINAL_TAIL):]
        return sum(loss for _, loss in tail) / len(tail)

    def record(self) -> dict:
        return {"name": self.name, "configs": self.configs, "steps": self.steps, "seconds": self.seconds,
                "losses": self.losses, "draws": self.draws, "eval_before": self.eval_before,
                "eval_after": self.eval_after, "search": self.search}


@dataclass
class MethodResult:
    """A method's runs (empty and ``skipped`` set when it cannot run here), and its adapter files' header
    (LoRA settings, θ vocabularies, layers: what a reader needs beside the tensors)."""

    method: Method
    runs: list[RunResult] = field(default_factory=list)
    skipped: str | None = None
    header: dict = field(default_factory=dict)


def run_plan(method: Method, setup: TrainSetup) -> list[tuple[str, list[Config], list[Config]]]:
    """(run name, configs drawn from, configs scored) for each run of the method."""
    if method.runs == "joint":
        sample = setup.pool if method.sample_from == "pool" else setup.targets
        return [(JOINT, list(sample), list(setup.targets))]
    if method.runs == "uniform":
        from coalora.model.bnb_lora import uniform_config

        config = uniform_config(setup.layers)
        return [(config.id, [config], [config])]
    return [(c.id, [c], [c]) for c in setup.targets]


def build_model(method: Method, setup: TrainSetup):
    """A fresh trainable model for the method (``coalora.model.rebuild``: CoAModel, or peft LoRA on NF4)."""
    return rebuild.build(Recipe.of(method, setup.seed), setup.load_model(), setup.layers, setup.lora)


def init_run(model, method: Method, seed: int) -> None:
    """Start a run afresh: LQ-LoRA's SVD init with the residual as the quantized base, or A random, B = 0."""
    rebuild.start(model, Recipe.of(method, seed))


def train_method(method: Method, setup: TrainSetup, work: Path,
                 on_step: Callable[[Trainer], None] | None = None) -> MethodResult:
    """Train every run of the method, resuming from ``work`` (finished runs are loaded, not retrained).

    Args:
        method: the table row.
        setup: the shared inputs.
        work: the method's checkpoint folder (``ctx.work/<method>``).
        on_step: passed to :meth:`Trainer.run` (tests use it to interrupt a run).
    """
    recipe = Recipe.of(method, setup.seed)
    if (reason := rebuild.backend(recipe).unavailable()) is not None:
        log.warning("%s skipped: %s", method.name, reason)
        return MethodResult(method, skipped=reason)
    model = parallel.to_device(build_model(method, setup))  # launched: onto this rank's device before any init
    result = MethodResult(method, header=rebuild.adapter_header(model, recipe))
    try:
        for name, sample, scored in run_plan(method, setup):
            result.runs.append(train_run(model, method, setup, name, sample, scored, Path(work) / name, on_step))
    finally:
        parallel.release()  # launched: drop the DDP wrapper and optimizers of this method's model
    return result


def _settings(method: Method, setup: TrainSetup) -> LoopSettings:
    p = setup.params
    return LoopSettings(lr=p.lr, grad_clip=p.grad_clip, k=method.k(p), checkpoint_every=p.checkpoint_every,
                        seed=setup.seed)


def train_run(model, method: Method, setup: TrainSetup, name: str, sample: list[Config], scored: list[Config],
              run_dir: Path, on_step: Callable[[Trainer], None] | None = None) -> RunResult:
    """One run: load it when finished, else init → resume or score "before" → train → score "after" → save."""
    if (done := parallel.main_first(lambda: _load_final(run_dir, name))) is not None:
        log.info("%s %s: finished earlier, loaded from %s", method.name, name, run_dir)
        return done
    init_run(model, method, setup.seed)
    chunk = setup.params.batch_size
    trainer = Trainer(model, setup.batches, _settings(method, setup), run_dir,
                      desc=f"{method.name} {name}", progress=setup.progress)
    identity = {"method": method.name, "run": name, "configs": [c.id for c in scored]}
    if trainer.resume():
        if {k: trainer.extra.get(k) for k in identity} != identity:
            raise ckpt.CheckpointError(f"checkpoint in {run_dir} belongs to {trainer.extra.get('method')} run "
                                       f"{trainer.extra.get('run')}, not {method.name} {name}; delete it")
    else:
        trainer.extra = {**identity, "runs_done": sorted(p.parent.name for p in run_dir.parent.glob("*/final")),
                         "eval_before": eval_losses(model, scored, setup.eval_batch, chunk)}
        if method.has_pool:  # the targets stay in the pool; the unseen set is never proposed
            trainer.extra["search"] = new_state(sample, keep=setup.targets, excluded=setup.unseen)
    if method.has_pool:
        train_with_search(trainer, method, setup, on_step)
    else:
        trainer.run(method.steps(setup.params, len(setup.targets)), sample, on_step)
    after = eval_losses(model, scored, setup.eval_batch, chunk)
    result = RunResult(name, [c.id for c in scored], trainer.step, round(trainer.seconds, 3), trainer.losses,
                       trainer.draws, trainer.extra["eval_before"], after, model.adapter_state_dict(),
                       trainer.extra.get("search"))
    if parallel.is_main():
        ckpt.write_checkpoint(run_dir / ckpt.FINAL, {"adapter": result.adapter}, result.record())
        ckpt.prune(run_dir, keep=0)  # the final record replaces the step checkpoints
    parallel.wait()
    return result


def train_with_search(trainer: Trainer, method: Method, setup: TrainSetup,
                      on_step: Callable[[Trainer], None] | None = None) -> None:
    """Train a pool method in segments, a search round at each segment's end (``search.round_steps``),
    continuing after the last round recorded in ``trainer.extra["search"]``.

    Raises:
        ValueError: the setup lacks ``search`` or ``f1_batch`` (a programming error, not user input).
    """
    if setup.search is None or setup.f1_batch is None:
        raise ValueError(f"{method.name} runs search rounds: TrainSetup needs search and f1_batch")
    state = trainer.extra["search"]
    steps = round_steps(method.steps(setup.params, len(setup.targets)), setup.search.rounds)
    k, chunk = method.k(setup.params), setup.params.batch_size

    def evaluate(configs: list[Config]) -> dict[str, float]:
        return eval_losses(trainer.model, configs, setup.f1_batch, chunk)

    rounds = RoundSetup(method.search, evaluate, setup.layers, setup.search, k, setup.seed)
    for r in range(len(state["rounds"]), len(steps)):
        trainer.run(steps[r], pool_configs(state, setup.layers), on_step)
        entry = search_round(state, rounds, r, steps[r], final=r == len(steps) - 1)
        if parallel.launched():  # every rank computed the round; all go on with the main process's result
            state.update(parallel.broadcast(state))
            entry = state["rounds"][-1]
        log.info("%s round %d at step %d: pool %d, front %d, hypervolume %.4f, proposed %d (%.1f s)", method.name,
                 r, steps[r], len(entry["pool"]), len(entry["front"]), entry["hypervolume"], len(entry["proposed"]),
                 entry["seconds"])
        if trainer.run_dir is not None:
            trainer.save()  # the round's result is part of the state: a resume starts after it


def _load_final(run_dir: Path, name: str) -> RunResult | None:
    """A finished run's result, or None (a corrupt final record is deleted, with a warning, and the run redone)."""
    final = run_dir / ckpt.FINAL
    if not final.is_dir():
        return None
    try:
        found = ckpt.read_checkpoint(final)
    except ckpt.CheckpointError as exc:
        log.warning("%s; training run %s again", exc, name)
        shutil.rmtree(final)
        return None
    s = found.state
    return RunResult(s["name"], s["configs"], s["steps"], s["seconds"], [(int(a), float(b)) for a, b in s["losses"]],
                     s["draws"], s["eval_before"], s["eval_after"], found.tensors["adapter"], s.get("search"))
