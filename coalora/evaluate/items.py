"""Per-item results of the evaluation table: ``items.safetensors``, the one writer and reader.

For every row (job id) and task, each benchmark item's correctness in document order, and for perplexity each
window's summed NLL over its T − 1 predicted tokens. These are what the report's paired bootstrap resamples:
every row of one evaluation is scored on the same items and windows, so a resample of item indices applies
to every row alike.

    <job>/<task>/acc        (n_task,) uint8     1 when lm-eval scored the item correct
    <job>/<task>/acc_norm   (n_task,) uint8     length-normalised accuracy (ARC only)
    <job>/ppl/window_nll    (W,) float64        Σ_t −log p(x_t | x_<t) over one window
    metadata "coalora.items"  {"tasks": [...], "tokens_per_window": T − 1}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

FILE = "items.safetensors"
META = "coalora.items"


def write_items(path: Path, rows: Sequence[dict], tasks: Sequence[str]) -> None:
    """Write every row's ``items`` (``row.score_row``) to one safetensors file.

    Raises:
        ValueError: rows disagree on the number of items of a task or on the window length (they would not
            be paired).
    """
    import torch
    from safetensors.torch import save_file

    tensors, tokens = {}, {r["items"]["ppl"]["tokens_per_window"] for r in rows}
    if len(tokens) > 1:
        raise ValueError(f"rows were scored with different perplexity windows: {sorted(tokens)} tokens")
    for task in tasks:
        sizes = {len(r["items"][task]["acc"]) for r in rows}
        if len(sizes) > 1:
            raise ValueError(f"rows were scored on different numbers of {task} items: {sorted(sizes)}")
    for r in rows:
        for task in tasks:
            for metric in ("acc", "acc_norm"):
                values = r["items"][task][metric]
                if values is not None:
                    tensors[f"{r['job']}/{task}/{metric}"] = torch.tensor(values, dtype=torch.uint8)
        tensors[f"{r['job']}/ppl/window_nll"] = torch.tensor(r["items"]["ppl"]["window_nll"], dtype=torch.float64)
    meta = {"tasks": list(tasks), "tokens_per_window": tokens.pop() if tokens else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={META: json.dumps(meta, sort_keys=True)})


def read_items(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """(job → {"<task>": acc (n,), "<task>_norm": acc_norm (n,), "ppl": window NLL (W,)}, metadata)."""
    from safetensors import safe_open

    out: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(path), framework="np") as f:
        meta = json.loads((f.metadata() or {})[META])
        for key in f.keys():
            job, task, metric = key.rsplit("/", 2)
            name = "ppl" if task == "ppl" else task if metric == "acc" else f"{task}_norm"
            out.setdefault(job, {})[name] = f.get_tensor(key)
    return out, meta
