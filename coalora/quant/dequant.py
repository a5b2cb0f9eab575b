"""Fast dequantization straight from the packed bit streams (what a deployed model runs in every forward).

The packed format (``coalora.quant.packed``) stores a matrix as a b0-bit code stream, a b1-bit scale-code
stream, the second-level scales s3 and the offset o. The reference path unpacks every code to an int32 and
then gathers its level (``unpack_bits`` + ``dequantize_parts``): four full-size passes and two full-size
temporaries. Here the code stream is read a **chunk** at a time through a lookup table that maps a chunk to
the levels of all the codes in it, so one gather writes the levels straight into the output:

    b0 = 2, 4, 8   chunk = one byte   → table (256, 8/b0) of levels   (4, 2 or 1 codes per byte)
    b0 = 3         chunk = 12 bits    → table (4096, 4) of levels     (a 3-byte group holds two chunks)

and the first-level scales the same way: a byte of the scale stream maps to the values q/m of its
8/b1 codes (b1 = 3: 12-bit chunks). Then, per block of B0 weights,

    ŝ1 = (q/m)·s3 + o        Ŵ = level[code]·ŝ1                    (METHOD.md §2, steps 5–6)

with the same float32 operations in the same order as ``block_scales`` / ``dequantize_parts``, so the result
is bitwise equal to ``fake_quantize`` (tested for all 432 specs). Tables are built once per (bits, device)
from ``nf_levels`` and cached. A chunk always starts at a code boundary (8 and 12 are multiples of b0), so a
stream's codes come out in order; the codes of a partial last chunk past ``n`` land in the padding of the
last block and are dropped.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .nf import nf_levels
from .spec import QuantSpec, block_counts


def _chunk_bits(bits: int) -> int:
    """Bits of one table-lookup chunk: a byte, or 12 bits for 3-bit codes (two chunks per 3 bytes).

    Larger chunks (16 bits: 4 levels per lookup at b0 = 4) were measured slower on the CPU: the 1 MB table
    no longer stays in the cache (benchmarks/deploy.md)."""
    return 12 if bits == 3 else 8


@functools.lru_cache(maxsize=None)
def _chunk_table(values: tuple[float, ...] | None, bits: int, c: int, device: torch.device) -> torch.Tensor:
    """(2^c, c/bits) float32: row x holds ``values[code_j]`` of the c/bits codes packed little-endian in x.

    ``values`` is None for the NF-``bits`` levels (built from ``nf_levels`` so they are the same floats).
    """
    per = c // bits
    table = nf_levels(bits) if values is None else torch.tensor(values, dtype=torch.float32)  # (2^bits,)
    x = torch.arange(2**c, dtype=torch.int64)[:, None]  # (2^c, 1)
    codes = (x >> (torch.arange(per, dtype=torch.int64) * bits)) & (2**bits - 1)  # (2^c, per)
    return table[codes].contiguous().to(device)


def _scale_values(bits: int) -> tuple[float, ...]:
    """q/m for every b1-bit code q, m = 2^b1 − 1, formed as ``block_scales`` forms it (float32 q / m)."""
    m = float(2**bits - 1)
    return tuple((torch.arange(2**bits, dtype=torch.float32) / m).tolist())


def _chunk_index(stream: torch.Tensor, bits: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The stream's chunks as int32 table indices, (n_chunks,): its bytes, or for 3-bit codes two 12-bit
    chunks per 3 bytes (a partial last group padded with zero bits). Bytes are converted into ``buffer``
    (int32, reused across calls) when one is given."""
    if bits != 3:
        return stream.to(torch.int32) if buffer is None else buffer[: stream.numel()].copy_(stream)
    pad = -stream.numel() % 3
    g = (F.pad(stream, (0, pad)) if pad else stream).view(-1, 3).to(torch.int32)  # (groups, 3) bytes
    lo = g[:, 1].bitwise_and(0xF).bitwise_left_shift_(8).bitwise_or_(g[:, 0])  # bits 0..11
    hi = g[:, 2].bitwise_left_shift(4).bitwise_or_(g[:, 1].bitwise_right_shift(4))  # bits 12..23
    return torch.stack([lo, hi], dim=1).view(-1)  # (2·groups,)


