"""Perplexity under a named protocol (METHOD.md: name the protocol next to every perplexity).

Protocol ``nonoverlap``: every document is tokenised without special tokens, the documents are concatenated
with EOS between them (and after the last), the stream is cut into non-overlapping windows of ``seq_len``
tokens and the first ``max_windows`` windows are scored. Each window is scored on its own (no context from
the previous window), so it contributes ``seq_len - 1`` predicted tokens:

    ppl = exp( (1 / n_tokens) * sum_windows sum_{t=1}^{T-1} -log p(x_t | x_<t) )

Its name carries its parameters: ``nonoverlap-L{seq_len}-N{max_windows}``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from coalora import interrupt
from coalora.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PROTOCOL = "nonoverlap"


def protocol_name(seq_len: int, max_windows: int) -> str:
    return f"{PROTOCOL}-L{seq_len}-N{max_windows}"


def token_windows(tokenizer, texts: Sequence[str], seq_len: int, max_windows: int) -> "torch.Tensor":
    """The scored windows of the protocol.

    Returns:
        (W, T) int64 token ids, W = min(max_windows, stream_length // T).
    """
    import torch

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("eval.perplexity: the tokenizer has no EOS token to separate documents")
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
        if len(stream) >= seq_len * max_windows:
            break
    n_windows = min(max_windows, len(stream) // seq_len)
    if n_windows == 0:
        raise UserError(f"eval.perplexity.seq_len: the validation text has {len(stream)} tokens, fewer than "
                        f"one window of {seq_len}")
    return torch.tensor(stream[:n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)


def perplexity(model, tokenizer, texts: Sequence[str], seq_len: int, max_windows: int,
               batch_size: int) -> dict:
    """Perplexity of ``model`` on ``texts`` under protocol ``nonoverlap`` (module docstring).

    Args:
        model: a causal LM returning ``.logits`` of shape (B, T, V).
        tokenizer: its tokenizer (needs an EOS token).
        texts: the documents, in order.
        seq_len: window length T.
        max_windows: how many windows to score at most.
        batch_size: windows per forward pass.

    Returns:
        ``{"protocol", "ppl", "nll" (mean per token, nats), "n_tokens", "n_windows", "window_nll"}``;
        ``window_nll`` (W,): each window's summed NLL over its T − 1 predicted tokens (the per-item results a
        paired bootstrap resamples).
    """
    import torch
    import torch.nn.functional as F

    windows = token_windows(tokenizer, texts, seq_len, max_windows)        # (W, T)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    window_nll: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                interrupt.check()
                batch = windows[start:start + batch_size].to(device)        # (B, T)
                logits = model(input_ids=batch).logits[:, :-1].float()      # (B, T-1, V)
                targets = batch[:, 1:]                                      # (B, T-1)
                nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
                window_nll += nll.double().sum(1).tolist()
    finally:
        model.train(was_training)
    n_tokens = len(window_nll) * (seq_len - 1)
    mean_nll = sum(window_nll) / n_tokens
    return {
        "protocol": protocol_name(seq_len, max_windows),
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "n_tokens": n_tokens,
        "n_windows": len(windows),
        "window_nll": window_nll,
    }
