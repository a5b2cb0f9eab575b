"""Base quantization calibration: empirical Fisher diagonals and the (layer, spec) cost table (METHOD.md §5).

    calibration_sequences  seeded token windows from the fine-tuning text
    fisher_diagonals       F_i = mean over sequences of (∂ loss_seq / ∂ W_i)²              (out, in) per layer
    cost_tables            cost[i, c] = ‖√F_i ⊙ (W_i − W̃_i(c))‖²  and  ‖W_i − W̃_i(c)‖²    (n_layers, n_specs)
    layer_costs            one layer's row(s), every spec, by the sweep of ``coalora.quant.sweep``: exact, or
                           estimated from ``sample_weights`` of its weights (``sample_segments``, ``sampled_sums``)
    CostTable              the stage's files (costs.safetensors + costs.json) in memory; save / load

The cost table and the storage table (``bits_per_param`` per spec, ``numel`` per layer) are all the
allocation's integer program needs. Time (benchmarks/calibrate_cost.md): exact ∝ parameters × 432 specs;
sampled ∝ parameters (the scales of every block) + layers × sample_weights × 432.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from coalora import interrupt
from coalora.artifacts import read_json, write_json
from coalora.errors import ArtifactError, UserError
from coalora.progress import progress as progress_bar
from coalora.quant import SPEC_FIELDS, QuantSpec, all_specs
from coalora.quant.quantizer import block_absmax, check_weight, padded_blocks
from coalora.quant.sweep import SCALE_COMBOS, block_error_sums, scale_sets
from coalora.space import Layers, model_weights

WEIGHTINGS = ("fisher", "squared")
TABLE = {"fisher": "cost_fisher", "squared": "cost_squared"}  # weighting → tensor name in costs.safetensors
COSTS_FILE, INDEX_FILE, FISHER_FILE = "costs.safetensors", "costs.json", "fisher.safetensors"
SEGMENT = math.lcm(*SPEC_FIELDS["block0"])  # 64: the sampling unit, whole blocks for every B0
CHUNK_WEIGHTS = 1 << 11  # weights per block_error_sums call on the CPU: ×36 combos, ~300 kB, stays in cache
CHUNK_WEIGHTS_DEVICE = 1 << 20  # on an accelerator: large kernels


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


# ---------------------------------------------------------------------------------------------------------
# Cost tables
# ---------------------------------------------------------------------------------------------------------

def layer_costs(weight: torch.Tensor, weightings: Sequence[torch.Tensor | None], specs: Sequence[QuantSpec],
                sample_weights: int | None = None, seed: int = 0) -> torch.Tensor:
    """Σ F ⊙ (W − W̃(c))² for every spec c and every weighting F (None: F = 1), sharing work between specs.

    Per block size B0: the block absmax once, the dequantized scales ŝ1 once per (b1, b2, B1), w / ŝ1 and
    its grid cell once per ŝ1 for the four b0 (``coalora.quant.sweep``); then level, Ŵ and error per spec.

    ``sample_weights`` None (exact): every block, in chunks of ``CHUNK_WEIGHTS``. Each weight's error is the
    float32 number ``quantization_error`` forms; the float64 sums run in another order (equal to ~1e-15).

    ``sample_weights`` = s: steps 1–5 still run on the whole matrix (exact ŝ1 for every block), the errors
    on ~s sampled weights only (``sample_segments``: ⌈s/64⌉ segments of 64, spread over the flattened
    matrix, whole blocks for every B0), scaled up to the matrix by the share of Fisher mass they hold
    (``sampled_sums``). A sample that would cover the matrix computes it exactly.

    Args:
        weight: (out, in) any float dtype; converted to float32 once.
        weightings: K tensors (out, in) or None.
        specs: the C specs (any subset of ``all_specs()``, any order).
        sample_weights: weights per layer to quantize under every spec; None: all of them.
        seed: chooses the sampled segments.

    Returns:
        (K, C) float64.
    """
    check_weight(weight)
    w = weight.detach().to(torch.float32).contiguous()  # (out, in), once per layer, not once per spec
    fs = [None if f is None else f.to(device=w.device, dtype=torch.float32).contiguous() for f in weightings]
    n = w.numel()
    segments = None if sample_weights is None else sample_segments(n, sample_weights, seed)
    out = torch.empty(len(fs), len(specs), dtype=torch.float64)
    for block0, (combos, bits, columns) in spec_plan(specs).items():
        wb = padded_blocks(w, block0)  # (n_blocks, B0)
        s_hat = scale_sets(block_absmax(wb), block0, n, combos)  # (S, n_blocks)
        fbs = [None if f is None else padded_blocks(f, block0) for f in fs]
        if segments is None:
            sums = _chunked_sums(wb, fbs, s_hat, bits, None)
        else:
            sums = sampled_sums(wb, fbs, s_hat, bits, segments, n)
        sums = sums.cpu()
        for column, b, j in columns:
            out[:, column] = sums[b, :, j]
    return out


def spec_plan(specs: Sequence[QuantSpec]) -> dict[int, tuple[list, list[int], list[tuple[int, int, int]]]]:
    """Group specs by B0: per B0, (scale combos (b1, b2, B1), b0 values, [(column, b0 position, combo
    position)] for each spec); the sweep then computes every (b0, combo) pair of its group once."""
    groups: dict[int, list[tuple[int, QuantSpec]]] = {}
    for column, spec in enumerate(specs):
        groups.setdefault(spec.block0, []).append((column, spec))
    plan = {}
    for block0, members in sorted(groups.items()):
        combos = sorted({(s.scale_bits, s.scale2_dtype, s.block1) for _, s in members}, key=SCALE_COMBOS.index)
        bits = sorted({s.weight_bits for _, s in members})
        columns = [(c, bits.index(s.weight_bits), combos.index((s.scale_bits, s.scale2_dtype, s.block1)))
                   for c, s in members]
        plan[block0] = (combos, bits, columns)
    return plan


def _chunked_sums(wb: torch.Tensor, fbs: list, s_hat: torch.Tensor, bits: list[int],
                  blocks: torch.Tensor | None) -> torch.Tensor:
    """``block_error_sums`` over all blocks (``blocks`` None) or the listed ones, a chunk at a time.

    Args:
        wb: (n_blocks, B0); fbs: K × (n_blocks, B0) or None; s_hat: (S, n_blocks); blocks: (m,) or None.

    Returns:
        (len(bits), K, S) float64.
    """
    block0 = wb.shape[1]
    total = len(wb) if blocks is None else len(blocks)
    step = max(1, (CHUNK_WEIGHTS if wb.device.type == "cpu" else CHUNK_WEIGHTS_DEVICE) // block0)
    sums = torch.zeros(len(bits), len(fbs), s_hat.shape[0], dtype=torch.float64, device=wb.device)
    for start in range(0, total, step):
        part = slice(start, start + step) if blocks is None else blocks[start:start + step]
        sums += block_error_sums(wb[part], [None if f is None else f[part] for f in fbs], s_hat[:, part], bits)
    return sums


def sample_segments(numel: int, sample_weights: int, seed: int) -> torch.Tensor | None:
    """Which 64-weight segments of a flattened matrix a sampled cost table quantizes under every spec.

    With N = ⌈numel/64⌉ segments and m = ⌈sample_weights/64⌉: segment j of the sample is
    ⌊(j + u_j)·N/m⌋, u_j ~ U[0, 1) (systematic-stratified: one per stretch of N/m segments, and every
    segment is drawn m/N times in expectation, so the sample is spread over all rows and unbiased).
    A segment is whole blocks for every B0 (64 = lcm of the block sizes; the last may be partial).

    Returns:
        (m,) int64 segment indices (ascending, repeats possible), or None when m ≥ N (then: all of them).
    """
    n_segments = -(-numel // SEGMENT)
    m = -(-sample_weights // SEGMENT)
    if m >= n_segments:
        return None
    u = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # (m,)
    position = ((torch.arange(m, dtype=torch.float64) + u) * (n_segments / m)).long()
    return position.clamp_(max=n_segments - 1)


def segment_blocks(segments: torch.Tensor, block0: int, n_blocks: int) -> torch.Tensor:
    """The blocks of size B0 making up the given 64-weight segments: (m·64/B0,) int64, those < n_blocks."""
    per = SEGMENT // block0
    blocks = (segments[:, None] * per + torch.arange(per, device=segments.device)).reshape(-1)
    return blocks[blocks < n_blocks]


def sampled_sums(wb: torch.Tensor, fbs: list, s_hat: torch.Tensor, bits: list[int], segments: torch.Tensor,
                 numel: int) -> torch.Tensor:
    """Estimate ``block_error_sums`` over all blocks from the blocks of the sampled segments.

        total[b, k, j] ≈ Σ_sampled e[b, k, j] · Σ_all M_k / Σ_sampled M_k

    a ratio estimator over the weighting's block mass M_k (``block_mass``: Σ F per block for a Fisher
    diagonal, the count of weights for F = 1, where it is the plain expansion N/m): the sample measures
    the error per unit of Fisher mass, the mass itself is known for every block. The segments
    (``sample_segments``) are spread evenly over the matrix, so over its rows; repeats count twice, and
    every segment is drawn m/N times in expectation. Tried and dropped (larger errors, measured on
    heavy-tailed weights and Fisher): each block's largest weight computed exactly for every block
    (~7 % of the exact work; a larger sample did better at equal time), and the predictors ŝ1²·M,
    ŝ1²·Σ F·gap(w/s1)² and Σ F·w².

    Args:
        wb: (n_blocks, B0); fbs: K × (n_blocks, B0) or None; s_hat: (S, n_blocks); segments: (m,) int64;
        numel: the matrix's weights (its last block may be partial).

    Returns:
        (len(bits), K, S) float64.
    """
    block0, n_blocks = wb.shape[1], wb.shape[0]
    blocks = segment_blocks(segments.to(wb.device), block0, n_blocks)  # (m·64/B0,) minus missing tail blocks
    sums = _chunked_sums(wb, fbs, s_hat, bits, blocks)  # (b, K, S) over the sampled blocks
    for k, f in enumerate(fbs):
        mass = block_mass(f, block0, numel, wb.device)  # (n_blocks,)
        part = mass[blocks].sum()
        sums[:, k] *= mass.sum() / part if bool(part > 0) else 0.0  # no mass sampled: no error sampled either
    return sums


def block_mass(weighting: torch.Tensor | None, block0: int, numel: int, device: torch.device) -> torch.Tensor:
    """Σ of a weighting over each block: (n_blocks,) float64; for None (F = 1) its number of real weights.

    Args:
        weighting: (n_blocks, B0) zero-padded blocks of F, or None.
        numel: the matrix's weights: B0 per block but the last, which holds the rest.
    """
    if weighting is not None:
        return weighting.sum(dim=1, dtype=torch.float64)
    n_blocks = -(-numel // block0)
    mass = torch.full((n_blocks,), float(block0), dtype=torch.float64, device=device)
    mass[-1] = numel - (n_blocks - 1) * block0
    return mass


def cost_tables(model: torch.nn.Module, layers: Layers, fisher: dict[str, torch.Tensor] | None,
                specs: Sequence[QuantSpec] | None = None, progress: bool = True, sample_weights: int | None = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """The cost tables of every (layer, spec): ``squared`` always, ``fisher`` when Fisher diagonals are given.

        cost_fisher[i, c]  = ‖√F_i ⊙ (W_i − W̃_i(c))‖² = Σ F_i ⊙ (W_i − W̃_i(c))²
        cost_squared[i, c] = ‖W_i − W̃_i(c)‖²

    Both come from the same quantizations (the expensive part), so the pair costs what one table does.
    ``sample_weights``: exact when None, else estimated per layer from that many weights (``layer_costs``);
    layer i's sample is drawn with seed ``seed·1000003 + i``.

    Returns:
        weighting → (n_layers, n_specs) float64 on the CPU, rows in layer order, columns in ``specs`` order.
    """
    specs = tuple(all_specs() if specs is None else specs)
    names = ("squared",) if fisher is None else ("squared", "fisher")
    weights = model_weights(model, layers)
    tables = {name: torch.empty(len(layers), len(specs), dtype=torch.float64) for name in names}

    def one(i: int, layer: str) -> None:
        interrupt.check()
        rows = layer_costs(weights[layer], [None] if fisher is None else [None, fisher[layer]], specs,
                           sample_weights, seed * 1_000_003 + i)
        for k, name in enumerate(names):
            tables[name][i] = rows[k]

    with _layer_workers(next(iter(weights.values())).device) as workers, \
            progress_bar(total=len(layers), desc="cost table", unit="layer", enabled=progress) as bar:
        jobs = [workers.submit(one, i, layer) for i, layer in enumerate(layers)]
        for job in as_completed(jobs):
            job.result()  # re-raises a layer's error here
            bar.update()
    return tables


@contextmanager
def _layer_workers(device: torch.device) -> Iterator[ThreadPoolExecutor]:
    """One layer per CPU thread, each on one intra-op thread (restored afterwards); one worker on an accelerator.

    The sweep's ops are ~10⁵–10⁶ elements (a chunk of blocks × 36 scale combos): too small to split
    across cores profitably, and an OpenMP barrier costs milliseconds when the cores are busy (see
    ``coalora.model.coa.SERIAL_NUMEL``). Whole layers in parallel keep every core busy without barriers;
    torch releases the GIL inside its ops, and each layer's numbers do not depend on which thread ran it.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu":
        with ThreadPoolExecutor(max_workers=1) as pool:
            yield pool
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


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
