"""What training learns from and what it holds out: the split policy of ``train.data`` (METHOD.md §4).

    text      training batches: random windows of the C4-schema training text; the held-out batch: the FIRST
              ``train.eval_sequences`` windows of the validation text; the search's f1 slice: its LAST
              ``search.f1_sequences`` windows (the perplexity windows of the evaluation start at the front)
    instruct  the instruction rows minus the last ``train.eval_sequences``, which are held out; the f1 slice
              is the first ``search.f1_sequences`` held-out rows (the instruction data has no other held-out
              part)
"""

from __future__ import annotations

from pathlib import Path

from coalora.artifacts import read_jsonl
from coalora.errors import UserError
from coalora.params import Params


def training_data(params: Params, tokenizer, data_dir: Path):
    """(training batches, fixed held-out batch of (N, T) tensors) for ``train.data`` (module docstring).

    Raises:
        UserError: instruction data with no more rows than ``train.eval_sequences``.
    """
    from coalora.data import layout
    from coalora.train.batches import instruct_table, text_batches, text_windows

    p = params.train
    if p.data == "text":
        train = [row["text"] for row in read_jsonl(layout.data_file(data_dir, "c4_train"))]
        held = [row["text"] for row in read_jsonl(layout.data_file(data_dir, "c4_validation"))]
        return (text_batches(tokenizer, train, p.seq_len, p.batch_size),
                text_windows(tokenizer, held, p.seq_len, p.eval_sequences))
    rows = read_jsonl(layout.data_file(data_dir, "instruct"))
    if len(rows) <= p.eval_sequences:
        raise UserError(f"train.eval_sequences: {p.eval_sequences} held-out rows, but the instruction data has "
                        f"only {len(rows)}; lower it")
    train_rows, held_rows = rows[:-p.eval_sequences], rows[-p.eval_sequences:]
    return (instruct_table(tokenizer, train_rows, p.seq_len, p.batch_size),
            instruct_table(tokenizer, held_rows, p.seq_len, p.batch_size).all())


def f1_slice(params: Params, tokenizer, data_dir: Path) -> dict | None:
    """The fixed held-out slice search rounds measure f1 on, (n, T) tensors (module docstring); None when no
    method of ``train.methods`` has a pool.

    Raises:
        UserError: instruction data holding out fewer rows than ``search.f1_sequences``.
    """
    from coalora.data import layout
    from coalora.train.batches import instruct_table, tail_windows
    from coalora.train.methods import METHODS

    if not any(METHODS[name].has_pool for name in params.train.methods):
        return None
    p, n = params.train, params.search.f1_sequences
    if p.data == "text":
        held = [row["text"] for row in read_jsonl(layout.data_file(data_dir, "c4_validation"))]
        return tail_windows(tokenizer, held, p.seq_len, n, head=p.eval_sequences)
    if n > p.eval_sequences:
        raise UserError(f"search.f1_sequences: {n} rows, but instruction data holds out only "
                        f"train.eval_sequences = {p.eval_sequences}; lower it")
    rows = read_jsonl(layout.data_file(data_dir, "instruct"))[-p.eval_sequences:][:n]
    return instruct_table(tokenizer, rows, p.seq_len, p.batch_size).all()
