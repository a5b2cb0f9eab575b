"""Process-wide state for a block (coalora.threads): the thread-count policy and reference-counted patches."""

from __future__ import annotations

import threading

import torch

from coalora.threads import SERIAL_NUMEL, SharedPatch, one_torch_thread, serial_below


def test_a_shared_patch_is_applied_by_the_first_block_and_undone_by_the_last_across_threads():
    state = {"value": "original", "applied": 0, "undone": 0}

    def apply():
        state["applied"] += 1
        saved, state["value"] = state["value"], "patched"
        return saved

    def undo(saved):
        state["undone"] += 1
        state["value"] = saved

    patch = SharedPatch(apply, undo)
    inside, release = threading.Barrier(4), threading.Event()
    seen = []

    def block():
        with patch:
            inside.wait()           # all four blocks overlap
            seen.append(state["value"])
            release.wait()

    workers = [threading.Thread(target=block) for _ in range(3)]
    for w in workers:
        w.start()
    with patch:
        inside.wait()
        release.set()
        for w in workers:
            w.join()
        assert state["value"] == "patched"  # the other blocks left; this one still holds the patch
    assert seen == ["patched"] * 3 and state == {"value": "original", "applied": 1, "undone": 1}


def test_thread_count_policy():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread():
            with one_torch_thread():
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1  # the outer block still holds it
        assert torch.get_num_threads() == 2
        with serial_below(SERIAL_NUMEL - 1):
            assert torch.get_num_threads() == 1  # too small to split
        with serial_below(SERIAL_NUMEL):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
