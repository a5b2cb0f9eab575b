"""Progress of long loops: one live bar on a terminal, a line every so often in a log.

On a terminal (stderr is a TTY) a loop shows a tqdm bar that updates in place and disappears when the loop
ends. Anywhere else (CI, a Prefect worker, ``nohup``, a pipe) a bar would write a line per update, so a loop
logs a line every ``COALORA_PROGRESS_SECONDS`` seconds (default 60) while it runs and one when it ends,
between the stage lines (``stage X: running`` / ``done``).

The bars of the libraries underneath (lm-eval's per-request bars, ``datasets``' map and load bars,
``transformers``' weight-loading bar, ``huggingface_hub``'s download bars) are switched off in both modes by
:func:`quiet_libraries`: they are many short bars a second, which on a terminal scroll past the live one
and in a log make thousands of lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator

log = logging.getLogger("coalora.progress")

SECONDS_ENV = "COALORA_PROGRESS_SECONDS"
DEFAULT_SECONDS = 60.0
# Read at import by huggingface_hub (and transformers through it) and datasets; set before they are imported.
LIBRARY_SWITCHES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def interactive() -> bool:
    """Whether progress goes to a terminal (stderr is a TTY)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def interval() -> float:
    """Seconds between two progress lines when not on a terminal (``COALORA_PROGRESS_SECONDS``)."""
    try:
        return max(0.0, float(os.environ.get(SECONDS_ENV, DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def quiet_libraries() -> None:
    """Switch off the progress bars of huggingface_hub, transformers and datasets (env, before their import;
    and through their APIs when they are imported already). lm-eval's are switched off where it is called
    (:func:`coalora.evaluate.harness.run_benchmarks`)."""
    for key, value in LIBRARY_SWITCHES.items():
        os.environ.setdefault(key, value)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()


class LogProgress:
    """The subset of tqdm's interface the project uses, writing a log line at most every ``every`` seconds.

    A line: ``<desc>: <n>/<total> (<pct>%), <rate> it/s, <postfix>``; a last one when the loop ends.
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, every: float | None = None):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.n, self.start_n = desc, initial, initial
        self.every = interval() if every is None else every
        self.started = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.start_n) / elapsed
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s%s, %.2f it/s%s%s", self.desc, done, pct, rate, extra,
                 f", done in {elapsed:.1f} s" if final else "")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:  # an empty loop (nothing left to do on resume) says nothing
                self._line(final=True)


class _Off(LogProgress):
    """Progress switched off (``enabled=False``): counts, says nothing."""

    def _line(self, final: bool = False) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", initial: int = 0,
             unit: str = "it", enabled: bool = True):
    """A progress object for a loop (iterate it, or call ``update``/``set_postfix``/``close``).

    Args:
        iterable: what the loop walks (or None with ``total`` and manual ``update`` calls).
        total: the number of steps when ``iterable`` has no length.
        desc: the loop's label (``pretrain``, ``coalora joint``).
        initial: steps already done (a resumed loop).
        unit: tqdm's unit label.
        enabled: False: nothing is shown (a non-main rank, a job on a worker).

    Returns:
        a tqdm bar (``leave=False``) on a terminal, else a :class:`LogProgress`.
    """
    if not enabled:
        return _Off(iterable, total=total, desc=desc, initial=initial)
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, leave=False, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, initial=initial)
