"""The one training loop, for CoA-LoRA and every baseline (METHOD.md §4, §6).

A :class:`Trainer` is one training run: a model, AdamW over its trainable parameters, a batch source and
two seeded generators (batches; configs). Each step draws ``k`` configs from the pool it is given, runs
the same batch under each and sums the losses,

    loss = Σ_{j=1..k} LM-loss(batch | model quantized with C_j)       (k = 1: a plain LoRA step)

then clips the gradient norm and takes one AdamW step (lr constant). :meth:`Trainer.run` trains from the
current step to ``end_step`` with the pool passed in, so a caller can train in rounds and change the pool
between them (the Pareto search does). With a ``run_dir`` it checkpoints every ``checkpoint_every`` steps
and :meth:`Trainer.resume` continues from the newest intact checkpoint with exactly the state an
uninterrupted run would have had (weights, AdamW moments, every RNG), so the end weights are identical.

Under ``accelerate launch`` (``coalora.parallel``) each rank draws the same configs and batches, runs its own
rows of the batch through the DDP-wrapped model and lets accelerate average the gradients; only the main
process writes checkpoints. Started on its own, the loop never touches accelerate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from coalora import interrupt, parallel
from coalora.errors import UserError
from coalora.progress import progress
from coalora.space import Config
from coalora.train import checkpoint as ckpt
from coalora.train.batches import IGNORE, Batches

log = logging.getLogger("coalora.train")

WEIGHT_DECAY = 0.0  # METHOD.md states none; 0 is the usual LoRA choice (peft/HF Trainer default)
CONFIG_SEED_OFFSET = 1  # the config sampler's seed is seed + 1: independent of the batch stream
RUNNING_DECAY = 0.9  # the progress bar shows an exponential moving average of the loss (a step's is noisy)


class Trainable(Protocol):
    """What the loop needs of a model (CoAModel, and the bitsandbytes wrapper, both provide it)."""

    def set_config(self, config: Config) -> None: ...
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...
    def adapter_state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor]) -> None: ...
    def train(self, mode: bool = True): ...
    def eval(self): ...
    def __call__(self, **batch): ...


@dataclass(frozen=True)
class LoopSettings:
    """The hyperparameters of one run (from ``train``): lr, grad_clip, k, checkpoint_every, seed."""

    lr: float
    grad_clip: float
    k: int
    checkpoint_every: int
    seed: int


@dataclass
class Trainer:
    """One training run. Build it, optionally :meth:`resume`, then :meth:`run` (possibly several times).

    Attributes:
        model: the model being trained (modified in place).
        batches: the batch source.
        settings: hyperparameters.
        run_dir: where checkpoints go (None: no checkpoints).
        extra: JSON-able caller state saved with every checkpoint and restored on resume.
        desc: the progress bar's label.
        step, losses (step, mean loss per config), seconds, draws (config id → steps trained under it):
            progress so far (restored on resume).
    """

    model: Trainable
    batches: Batches
    settings: LoopSettings
    run_dir: Path | None = None
    extra: dict = field(default_factory=dict)
    desc: str = "train"
    progress: bool = True
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    draws: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = list(self.model.trainable_parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=self.settings.lr, weight_decay=WEIGHT_DECAY)
        self.batch_gen = torch.Generator().manual_seed(self.settings.seed)
        self.config_gen = torch.Generator().manual_seed(self.settings.seed + CONFIG_SEED_OFFSET)
        self.pool_ids: list[str] = []
        # under a multi-process launch: the DDP-wrapped model and the AcceleratedOptimizer (None otherwise)
        self.net, self.stepper = (parallel.prepare(self.model, self.optimizer) if parallel.launched()
                                  else (None, None))

    # ---- one step ----------------------------------------------------------------------------------------

    def choose(self, pool: Sequence[Config]) -> list[Config]:
        """``k`` distinct configs of the pool, drawn by the config generator."""
        self.check_pool(pool)
        return [pool[int(i)] for i in torch.randperm(len(pool), generator=self.config_gen)[:self.settings.k]]

    def check_pool(self, pool: Sequence[Config]) -> None:
        """Raise a UserError naming ``train.k`` when the pool holds fewer than ``k`` configs."""
        if self.settings.k > len(pool):
            raise UserError(f"train.k: {self.settings.k} configs per step, but the pool holds only {len(pool)}; "
                            f"lower train.k or enlarge the pool")

    def train_step(self, configs: Sequence[Config]) -> float:
        """One optimizer step on one batch under every config; returns the mean loss per config."""
        batch = self.batches.sample(self.batch_gen)  # (B, T) tensors, drawn on the CPU (the same on any device)
        if self.net is not None:
            return self._parallel_step(batch, configs)
        batch = parallel.on_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for config in configs:
            self.draws[config.id] = self.draws.get(config.id, 0) + 1
            self.model.set_config(config)
            loss = self.model(**batch).loss
            loss.backward()  # backward per config: gradients add up to those of Σ_j loss_j, one graph at a time
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.optimizer.step()
        return total / len(configs)

    def _parallel_step(self, batch: dict[str, torch.Tensor], configs: Sequence[Config]) -> float:
        """:meth:`train_step` as one rank of a data-parallel launch: this rank's rows (B/N, T) through the DDP
        model; the gradients stay local until the last config's backward, which averages the summed gradients
        over the ranks (one all-reduce per step). Returns the mean loss per config, averaged over the ranks."""
        acc = parallel.accelerator()
        part = parallel.shard(batch)  # (B/N, T) tensors on this rank's device
        self.stepper.zero_grad(set_to_none=True)
        total = 0.0
        for j, config in enumerate(configs):
            self.draws[config.id] = self.draws.get(config.id, 0) + 1
            self.model.set_config(config)
            with parallel.no_sync(self.net, sync=j == len(configs) - 1):
                loss = self.net(**part).loss
                acc.backward(loss)
            total += float(loss.detach())
        acc.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.stepper.step()
        return parallel.mean(total / len(configs))

    # ---- many steps --------------------------------------------------------------------------------------

    def run(self, end_step: int, pool: Sequence[Config],
            on_step: Callable[["Trainer"], None] | None = None) -> "Trainer":
        """Train from the current step up to ``end_step`` with configs drawn from ``pool``.

        Args:
            end_step: the step count to stop at (exclusive bound of the steps taken here).
            pool: the configs to draw from (the caller may pass a new pool for every round).
            on_step: called after every step (and after its checkpoint, if one is due).
        """
        self.check_pool(pool)  # before any work
        self.pool_ids = [c.id for c in pool]
        self.model.train()
        bar = progress(total=end_step, initial=self.step, desc=self.desc, enabled=self.progress)
        running = None
        try:
            while self.step < end_step:
                interrupt.check()  # a stop request ends the run here, between steps (coalora.interrupt)
                started = time.perf_counter()
                loss = self.train_step(self.choose(pool))
                self.step += 1
                self.seconds += time.perf_counter() - started
                self.losses.append((self.step, loss))
                running = loss if running is None else RUNNING_DECAY * running + (1 - RUNNING_DECAY) * loss
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if self.run_dir is not None and self.step % self.settings.checkpoint_every == 0:
                    self.save()
                if on_step is not None:
                    on_step(self)
        finally:
            bar.close()
        return self

    # ---- checkpoints -------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Checkpoint the run at its current step (keeps the last two); launched: the main process writes."""
        if not parallel.is_main():
            parallel.wait()
            return self.run_dir / ckpt.step_name(self.step)
        tensors, meta = ckpt.optimizer_state(self.optimizer)
        state = {"step": self.step, "losses": self.losses, "seconds": self.seconds, "draws": self.draws,
                 "pool_ids": self.pool_ids,
                 "optimizer": meta, "host_rng": ckpt.host_rng_state(), "extra": self.extra}
        folder = ckpt.write_checkpoint(self.run_dir / ckpt.step_name(self.step), {
            "adapter": self.model.adapter_state_dict(),
            "optimizer": tensors,
            "rng": ckpt.rng_tensors(self._generators()),
        }, state)
        ckpt.prune(self.run_dir)
        parallel.wait()
        return folder

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint in ``run_dir``; False when there is none."""
        if self.run_dir is None:
            return False
        # launched: the main process reads first (it renames a corrupt checkpoint away), then the others
        found = parallel.main_first(lambda: ckpt.latest_checkpoint(self.run_dir))
        if found is None:
            return False
        self.restore(found)
        log.info("%s: resumed at step %d from %s", self.desc, self.step, found.path)
        return True

    def restore(self, found: ckpt.Checkpoint) -> None:
        """Load a checkpoint's weights, optimizer, RNG states and progress into this run."""
        self.model.load_adapter_state_dict(found.tensors["adapter"])
        ckpt.load_optimizer_state(self.optimizer, found.tensors.get("optimizer", {}), found.state["optimizer"])
        ckpt.load_rng_tensors(self._generators(), found.tensors["rng"])
        ckpt.load_host_rng_state(found.state["host_rng"])
        self.step = found.state["step"]
        self.losses = [(int(s), float(v)) for s, v in found.state["losses"]]
        self.seconds = found.state["seconds"]
        self.draws = found.state["draws"]
        self.pool_ids = found.state["pool_ids"]
        self.extra = found.state["extra"]

    def _generators(self) -> dict[str, torch.Generator]:
        return {"batches": self.batch_gen, "configs": self.config_gen}


@torch.no_grad()
def eval_losses(model: Trainable, configs: Sequence[Config], batch: dict[str, torch.Tensor],
                chunk: int) -> dict[str, float]:
    """The LM loss on a fixed batch under each config (token-weighted mean over chunks of ``chunk`` rows).

    Returns:
        config id → loss. Eval mode; draws from no generator, so it leaves the training stream untouched.
    """
    model.eval()
    losses = {}
    n = len(batch["input_ids"])
    for config in configs:
        interrupt.check()
        model.set_config(config)
        total, count = 0.0, 0
        for start in range(0, n, chunk):
            part = parallel.on_device({key: value[start:start + chunk] for key, value in batch.items()})
            tokens = int((part["labels"][:, 1:] != IGNORE).sum())  # the predictions the loss averages
            total += float(model(**part).loss) * tokens
            count += tokens
        losses[config.id] = total / count
    return losses
