"""Data-parallel training under ``accelerate launch`` (Hugging Face accelerate, DDP underneath).

A process started on its own (``coalora stage train``, ``coalora run``) never imports accelerate: every
function here is then a no-op or answers "one process", and training is exactly the single-process loop.
A process started by a distributed launcher (``accelerate launch --multi_gpu --num_processes N -m
coalora.cli stage train``; torchrun, mpirun) is one of N ranks:

- every rank builds the same model and draws the same configs and the same batches (same seeds); each
  trains on its own rows of every batch (:func:`shard`), and DDP (``Accelerator.prepare``) averages the
  gradients, so the N ranks take one optimizer step on the whole batch and keep identical weights;
- only the main process writes (checkpoints, the stage's output folder); the others wait for it
  (``wait_for_everyone``, ``main_process_first``).

On a machine without CUDA the ranks run on CPU with the gloo backend (accelerate's MULTI_CPU): the same
launch command is the local test mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, TypeVar

from coalora.errors import UserError

T = TypeVar("T")
log = logging.getLogger("coalora.parallel")

# What launchers set: torchrun / accelerate launch (WORLD_SIZE), MPI implementations (the rest); the same
# variables accelerate reads to decide on a distributed run.
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size() -> int:
    """The number of processes the launcher started (1 when started on its own)."""
    for name in WORLD_SIZE_VARS:
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def launched() -> bool:
    """True when this process is one rank of a multi-process launch."""
    return world_size() > 1


_accelerator = None  # the process's Accelerator, made on first use under a launch


def accelerator():
    """The process's ``accelerate.Accelerator`` under a multi-process launch, else None.

    Without CUDA the ranks run on CPU (``cpu=True``: gloo). Buffers are not broadcast at every forward
    (``broadcast_buffers=False``): the quantized weights W̃ are buffers that every rank computes itself from
    the same config, so sending rank 0's copies would only cost time.
    """
    global _accelerator
    if not launched():
        return None
    if _accelerator is not None:
        return _accelerator
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    log.info("data-parallel: rank %d of %d (%s, %s backend, device %s)", acc.process_index, acc.num_processes,
             acc.distributed_type.value, acc.state.backend, acc.device)
    _accelerator = acc
    return acc


def is_main() -> bool:
    """True on the process that writes (the only process when not launched)."""
    acc = accelerator()
    return acc is None or acc.is_main_process


def wait() -> None:
    """Every rank waits here until all have arrived (no-op when not launched)."""
    if (acc := accelerator()) is not None:
        acc.wait_for_everyone()


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on the main process first, then on the others (reads of what the main one may write)."""
    if (acc := accelerator()) is None:
        return fn()
    with acc.main_process_first():
        return fn()


def finish() -> None:
    """End of a launched process: wait for every rank, then shut the process group down cleanly."""
    if (acc := accelerator()) is not None:
        acc.wait_for_everyone()
        acc.end_training()


def check_batch_size(batch_size: int) -> None:
    """Every rank takes an equal share of each batch: ``train.batch_size`` must be a multiple of the ranks."""
    n = world_size()
    if batch_size % n:
        raise UserError(f"train.batch_size: {batch_size} rows cannot be split evenly over {n} processes; "
                        f"use a multiple of {n} (or launch {n} processes that divide it)")


# ---------------------------------------------------------------------------------------------------------
# The training loop's side (coalora.train.loop.Trainer)
# ---------------------------------------------------------------------------------------------------------

_prepared: dict[int, Any] = {}  # id(model) → its DDP wrapper: a model is wrapped once, however many runs


def prepare(model, optimizer):
    """(DDP-wrapped model, AcceleratedOptimizer) through ``Accelerator.prepare``.

    A model trained in several runs (per-config methods re-initialise the same module) keeps the wrapper
    of its first run; :func:`release` drops the wrappers when the method is done.
    """
    acc = accelerator()
    if id(model) not in _prepared:
        _prepared[id(model)] = acc.prepare(model)
    return _prepared[id(model)], acc.prepare(optimizer)


def release() -> None:
    """Drop every wrapper and accelerate's references to models and optimizers (no-op when not launched)."""
    if (acc := accelerator()) is not None:
        _prepared.clear()
        acc.free_memory()


DEVICE_ENV = "COALORA_DEVICE"


def compute_device():
    """The device a process started on its own computes on: ``$COALORA_DEVICE`` (``cpu``, ``cuda``,
    ``cuda:N``), else the first GPU when there is one, else the CPU. Under a launch: the rank's device."""
    import torch

    if (acc := accelerator()) is not None:
        return acc.device
    wanted = os.environ.get(DEVICE_ENV)
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError:
            raise UserError(f"{DEVICE_ENV}: {wanted!r} is not a device; allowed: cpu, cuda, cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{DEVICE_ENV}: {wanted!r}, but torch sees no CUDA device here; use cpu")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(module):
    """Move a module to the compute device (this rank's under a launch; CPU stays CPU)."""
    device = compute_device()
    return module if device.type == "cpu" else module.to(device)


def on_device(batch: dict) -> dict:
    """The batch's tensors on the compute device (the batch itself on the CPU)."""
    device = compute_device()
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def shard(batch: dict) -> dict:
    """This rank's rows of a batch (rank r of N: rows r·B/N … (r+1)·B/N − 1), on its device."""
    acc = accelerator()
    n, r = acc.num_processes, acc.process_index
    rows = len(batch["input_ids"])
    check_batch_size(rows)
    size = rows // n
    return on_device({k: v[r * size:(r + 1) * size] for k, v in batch.items()})


def no_sync(net, sync: bool):
    """Context for one forward/backward: gradients stay local unless ``sync`` (the step's last backward)."""
    return contextlib.nullcontext() if sync else accelerator().no_sync(net)


def mean(value: float) -> float:
    """The mean of a per-rank number over all ranks."""
    import torch

    acc = accelerator()
    return float(acc.reduce(torch.tensor([value], dtype=torch.float64, device=acc.device), "mean")[0])


def broadcast(obj: T) -> T:
    """The main process's ``obj`` on every rank (JSON-like objects)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


@contextlib.contextmanager
def stage_output(atomic: Callable[[], contextlib.AbstractContextManager]) -> Iterator:
    """The main process writes through ``atomic()`` (the stage's atomic output folder); the others write
    into a throwaway temporary folder, removed on exit."""
    if is_main():
        with atomic() as tmp:
            yield tmp
        return
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix=f"coalora-rank{accelerator().process_index}-") as tmp:
        yield Path(tmp)
