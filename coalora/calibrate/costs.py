"""The (layer, spec) cost tables: cost[i, c] = ‖√F_i ⊙ (W_i − W̃_i(c))‖² and ‖W_i − W̃_i(c)‖², (n_layers, n_specs).

Every spec's error of a layer comes from one sweep over its blocks (``coalora.quant.sweep``): exact, or
estimated from ``sample_weights`` of its weights (whole segments of ``SEGMENT`` weights, each block's scales
from all of its weights). Layers run in parallel, one per CPU thread.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from coalora import interrupt
from coalora.progress import progress as progress_bar
from coalora.quant import SPEC_FIELDS, QuantSpec, all_specs
from coalora.quant.quantizer import block_absmax, check_weight, padded_blocks
from coalora.quant.sweep import SCALE_COMBOS, block_error_sums, scale_sets
from coalora.space import Layers, model_weights
from coalora.threads import one_torch_thread

WEIGHTINGS = ("fisher", "squared")
SEGMENT = math.lcm(*SPEC_FIELDS["block0"])  # 64: the sampling unit, whole blocks for every B0
CHUNK_WEIGHTS = 1 << 11  # weights per block_error_sums call on the CPU: ×36 combos, ~300 kB, stays in cache
CHUNK_WEIGHTS_DEVICE = 1 << 20  # on an accelerator: large kernels


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
    ``coalora.threads.SERIAL_NUMEL``). Whole layers in parallel keep every core busy without barriers;
    torch releases the GIL inside its ops, and each layer's numbers do not depend on which thread ran it.
    """
    if device.type != "cpu":
        with ThreadPoolExecutor(max_workers=1) as pool:
            yield pool
        return
    threads = torch.get_num_threads()
    with one_torch_thread(), ThreadPoolExecutor(max_workers=threads) as pool:
        yield pool


def cost_table(model: torch.nn.Module, layers: Layers, fisher: dict[str, torch.Tensor] | None,
               specs: Sequence[QuantSpec] | None = None, progress: bool = True) -> torch.Tensor:
    """One cost table: Fisher-weighted when ``fisher`` is given, else plain squared error; (n_layers, n_specs)."""
    tables = cost_tables(model, layers, fisher, specs, progress)
    return tables["squared" if fisher is None else "fisher"]
