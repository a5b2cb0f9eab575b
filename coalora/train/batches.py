"""Language-model batches for fine-tuning: packed text windows, or instruction data with response-only loss.

Both sources are tokenised once into tensors; a batch is then an index draw from a ``torch.Generator``, so
the batch sequence is a pure function of the generator's state (saved in every checkpoint, which is what
makes a resumed run identical to an uninterrupted one). A batch is the dict a causal LM takes:

    input_ids       (B, T) int64
    attention_mask  (B, T) int64, 0 on padding
    labels          (B, T) int64, −100 where no loss is taken (padding; the prompt of instruction data)

``labels`` equal ``input_ids`` where the loss counts; the model shifts them by one position itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from coalora.errors import UserError

IGNORE = -100  # the label transformers' cross-entropy skips
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class Batches(Protocol):
    """A source of training batches."""

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]: ...


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def pack_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(N,) int64: every text's tokens followed by EOS, concatenated."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in _encode(tokenizer, texts):
        stream += ids + eos
    return torch.tensor(stream, dtype=torch.int64)


@dataclass
class TextBatches:
    """Random windows of ``seq_len`` tokens from one packed stream (C4-schema text, LM loss on every token).

    Attributes:
        stream: (N,) token ids, N ≥ seq_len.
        seq_len: T.
        batch_size: B.
    """

    stream: torch.Tensor
    seq_len: int
    batch_size: int

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(self.stream) - self.seq_len + 1, (self.batch_size,), generator=generator)
        ids = self.stream[starts[:, None] + torch.arange(self.seq_len)]  # (B, T)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@dataclass
class TableBatches:
    """Rows drawn from pre-tokenised, right-padded tensors (instruction data; also fixed eval batches).

    Attributes:
        input_ids, attention_mask, labels: (N, T) each.
        batch_size: B rows per sample, drawn uniformly with replacement.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    batch_size: int

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = torch.randint(0, len(self.input_ids), (self.batch_size,), generator=generator)
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "labels": self.labels[rows]}

    def all(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


def text_batches(tokenizer, texts: Sequence[str], seq_len: int, batch_size: int) -> TextBatches:
    """Training batches from C4-schema text.

    Raises:
        UserError: naming ``train.seq_len`` when the text holds fewer tokens than one window.
    """
    stream = pack_stream(tokenizer, texts)
    if len(stream) < seq_len:
        raise UserError(f"train.seq_len: {seq_len} tokens, but the training text has only {len(stream)}")
    return TextBatches(stream, seq_len, batch_size)


def text_windows(tokenizer, texts: Sequence[str], seq_len: int, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` non-overlapping windows of the packed text: a fixed (no randomness) eval batch.

    Raises:
        UserError: naming ``train.eval_sequences`` when the text is too short.
    """
    stream = pack_stream(tokenizer, texts)
    if len(stream) < n * seq_len:
        raise UserError(f"train.eval_sequences × train.seq_len = {n} × {seq_len} tokens, but the held-out text "
                        f"has only {len(stream)}; lower them")
    ids = stream[: n * seq_len].view(n, seq_len)  # (n, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tail_windows(tokenizer, texts: Sequence[str], seq_len: int, n: int, head: int) -> dict[str, torch.Tensor]:
    """The LAST ``n`` non-overlapping windows of the packed text: the fixed slice search rounds measure f1 on.

    Taken from the end so it stays apart from the first windows, which the held-out batch (``head`` of
    them) and the perplexity protocol score.

    Raises:
        UserError: naming ``search.f1_sequences`` when the text cannot hold ``head + n`` windows.
    """
    stream = pack_stream(tokenizer, texts)
    total = len(stream) // seq_len
    if total < head + n:
        raise UserError(f"search.f1_sequences: {n} windows after the {head} held-out ones (train.eval_sequences) "
                        f"need {(head + n) * seq_len} tokens, but the held-out text has only {len(stream)}; lower "
                        f"them")
    ids = stream[(total - n) * seq_len: total * seq_len].view(n, seq_len)  # (n, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def format_prompt(row: dict) -> str:
    """The Alpaca-style prompt of an instruction row (``input`` may be empty)."""
    template = PROMPT if row.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input", ""))


def instruct_table(tokenizer, rows: Sequence[dict], seq_len: int, batch_size: int) -> TableBatches:
    """Instruction rows → prompt + response + EOS, loss on the response (and EOS) only.

    Sequences are truncated to ``seq_len`` and right-padded; a row whose response is cut away entirely
    is dropped (it would carry no loss, and an all-ignored batch gives a NaN loss).

    Raises:
        UserError: naming ``train.seq_len`` when no row keeps a response token.
    """
    prompts = _encode(tokenizer, [format_prompt(r) for r in rows])
    responses = _encode(tokenizer, [r["output"] for r in rows])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kept_ids, kept_labels = [], []
    for prompt, response in zip(prompts, responses):
        ids = (prompt + response + eos)[:seq_len]
        labels = ([IGNORE] * len(prompt) + response + eos)[:seq_len]
        if any(label != IGNORE for label in labels):
            kept_ids.append(ids)
            kept_labels.append(labels)
    if not kept_ids:
        raise UserError(f"train.seq_len: {seq_len} tokens cut away every response of the instruction data; "
                        f"raise it")
    n = len(kept_ids)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.int64)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.int64)
    mask = torch.zeros((n, seq_len), dtype=torch.int64)
    for i, (ids, labs) in enumerate(zip(kept_ids, kept_labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return TableBatches(input_ids, mask, labels, batch_size)
