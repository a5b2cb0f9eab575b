"""Process-wide state changed for the length of a block: torch's intra-op thread count, shared patches.

    serial_below     one intra-op thread for ops too small to split (the thread-count policy)
    one_torch_thread one intra-op thread for a block that may run in several threads at once
    SharedPatch      a process-wide change applied by the first of overlapping blocks, undone by the last

Both changes are process-wide while the blocks that want them may overlap (rows scored in parallel threads),
so they are reference-counted under a lock: applied once on entering the first block, undone once on leaving
the last.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

# Below this many elements a matrix is quantized on one thread: its ops are too small to split, and each
# OpenMP parallel region costs a barrier — milliseconds when the cores are busy (measured: a 128×352
# quantize took 1.7 ms on 1 thread and 80 ms on 2 on a loaded 2-core machine; see benchmarks/train_step.md).
SERIAL_NUMEL = 1 << 18


class SharedPatch:
    """A process-wide change made by ``apply`` (returning what ``undo`` needs) for overlapping blocks.

    ``with patch:`` applies it on entering the first block and undoes it on leaving the last, under a lock,
    so blocks run in parallel threads never undo it under each other's feet and it is undone exactly once.
    """

    def __init__(self, apply: Callable[[], Any], undo: Callable[[Any], None]):
        self._apply, self._undo = apply, undo
        self._lock = threading.Lock()
        self._depth, self._saved = 0, None

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = self._apply()
            self._depth += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._undo(self._saved)
                self._saved = None


def _one_thread() -> int:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


def _restore_threads(before: int) -> None:
    import torch

    torch.set_num_threads(before)


_ONE_THREAD = SharedPatch(_one_thread, _restore_threads)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the previous count (after the last of overlapping
    blocks: :class:`SharedPatch`)."""
    with _ONE_THREAD:
        yield


@contextlib.contextmanager
def serial_below(numel: int, threshold: int = SERIAL_NUMEL) -> Iterator[None]:
    """Run the block on one intra-op thread when ``numel < threshold`` (then restore the thread count, after
    the last of overlapping blocks, as :func:`one_torch_thread` does)."""
    if numel >= threshold:
        yield
        return
    with _ONE_THREAD:
        yield
