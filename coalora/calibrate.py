"""Base quantization calibration: empirical Fisher diagonals and the (layer, spec) cost table (METHOD.md §5).

    calibration_sequences  seeded token windows from the fine-tuning text
    fisher_diagonals       F_i = mean over sequences of (∂ loss_seq / ∂ W_i)²              (out, in) per layer
    cost_tables            cost[i, c] = ‖√F_i ⊙ (W_i − W̃_i(c))‖²  and  ‖W_i − W̃_i(c)‖²    (n_layers, n_specs)
    CostTable              the stage's files (costs.safetensors + costs.json) in memory; save / load

The cost table and the storage table (``bits_per_param`` per spec, ``numel`` per layer) are all the
allocation's integer program needs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from coalora import interrupt
from coalora.artifacts import read_json, write_json
from coalora.errors import ArtifactError, UserError
from coalora.quant import QuantSpec, all_specs, dequantize_parts, quantize_parts
from coalora.space import Layers, model_weights

WEIGHTINGS = ("fisher", "squared")
TABLE = {"fisher": "cost_fisher", "squared": "cost_squared"}  # weighting → tensor name in costs.safetensors
COSTS_FILE, INDEX_FILE, FISHER_FILE = "costs.safetensors", "costs.json", "fisher.safetensors"
SMALL_MATRIX = 1 << 18  # weights below which the cost table quantizes on one CPU thread


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
        progress: tqdm bar over batches.
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
        for start in tqdm(starts, desc="fisher", unit="batch", disable=not progress):
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


# ---------------------------------------------------------------------------------------------------------
# Cost tables
# ---------------------------------------------------------------------------------------------------------

def layer_costs(weight: torch.Tensor, weightings: Sequence[torch.Tensor | None],
                specs: Sequence[QuantSpec]) -> torch.Tensor:
    """Σ F ⊙ (W − W̃(c))² for every spec c and every weighting F (None: F = 1), from ONE quantization per spec.

    Args:
        weight: (out, in) any float dtype; converted to float32 once.
        weightings: K tensors (out, in) or None.
        specs: the C specs.

    Returns:
        (K, C) float64. Bitwise equal to ``quantization_error(weight, spec, F)``: the same float32
        difference, squared, weighted, summed in float64.
    """
    w = weight.detach().to(torch.float32).contiguous()  # (out, in), once per layer, not once per spec
    fs = [None if f is None else f.to(device=w.device, dtype=torch.float32) for f in weightings]
    out = torch.empty(len(fs), len(specs), dtype=torch.float64)
    for c, spec in enumerate(specs):
        sq = dequantize_parts(quantize_parts(w, spec), torch.float32).sub_(w).square_()  # (out, in)
        for k, f in enumerate(fs):
            out[k, c] = (sq if f is None else sq * f).sum(dtype=torch.float64)
    return out


def cost_tables(model: torch.nn.Module, layers: Layers, fisher: dict[str, torch.Tensor] | None,
                specs: Sequence[QuantSpec] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """The cost tables of every (layer, spec): ``squared`` always, ``fisher`` when Fisher diagonals are given.

        cost_fisher[i, c]  = ‖√F_i ⊙ (W_i − W̃_i(c))‖² = Σ F_i ⊙ (W_i − W̃_i(c))²
        cost_squared[i, c] = ‖W_i − W̃_i(c)‖²

    Both come from the same quantizations (the expensive part), so the pair costs what one table does.

    Returns:
        weighting → (n_layers, n_specs) float64 on the CPU, rows in layer order, columns in ``specs`` order.
    """
    specs = tuple(all_specs() if specs is None else specs)
    names = ("squared",) if fisher is None else ("squared", "fisher")
    weights = model_weights(model, layers)
    tables = {name: torch.empty(len(layers), len(specs), dtype=torch.float64) for name in names}
    for i, layer in enumerate(tqdm(list(layers), desc="cost table", unit="layer", disable=not progress)):
        interrupt.check()
        with _threads_for(weights[layer]):
            rows = layer_costs(weights[layer], [None] if fisher is None else [None, fisher[layer]], specs)
        for k, name in enumerate(names):
            tables[name][i] = rows[k]
    return tables


@contextmanager
def _threads_for(weight: torch.Tensor) -> Iterator[None]:
    """One CPU thread for small matrices: the quantizer's ~30 small ops per spec then run several times
    faster than with intra-op threads (measured 0.2–1 ms vs 3–10 ms per spec for a 32×48 matrix on a busy
    2-core machine), and the cost table runs them 432 times per layer."""
    small = weight.device.type == "cpu" and weight.numel() < SMALL_MATRIX
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def cost_table(model: torch.nn.Module, layers: Layers, fisher: dict[str, torch.Tensor] | None,
               specs: Sequence[QuantSpec] | None = None, progress: bool = True) -> torch.Tensor:
    """One cost table: Fisher-weighted when ``fisher`` is given, else plain squared error; (n_layers, n_specs)."""
    tables = cost_tables(model, layers, fisher, specs, progress)
    return tables["squared" if fisher is None else "fisher"]


# ---------------------------------------------------------------------------------------------------------
# The stage's files
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostTable:
    """The calibrate stage's output in memory.

    Attributes:
        layers: name → (out, in), in model order.
        specs: the C specs, in column order.
        tables: ``"cost_fisher"`` / ``"cost_squared"`` → (L, C) float64 (``cost_fisher`` only when computed).
        weighting: the weighting the allocation uses (``fisher`` | ``squared``).
        n_sequences: calibration sequences behind the Fisher (0 when not computed).
    """

    layers: dict[str, tuple[int, int]]
    specs: tuple[QuantSpec, ...]
    tables: dict[str, torch.Tensor]
    weighting: str
    n_sequences: int

    @property
    def selected(self) -> torch.Tensor:
        """(L, C) the table of the recorded weighting."""
        return self.tables[TABLE[self.weighting]]

    @property
    def numel(self) -> torch.Tensor:
        """(L,) int64 weights per layer."""
        return torch.tensor([o * i for o, i in self.layers.values()], dtype=torch.int64)

    @property
    def bits_per_param(self) -> torch.Tensor:
        """(C,) float64 bpp of each spec."""
        return torch.tensor([s.bits_per_param for s in self.specs], dtype=torch.float64)

    def save(self, folder: Path) -> None:
        """Write ``costs.safetensors`` (cost tables, numel, bits_per_param) and ``costs.json`` (the index)."""
        from safetensors.torch import save_file

        tensors = {**self.tables, "numel": self.numel, "bits_per_param": self.bits_per_param}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(folder) / COSTS_FILE))
        write_json(Path(folder) / INDEX_FILE, {
            "layers": list(self.layers), "shapes": [list(s) for s in self.layers.values()],
            "specs": [s.key for s in self.specs], "weighting": self.weighting, "selected": TABLE[self.weighting],
            "tables": sorted(self.tables), "n_sequences": self.n_sequences,
        })

    @classmethod
    def load(cls, folder: Path) -> "CostTable":
        """Read a calibrate output folder; ArtifactError when the files disagree with each other."""
        from safetensors.torch import load_file

        folder = Path(folder)
        index = read_json(folder / INDEX_FILE)
        tensors = load_file(str(folder / COSTS_FILE))
        layers = {name: tuple(shape) for name, shape in zip(index["layers"], index["shapes"])}
        specs = tuple(QuantSpec.from_key(k) for k in index["specs"])
        tables = {k: tensors[k] for k in index["tables"]}
        table = cls(layers, specs, tables, index["weighting"], index["n_sequences"])
        expected = (len(layers), len(specs))
        if any(tuple(t.shape) != expected for t in tables.values()) or \
                not torch.equal(tensors["bits_per_param"], table.bits_per_param) or \
                not torch.equal(tensors["numel"], table.numel):
            raise ArtifactError(f"{folder}: {COSTS_FILE} does not match {INDEX_FILE}; run `coalora stage calibrate`")
        return table


def timed(fn: Callable, *args, **kwargs):
    """(result, seconds) of one call."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started
