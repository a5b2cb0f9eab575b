"""The built-in default model: a small Llama pretrained on the embedded world's text.

It is an ordinary ``transformers`` Llama (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention),
so quantization, LoRA and evaluation take exactly the code path of Llama-2 or Qwen2.5. Pretraining is a
plain next-token loop (nanoGPT style): documents packed into fixed-length sequences, AdamW, linear warmup
then cosine decay.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from coalora.params import BuiltinModelParams

ROPE_THETA = 10000.0
MIN_LR_RATIO = 0.1      # cosine decay ends at lr * MIN_LR_RATIO
GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.95)


def builtin_config(p: "BuiltinModelParams", tokenizer):
    """The ``LlamaConfig`` of the built-in model.

    The vocabulary is the tokenizer's (which may be below ``p.vocab_size`` when the text has fewer merges).
    ``max_position_embeddings`` is the pretraining length, so lm-eval truncates longer contexts to what the
    model was trained on. Input and output embeddings are tied, as in the small Qwen2.5 models.
    """
    from transformers import LlamaConfig

    eos = tokenizer.eos_token_id
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=p.seq_len,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        dtype="float32",
    )


def build_model(p: "BuiltinModelParams", tokenizer, seed: int):
    """A freshly initialised built-in model (float32); the same seed gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(builtin_config(p, tokenizer))
    return model.float()


def pack(tokenizer, texts: Sequence[str], seq_len: int) -> "torch.Tensor":
    """Tokenise ``texts`` and concatenate them with EOS between documents into one stream.

    Returns:
        (N,) int64 token ids; the stream ends with EOS.
    """
    import torch

    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(eos)
    if len(stream) < seq_len + 1:
        raise ValueError(f"pretraining text has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream, dtype=torch.long)


def lr_at(step: int, p: "BuiltinModelParams") -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``lr * MIN_LR_RATIO``."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    span = max(1, p.steps - p.warmup_steps)
    progress = min(1.0, (step - p.warmup_steps) / span)
    return p.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(stream: "torch.Tensor", seq_len: int, batch_size: int, generator: "torch.Generator"):
    """Endless (B, T) batches of packed sequences.

    Each pass over the stream starts at a random offset in [0, T) (so sequence boundaries move between
    passes) and visits its sequences in a random order; all randomness comes from ``generator``.
    """
    import torch

    pending: list[torch.Tensor] = []
    while True:
        offset = int(torch.randint(0, seq_len, (1,), generator=generator))
        n = (len(stream) - offset) // seq_len
        if n == 0:
            offset, n = 0, len(stream) // seq_len
        seqs = stream[offset:offset + n * seq_len].view(n, seq_len)        # (n, T)
        pending.extend(seqs[torch.randperm(n, generator=generator)])
        while len(pending) >= batch_size:
            yield torch.stack(pending[:batch_size])                          # (B, T)
            pending = pending[batch_size:]


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never decay norms or biases (nanoGPT's rule)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(model, tokenizer, texts: Sequence[str], p: "BuiltinModelParams", seed: int,
             progress: bool = True) -> dict:
    """Pretrain ``model`` in place on ``texts`` with next-token prediction.

    ``p.steps`` AdamW steps of ``p.batch_size`` sequences of ``p.seq_len`` packed tokens; the learning rate
    follows :func:`lr_at`; gradients are clipped at norm 1. Deterministic given ``seed`` (batch order from
    a seeded ``torch.Generator``) and the thread count.

    Returns:
        ``{"steps", "initial_loss", "final_loss" (mean of the last 5% of steps), "tokens_seen",
        "corpus_tokens", "epochs", "seconds"}``.
    """
    import torch

    from coalora.progress import progress as progress_bar

    from coalora import interrupt

    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    stream = pack(tokenizer, texts, p.seq_len)
    batches = _batches(stream, p.seq_len, p.batch_size, generator)
    optimizer = torch.optim.AdamW(_param_groups(model, p.weight_decay), lr=p.lr, betas=ADAM_BETAS, eps=1e-8)
    model.train()
    losses: list[float] = []
    bar = progress_bar(range(p.steps), desc="pretrain", enabled=progress)
    for step in bar:
        interrupt.check()  # a stop request ends pretraining here, between steps
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, p)
        batch = next(batches)                                                 # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == p.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr_at(step, p):.2e}")
    model.eval()
    tail = losses[-max(1, len(losses) // 20):]
    tokens_seen = p.steps * p.batch_size * p.seq_len
    return {
        "steps": p.steps,
        "initial_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "tokens_seen": tokens_seen,
        "corpus_tokens": int(len(stream)),
        "epochs": round(tokens_seen / len(stream), 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
