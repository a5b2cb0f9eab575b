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

The work goes in steps of whole blocks (:class:`PackedMatrix`), so each step's index buffer and values stay in
the CPU's cache: :func:`dequantize_streams` fills a new matrix step by step; :func:`packed_linear` multiplies
each step's rows by the input right away, so a deployed layer never holds its whole Ŵ. Temporaries are
reused (:func:`scratch`): a fresh CPU tensor of more than ~100 KB costs page faults on every call.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from .nf import nf_levels
from .spec import QuantSpec, block_counts


def _chunk_bits(bits: int) -> int:
    """Bits of one table-lookup chunk: a byte, or 12 bits for 3-bit codes (two chunks per 3 bytes).

    Larger chunks (16 bits: 4 levels per lookup at b0 = 4 or 2 at b0 = 8) measured slower on the CPU: their
    0.5–1 MB tables no longer stay in the cache."""
    return 12 if bits == 3 else 8


# On the CPU a chunk's values are copied as ONE machine word: a 1-D gather of 8- or 16-byte scalars is about
# three times as fast as a gather of rows of 2 or 4 floats (notes in benchmarks/deploy.md). The copy is bitwise: the
# words are only moved, never computed on (a complex128 holding a pair of small floats is a subnormal double,
# moved unchanged even with flush-to-zero on; tested). Other devices, and destinations not aligned to the word,
# gather rows.
_WORD = {1: torch.float32, 2: torch.int64, 4: torch.complex128}


class _Table:
    """The lookup table of one code width: row x holds the values of the c/bits codes packed in chunk x."""

    def __init__(self, values: torch.Tensor, bits: int, device: torch.device):
        c = _chunk_bits(bits)
        self.per = c // bits
        x = torch.arange(2**c, dtype=torch.int64)[:, None]  # (2^c, 1)
        codes = (x >> (torch.arange(self.per, dtype=torch.int64) * bits)) & (2**bits - 1)  # (2^c, per)
        rows = values[codes].contiguous().to(device)  # (2^c, per) float32
        self.rows = rows
        self.word = _WORD[self.per] if device.type == "cpu" else None
        self.words = None if self.word is None else rows.view(self.word).view(-1)  # (2^c,) one word per chunk
        self.word_bytes = 4 * self.per

    def gather(self, idx: torch.Tensor, dest: torch.Tensor) -> None:
        """Row ``idx[i]`` into ``dest[i·per: (i+1)·per]`` (dest: contiguous float32)."""
        out = dest[: idx.numel() * self.per]
        if self.word is None or out.data_ptr() % self.word_bytes:  # a word view needs an aligned address
            torch.index_select(self.rows, 0, idx, out=out.view(-1, self.per))
        else:
            torch.index_select(self.words, 0, idx, out=out.view(self.word))


@functools.lru_cache(maxsize=None)
def _table(kind: str, bits: int, device: torch.device) -> _Table:
    """The table of ``kind`` "levels" (the NF-``bits`` levels, from ``nf_levels``, so the same floats) or
    "scales" (q/m for every ``bits``-bit code q, m = 2^bits − 1, formed as ``block_scales`` forms it)."""
    if kind == "levels":
        values = nf_levels(bits)
    else:
        values = torch.arange(2**bits, dtype=torch.float32) / float(2**bits - 1)
    return _Table(values, bits, device)


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


def lookup(stream: torch.Tensor, bits: int, kind: str, out: torch.Tensor,
           index_buffer: torch.Tensor | None = None) -> None:
    """Write the value of every code in the stream into ``out``: its NF level (``kind`` "levels") or its
    q/m (``kind`` "scales").

    Args:
        stream: uint8 bit stream of ``bits``-bit codes (``pack_bits`` layout).
        bits: 2, 3, 4 or 8.
        kind: "levels" or "scales".
        out: contiguous 1-D float32 buffer of at least ``lookup_size(stream.numel(), bits)`` values, written
            from 0; the values past the stream's real codes (a partial last chunk) are those of code 0.
        index_buffer: optional int32 buffer of at least ``stream.numel()`` entries for the table indices.
    """
    _table(kind, bits, stream.device).gather(_chunk_index(stream, bits, index_buffer), out)


SLAB = 1 << 16
"""Weights dequantized per step: the step's index buffer and output stay in the CPU's cache, and no buffer
larger than the result is ever allocated (a fresh large tensor costs page faults on every call)."""


