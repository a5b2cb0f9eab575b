"""Progress: one live bar on a terminal, a line every so often in a log, never a line per tick."""

from __future__ import annotations

import logging
import os

import pytest

from coalora import progress as progress_module
from coalora.progress import LogProgress, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_writes_a_line_per_interval_and_one_at_the_end(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="coalora.progress")
    bar = LogProgress(total=1000, desc="pretrain", every=60.0)
    for _ in range(1000):  # 1000 ticks over 250 s: lines at 60, 120, 180, 240 s, and the last one
        clock.now += 0.25
        bar.update(1)
        bar.set_postfix(loss="1.000")
    bar.close()
    bar.close()  # idempotent
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[0].startswith("pretrain: 240/1000 (24%), 4.00 it/s, loss 1.000")
    assert lines[-1] == "pretrain: 1000/1000 (100%), 4.00 it/s, loss 1.000, done in 250.0 s"


def test_iterating_logs_and_an_empty_loop_says_nothing(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "interactive", lambda: False)
    caplog.set_level(logging.INFO, logger="coalora.progress")
    assert list(progress(range(3), desc="cost table")) == [0, 1, 2]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["cost table: 3/3 (100%)"]
    caplog.clear()
    progress(total=5, initial=5, desc="resumed").close()  # nothing left to do on a resume
    assert list(progress(range(2), desc="off", enabled=False)) == [0, 1]  # off: counts, says nothing
    assert caplog.records == []


@pytest.mark.parametrize("tty", [True, False])
def test_a_terminal_gets_a_live_bar(monkeypatch, tty):
    from tqdm.auto import tqdm

    monkeypatch.setattr(progress_module, "interactive", lambda: tty)
    bar = progress(total=3, desc="train")
    assert isinstance(bar, tqdm) is tty and (not tty or bar.leave is False)
    bar.close()


def test_library_bars_are_switched_off(monkeypatch):
    for key in progress_module.LIBRARY_SWITCHES:
        monkeypatch.delenv(key, raising=False)
    import datasets
    import transformers

    progress_module.quiet_libraries()
    assert all(os.environ[key] == "1" for key in progress_module.LIBRARY_SWITCHES)
    assert not datasets.is_progress_bar_enabled()
    assert not transformers.utils.logging.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()