def lookup_size(n_bytes: int, bits: int) -> int:
    """How many values ``lookup`` writes for a stream of ``n_bytes`` bytes (every code of every chunk)."""
    return 8 * -(-n_bytes // 3) if bits == 3 else n_bytes * (8 // bits)


# A chunk's values are copied as ONE machine word: a 1-D gather of 8- or 16-byte scalars is about twice as fast
# on the CPU as a gather of rows of 2 or 4 floats (benchmarks/deploy.md).
_WORD = {1: torch.float32, 2: torch.int64, 4: torch.complex128}


def lookup(stream: torch.Tensor, bits: int, values: tuple[float, ...] | None, out: torch.Tensor,
           index_buffer: torch.Tensor | None = None) -> None:
    """Write ``values[code_i]`` (NF levels when ``values`` is None) of every code in the stream into ``out``.

    Args:
        stream: uint8 bit stream of ``bits``-bit codes (``pack_bits`` layout).
        bits: 2, 3, 4 or 8.
        values: the value of each code, or None for the NF-``bits`` levels.
        out: contiguous 1-D float32 buffer of at least ``lookup_size(stream.numel(), bits)`` values, written
            from 0; the values past the stream's real codes (a partial last chunk) are those of code 0.
        index_buffer: optional int32 buffer of at least ``stream.numel()`` entries for the table indices.
    """
    table = _chunk_table(values, bits, _chunk_bits(bits), stream.device)  # (2^c, per)
    word = _WORD[table.shape[1]]
    idx = _chunk_index(stream, bits, index_buffer)  # (n_chunks,)
    size = idx.numel() * table.shape[1]
    torch.index_select(table.view(word).view(-1), 0, idx, out=out[:size].view(word))


SLAB = 1 << 16
"""Weights dequantized per step: the step's index buffer and output stay in the CPU's cache, and no buffer
larger than the result is ever allocated (a fresh large tensor costs page faults on every call)."""


def block_scale_values(scale_codes: torch.Tensor, scale2: torch.Tensor, offset: torch.Tensor, spec: QuantSpec,
                       n_blocks: int, n_super: int) -> torch.Tensor:
    """ŝ1 = (q/m)·s3 + o for every block, (n_super·B1,) float32 (slots past ``n_blocks`` are padding).

    q/m comes from the scale stream by table lookup; the float32 operations and their order are those of
    ``block_scales``, so the values are bitwise the same.
    """
    b1, B1 = spec.scale_bits, spec.block1
    s_hat = torch.empty(max(n_super * B1, lookup_size(scale_codes.numel(), b1)), dtype=torch.float32,
                        device=scale_codes.device)
    lookup(scale_codes, b1, _scale_values(b1), s_hat)
    s_hat = s_hat[: n_super * B1].view(n_super, B1)
    s_hat.mul_(scale2.to(torch.float32)[:, None]).add_(offset.to(torch.float32).reshape(()))
    return s_hat.view(-1)


def dequantize_streams(weight_codes: torch.Tensor, scale_codes: torch.Tensor, scale2: torch.Tensor,
                       offset: torch.Tensor, spec: QuantSpec, shape: tuple[int, int],
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ (rows, cols) in ``dtype`` from the packed pieces; bitwise equal to ``dequantize_parts``.

    Works through the matrix ``SLAB`` weights at a time (whole blocks): look the levels up straight into the
    output, multiply by the blocks' ŝ1 in place; with a 16-bit ``dtype`` each step goes through a float32
    scratch buffer and is rounded once into the result.

    Args:
        weight_codes: uint8 stream of the n = rows·cols NF codes (b0 bits each).
        scale_codes: uint8 stream of the n_blocks first-level scale codes q (b1 bits each).
        scale2: (n_super,) second-level scales s3, any float dtype holding the b2 values exactly.
        offset: () or (1,) float32 offset o.
        spec: the QuantSpec; shape: (rows, cols); dtype: of the result (computed in float32).
    """
    n = shape[0] * shape[1]
    n_blocks, n_super = block_counts(spec, n)
    b0, B0 = spec.weight_bits, spec.block0
    device = weight_codes.device
    s_hat = block_scale_values(scale_codes, scale2, offset, spec, n_blocks, n_super)  # (≥ n_blocks,)
    size = max(n_blocks * B0, lookup_size(weight_codes.numel(), b0))  # room for a partial last chunk
    out = torch.empty(size, dtype=dtype, device=device)
    step = max(1, SLAB // B0)  # blocks per step
    scratch = out if dtype == torch.float32 else torch.empty(min(size, step * B0 + 8), device=device)
    block_bytes = B0 * b0 // 8  # whole bytes and whole 3-byte groups for every spec (B0·b0 divides by 24)
    index = torch.empty(min(weight_codes.numel(), step * block_bytes), dtype=torch.int32, device=device)
    for first in range(0, n_blocks, step):
        last = min(n_blocks, first + step)
        stream = weight_codes[first * block_bytes: last * block_bytes]
        at = first * B0 if scratch is out else 0
        lookup(stream, b0, None, scratch[at:], index)
        scratch[at: at + (last - first) * B0].view(-1, B0).mul_(s_hat[first:last, None])
        if scratch is not out:
            out[first * B0: last * B0].copy_(scratch[: (last - first) * B0])
    return out[:n].view(shape)