_SCRATCH = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable 1-D buffer of ``numel`` elements, one per (thread, name, dtype, device), grown as needed.

    A deployed model's forward needs the same few temporaries in every layer and every call; a fresh CPU tensor
    of more than ~100 KB is a fresh mapping whose pages fault on first touch, every time. Reusing them costs at
    most the largest layer's temporaries, held for the life of the thread.
    """
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel]


def block_scale_values(scale_codes: torch.Tensor, scale2: torch.Tensor, offset: torch.Tensor, spec: QuantSpec,
                       n_blocks: int, n_super: int, reuse: bool = False) -> torch.Tensor:
    """ŝ1 = (q/m)·s3 + o for every block, (n_super·B1,) float32 (slots past ``n_blocks`` are padding).

    q/m comes from the scale stream by table lookup; the float32 operations and their order are those of
    ``block_scales``, so the values are bitwise the same. With ``reuse`` the result lives in a :func:`scratch`
    buffer (valid until the thread's next call).
    """
    b1, B1 = spec.scale_bits, spec.block1
    size, device = max(n_super * B1, lookup_size(scale_codes.numel(), b1)), scale_codes.device
    s_hat = scratch("s_hat", size, torch.float32, device) if reuse else torch.empty(size, device=device)
    lookup(scale_codes, b1, "scales", s_hat)
    s_hat = s_hat[: n_super * B1].view(n_super, B1)
    s_hat.mul_(scale2.to(torch.float32)[:, None]).add_(offset.to(torch.float32).reshape(()))
    return s_hat.view(-1)


class PackedMatrix:
    """One packed matrix prepared for dequantizing in steps of whole blocks (``SLAB`` weights or more).

    Builds ŝ1 for every block once (n/B0 floats) and one int32 index buffer (both :func:`scratch` buffers with
    ``reuse``); :meth:`fill` then writes Ŵ = level[code]·ŝ1 of a run of blocks into a float32 destination: the
    levels by table lookup straight into it, then the block scales in place. Every step's stream starts on a
    chunk boundary (a block is B0·b0/8 bytes, a whole number of bytes and, for b0 = 3, of 3-byte groups).
    """

    def __init__(self, weight_codes: torch.Tensor, scale_codes: torch.Tensor, scale2: torch.Tensor,
                 offset: torch.Tensor, spec: QuantSpec, shape: tuple[int, int], step_blocks: int,
                 reuse: bool = False):
        self.codes, self.spec, self.shape = weight_codes, spec, shape
        self.n = shape[0] * shape[1]
        self.n_blocks, n_super = block_counts(spec, self.n)
        self.s_hat = block_scale_values(scale_codes, scale2, offset, spec, self.n_blocks, n_super, reuse)
        self.block_bytes = spec.block0 * spec.weight_bits // 8
        size, device = min(weight_codes.numel(), step_blocks * self.block_bytes), weight_codes.device
        self.index = scratch("index", size, torch.int32, device) if reuse else torch.empty(
            size, dtype=torch.int32, device=device)
        self.table = _table("levels", spec.weight_bits, device)  # fetched once

    def fill(self, first: int, last: int, dest: torch.Tensor) -> None:
        """Ŵ of blocks [first, last) (row-major weights first·B0 …) into ``dest[: (last − first)·B0]`` (float32)."""
        B0 = self.spec.block0
        stream = self.codes[first * self.block_bytes: last * self.block_bytes]
        self.table.gather(_chunk_index(stream, self.spec.weight_bits, self.index), dest)
        dest[: (last - first) * B0].view(-1, B0).mul_(self.s_hat[first:last, None])


def dequantize_streams(weight_codes: torch.Tensor, scale_codes: torch.Tensor, scale2: torch.Tensor,
                       offset: torch.Tensor, spec: QuantSpec, shape: tuple[int, int],
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ŵ (rows, cols) in ``dtype`` from the packed pieces; bitwise equal to ``dequantize_parts``.

    Works through the matrix ``SLAB`` weights (whole blocks) at a time, each step's index buffer and output
    in the CPU's cache; with a 16-bit ``dtype`` each step goes through a float32 :func:`scratch` buffer and is
    rounded once into the result. The result owns its memory (n_blocks·B0 elements; a view of the first n).

    Args:
        weight_codes: uint8 stream of the n = rows·cols NF codes (b0 bits each).
        scale_codes: uint8 stream of the n_blocks first-level scale codes q (b1 bits each).
        scale2: (n_super,) second-level scales s3, any float dtype holding the b2 values exactly.
        offset: () or (1,) float32 offset o.
        spec: the QuantSpec; shape: (rows, cols); dtype: of the result (computed in float32).
    """
    B0 = spec.block0
    step = max(1, SLAB // B0)  # blocks per step
    m = PackedMatrix(weight_codes, scale_codes, scale2, offset, spec, shape, step, reuse=True)
    out = torch.empty(m.n_blocks * B0, dtype=dtype, device=weight_codes.device)
    staging = None if dtype == torch.float32 else scratch("rows", min(m.n_blocks, step) * B0, torch.float32,
                                                          out.device)
    for first in range(0, m.n_blocks, step):
        last = min(m.n_blocks, first + step)
        if staging is None:
            m.fill(first, last, out[first * B0:])
        else:
            m.fill(first, last, staging)
            out[first * B0: last * B0].copy_(staging[: (last - first) * B0])
    return out[: m.n].view(shape)


MATMUL_SLAB = 1 << 17
"""Weights per step of :func:`packed_linear`: large enough that per-step overhead stays small, small enough
that the step's Ŵ rows stay in the CPU's cache between being written and being multiplied."""


def packed_linear(x: torch.Tensor, weight_codes: torch.Tensor, scale_codes: torch.Tensor, scale2: torch.Tensor,
                  offset: torch.Tensor, spec: QuantSpec, shape: tuple[int, int],
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Ŵᵀ + bias with Ŵ (out, in) dequantized a few rows at a time, never whole.

    On the CPU, dequantizing a whole matrix writes it to memory and the matmul reads it back; here each step
    fills a cache-sized scratch with the next rows of Ŵ (whole blocks: a multiple of B0 / gcd(in, B0) rows)
    and multiplies them at once, so memory traffic is the packed codes and the activations. The values of
    Ŵ are those of ``dequantize_streams`` (so ``fake_quantize``); each output is one dot product over the
    whole input, as in ``F.linear``, up to the summation order of the matmul kernel. When autograd records
    (x requires grad), on other devices, and for matrices of one step, Ŵ is dequantized whole and
    ``F.linear`` is used (autograd keeps the Ŵ it needs for the input's gradient).

    Args:
        x: (..., in) float; the result has x's dtype (Ŵ is rounded to it, as ``dequantize_streams`` would).
        the packed pieces, spec and shape (out, in) as for :func:`dequantize_streams`; bias: (out,) or None.

    Returns:
        (..., out).
    """
    rows, cols = shape
    B0 = spec.block0
    align = B0 // math.gcd(cols, B0)  # rows per whole number of blocks
    step_rows = max(align, MATMUL_SLAB // cols // align * align)
    if x.device.type != "cpu" or step_rows >= rows or (x.requires_grad and torch.is_grad_enabled()):
        w = dequantize_streams(weight_codes, scale_codes, scale2, offset, spec, shape, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    step_blocks = step_rows * cols // B0
    m = PackedMatrix(weight_codes, scale_codes, scale2, offset, spec, shape, step_blocks, reuse=True)
    rows_w = scratch("rows", step_blocks * B0, torch.float32, x.device)
    rounded = None if x.dtype == torch.float32 else scratch("rounded", step_rows * cols, x.dtype, x.device)
    x2 = x.reshape(-1, cols)
    y_t = torch.empty(rows, x2.shape[0], dtype=x.dtype, device=x.device)  # yᵀ: each step fills whole rows of it
    x2_t = x2.t()
    for r0 in range(0, rows, step_rows):
        r1 = min(rows, r0 + step_rows)
        first, last = r0 * cols // B0, -(-r1 * cols // B0)
        m.fill(first, last, rows_w)
        w = rows_w[: (r1 - r0) * cols].view(r1 - r0, cols)
        if rounded is not None:
            w = rounded[: w.numel()].view_as(w).copy_(w)
        torch.mm(w, x2_t, out=y_t[r0:r1])
    y = y_t.t().contiguous().view(*x.shape[:-1], rows)  # one (tokens × out) copy; none for one token
    return y if bias is None else y + bias.to(x.dtype)
