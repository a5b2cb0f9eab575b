"""Calibration data and the empirical Fisher diagonals (METHOD.md §5).

    calibration_sequences  seeded token windows from the fine-tuning text                (n_sequences, seq_len)
    fisher_diagonals       F_i = mean over sequences of (∂ loss_seq / ∂ W_i)²              (out, in) per layer
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from coalora import interrupt
from coalora.errors import UserError
from coalora.progress import progress as progress_bar
from coalora.space import Layers, model_weights

# ---------------------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------------------

def calibration_sequences(tokenizer, texts: Sequence[str], n_sequences: int, seq_len: int,
                          seed: int) -> torch.Tensor:
    """``n_sequences`` windows of ``seq_len`` tokens from the text, chosen by ``seed``.

    Documents are visited in a seeded random order, tokenised (no special tokens) and packed into one
    stream with EOS between documents, until the stream holds ``n·seq_len`` tokens; the stream is then cut
    into ``n`` consecutive windows. Random documents, no overlap, and only as much tokenisation as needed.

    Returns:
        (n_sequences, seq_len) int64 token ids.

    Raises:
        UserError: naming ``calibrate.n_sequences`` / ``calibrate.seq_len`` when the text is too short.
    """
    need = n_sequences * seq_len
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    chunk = 64  # tokenise a few documents at a time: the fast tokenizer batches well
    for start in range(0, len(order), chunk):
        batch = [texts[i] for i in order[start:start + chunk]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream += ids + eos
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise UserError(f"calibrate.n_sequences × calibrate.seq_len = {n_sequences} × {seq_len} = {need} tokens, "
                        f"but the fine-tuning text has only {len(stream)}; lower them")
    return torch.tensor(stream[:need], dtype=torch.int64).view(n_sequences, seq_len)


# ---------------------------------------------------------------------------------------------------------
# Fisher
# ---------------------------------------------------------------------------------------------------------

def sequence_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Each sequence's own LM loss: the mean next-token cross-entropy over its T − 1 predictions.

    Args:
        ids: (B, T) token ids.

    Returns:
        (B,) losses; summing them keeps every sequence's gradient separate from the others'.
    """
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    targets = ids[:, 1:]  # (B, T-1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return nll.mean(dim=1)


def fisher_diagonals(model: torch.nn.Module, sequences: torch.Tensor, layers: Layers, progress: bool = True,
                     batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal of every quantized layer's weight.

        F_i = (1/N) Σ_n g_{i,n} ⊙ g_{i,n},     g_{i,n} = ∂ loss_n / ∂ W_i     (out, in)

    with loss_n the LM loss of sequence n alone. Per-sequence gradients, not the square of a batch-mean
    gradient: the Fisher is the expected SQUARED gradient, and near a trained optimum the per-sequence
    gradients point in different directions, so their mean (and its square) shrinks towards zero as the
    batch grows while Σ g² does not. The square of a batch gradient would measure the batch, not the weight.

    Per-sequence gradients come from one forward/backward per batch with the per-sample trick for linear
    layers: for y = x·Wᵀ, ∂loss_n/∂W = Σ_t (∂loss/∂y_{n,t})ᵀ x_{n,t}, and since the batch loss is the SUM
    of per-sequence losses (sequences never interact in a decoder), ∂loss/∂y_n involves sequence n only.

    Args:
        model: the base model (eval mode is set here; its parameters' ``requires_grad`` are restored).
        sequences: (N, T) token ids.
        layers: the quantized layers (name → shape).
        progress: show progress over batches (coalora.progress).
        batch_size: sequences per forward/backward (any value gives the same numbers up to float rounding).

    Returns:
        name → (out, in) float32 on the CPU, non-negative.
    """
    weights = model_weights(model, layers)
    device = next(iter(weights.values())).device
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=device) for name, w in weights.items()}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(_capture_hook(sums[name])) for name in layers]
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():  # gradients are only needed to reach the layers' outputs
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        starts = range(0, len(sequences), batch_size)
        for start in progress_bar(starts, desc="fisher", unit="batch", enabled=progress):
            interrupt.check()
            ids = sequences[start:start + batch_size].to(device)
            sequence_losses(model, ids).sum().backward()
            for w in weights.values():
                w.grad = None  # the batch gradient is not what we want; the hooks collected per-sequence ones
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: (total / len(sequences)).cpu() for name, total in sums.items()}


def _capture_hook(total: torch.Tensor) -> Callable:
    """A forward hook adding Σ_n (g_nᵀ x_n)² to ``total`` once the layer's output gradient is known."""

    def forward_hook(module, inputs, output):
        x = inputs[0].detach()  # (B, T, in)

        def on_grad(grad):  # grad: (B, T, out)
            for n in range(grad.shape[0]):  # one (out, in) matrix at a time keeps memory at one gradient
                g = grad[n].reshape(-1, grad.shape[-1]).float().T @ x[n].reshape(-1, x.shape[-1]).float()
                total.add_(g.square_())

        if output.requires_grad:
            output.register_hook(on_grad)

    return forward_hook
