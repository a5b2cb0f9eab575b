"""NormalFloat-k (NF-k) levels and the nearest-level search (METHOD.md §2).

NF-k levels, with δ = 0.9677083 and Φ⁻¹ the inverse standard normal CDF:

    p_neg = linspace(1 − δ, 0.5, 2^(k−1))          # 2^(k−1) points, the last one is 0.5
    p_pos = linspace(0.5, δ, 2^(k−1) + 1)          # 2^(k−1) + 1 points, the first one is 0.5
    levels = Φ⁻¹(p_neg ∪ p_pos without the duplicate 0.5) / Φ⁻¹(δ)

so there are 2^k levels, ascending, spanning exactly −1 … +1, with 0 among them (2^(k−1) − 1 negative
and 2^(k−1) positive levels). k = 4 gives the 16 NF4 levels of QLoRA/bitsandbytes.
"""

from __future__ import annotations

import functools

import torch

NF_DELTA = 0.9677083
"""The NF4 constant δ: the outermost quantile, mapped to ±1."""


@functools.lru_cache(maxsize=None)
def _nf_levels_f64(k: int) -> torch.Tensor:
    # Computed once in float64 on the CPU, so every device and dtype gets the same numbers.
    half = 2 ** (k - 1)
    p_neg = torch.linspace(1 - NF_DELTA, 0.5, half, dtype=torch.float64)  # (2^(k-1),)
    p_pos = torch.linspace(0.5, NF_DELTA, half + 1, dtype=torch.float64)  # (2^(k-1)+1,)
    p = torch.cat([p_neg, p_pos[1:]])  # (2^k,), the duplicate 0.5 dropped
    levels = torch.special.ndtri(p) / torch.special.ndtri(torch.tensor(NF_DELTA, dtype=torch.float64))
    # ndtri(1−δ) = −ndtri(δ) and ndtri(0.5) = 0 hold only to rounding; pin the ends and zero exactly.
    levels[0], levels[half - 1], levels[-1] = -1.0, 0.0, 1.0
    return levels


@functools.lru_cache(maxsize=None)
def _nf_tables(k: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    levels = _nf_levels_f64(k).to(dtype)  # (2^k,)
    # Exact midpoints of the ROUNDED levels (exact in float64 for 32/16-bit levels), then rounded DOWN
    # to the dtype: with x ≤ mid → lower level, every representable x then goes to its truly nearest
    # level, and only an exact tie goes to the lower one. Built on the CPU: identical on every device.
    exact = (levels[:-1].double() + levels[1:].double()) / 2  # (2^k − 1,)
    mids = exact.to(dtype)
    mids = torch.where(mids.double() > exact, torch.nextafter(mids, torch.full_like(mids, -float("inf"))), mids)
    return levels.to(device), mids.to(device)


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 8:
        raise ValueError(f"NF bits k must be an int in 2..8, got {k!r}")


def nf_levels(k: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2^k NF-k levels, ascending, shape ``(2^k,)``; cached per (k, dtype, device).

    Args:
        k: bits per code, 2..8 (specs use 2, 3, 4, 8).
        dtype: floating dtype of the returned table.
        device: device of the returned table (default CPU).

    Returns:
        A read-only-by-convention cached tensor: clone it before modifying.
    """
    _check_k(k)
    return _nf_tables(k, dtype, torch.device(device if device is not None else "cpu"))[0]


def nf_midpoints(k: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Decision boundaries ``(l_i + l_{i+1}) / 2`` between adjacent NF-k levels, shape ``(2^k − 1,)``.

    Each is the exact midpoint of the two ``dtype`` levels rounded toward −∞ to ``dtype``.
    """
    _check_k(k)
    return _nf_tables(k, dtype, torch.device(device if device is not None else "cpu"))[1]


GRID_CELLS = 4096  # cells of the uniform grid over [−1, 1] behind ``nearest_level_index``


@functools.lru_cache(maxsize=None)
def _grid_tables(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(base (G,) float32 counts, candidates (M, G) float32, M) for the grid search of ``nearest_level_index``.

    Cell c covers [−1 + 2c/G, −1 + 2(c+1)/G). Rounding in the cell computation can put x one cell off, so
    base[c] counts the midpoints below cell c − 1's lower edge (all certainly < x), and candidates[:, c] holds
    the next M midpoints (+inf past the last), covering every midpoint up to cell c + 1's upper edge: the
    ones that may or may not be < x. The first and last cells extend to −∞ and +∞.
    """
    mids = _nf_tables(k, torch.float32, torch.device("cpu"))[1].double()
    edges = torch.linspace(-1.0, 1.0, GRID_CELLS + 1, dtype=torch.float64)
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    below = torch.cat([-inf, edges[:-2]])  # (G,) lower edge of cell c − 1
    above = torch.cat([edges[2:], inf])  # (G,) upper edge of cell c + 1
    base = torch.searchsorted(mids, below, right=False)  # (G,) #(mids < below)
    m = int((torch.searchsorted(mids, above, right=False) - base).max())
    padded = torch.cat([mids.float(), torch.full((m,), float("inf"))])
    candidates = padded[base[:, None] + torch.arange(m)].T.contiguous()  # (M, G)
    return base.to(torch.float32).to(device), candidates.to(device), m


GRID_MIN_BITS = 4  # below this the binary search over 2^k − 1 midpoints is as fast or faster


def nearest_level_index(x: torch.Tensor, k: int) -> torch.Tensor:
    """Index of the NF-k level nearest to each element of ``x`` (float32), as int32, same shape.

    code(x) = #{i : mid_i < x}, i.e. mid[code−1] < x ≤ mid[code], against the 2^k − 1 midpoints, which are
    rounded down (see ``_nf_tables``), so the result is the exactly nearest level and a tie (x equidistant
    from two levels) goes to the LOWER level. Values beyond ±1 map to the end levels.

    k ≥ 4: a uniform-grid lookup (``grid_level_index``); k ≤ 3: the binary search (``torch.bucketize``).
    Both give identical codes (tested); on the CPU the grid takes ~0.4× the binary search's time at k = 8 and
    ~0.7× at k = 4, but ~1.4× at k = 2 (benchmarks/nf_search.md).
    """
    if k < GRID_MIN_BITS:
        return nearest_level_index_reference(x, k)
    return grid_level_index(x, k)


def grid_level_index(x: torch.Tensor, k: int) -> torch.Tensor:
    """``nearest_level_index`` by a uniform-grid lookup instead of a binary search: the cell of x gives the
    count of midpoints surely below it, and M comparisons settle the rest (M = 1 for every k from 2 to 8:
    no two midpoints lie within three cells)."""
    base, candidates, m = _grid_tables(k, x.device)
    flat = x.reshape(-1)
    # Three full-size buffers, everything else in place: on the CPU a fresh large tensor costs more in
    # page faults than the arithmetic on it. Codes are counted in float32 (exact below 2^24).
    t = _grid_position(flat)
    cell = t.to(torch.int32)  # t ≥ 0, so truncation is floor
    code = base.index_select(0, cell)  # midpoints certainly below x
    for j in range(m):
        torch.index_select(candidates[j], 0, cell, out=t)
        code.add_(t.sub_(flat).lt_(0))  # + [candidate < x]
    return cell.copy_(code).view(x.shape)


def nearest_level_index_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The binary-search definition ``nearest_level_index`` must equal (tests compare them)."""
    mids = nf_midpoints(k, torch.float32, x.device)
    return torch.bucketize(x, mids, out_int32=True, right=False)


def _grid_position(x: torch.Tensor) -> torch.Tensor:
    """(clamp(x, −2, 2) + 1)·G/2 clamped to [0, G − 1], a fresh float32 tensor: its floor is x's grid cell."""
    return x.clamp(-2.0, 2.0).add_(1.0).mul_(GRID_CELLS / 2).clamp_(0, GRID_CELLS - 1)


def grid_cell(x: torch.Tensor) -> torch.Tensor:
    """The grid cell of each element of ``x`` (float32), int32, same shape.

    The grid does not depend on k, so one cell serves the level search of every k (``grid_level_value``).
    """
    return _grid_position(x).to(torch.int32)  # the position is ≥ 0: truncation is floor


@functools.lru_cache(maxsize=None)
def _value_tables(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate, low, high), each (G,) float32: per cell, the one midpoint that may or may not lie below x
    (M = 1 for every k, see ``_grid_tables``) and the levels chosen when it does not / does."""
    base, candidates, m = _grid_tables(k, torch.device("cpu"))
    if m != 1:  # pragma: no cover - holds for k = 2..8 (tested); a finer grid would be needed otherwise
        raise ValueError(f"NF-{k}: {m} candidate midpoints per grid cell, the value lookup handles one")
    levels = _nf_tables(k, torch.float32, torch.device("cpu"))[0]
    low = base.long()  # (G,) the code when the candidate is not below x
    high = (low + 1).clamp_(max=len(levels) - 1)  # the candidate is +inf where no level lies above
    return candidates[0].to(device), levels[low].to(device), levels[high].to(device)


def grid_level_value(x: torch.Tensor, cell: torch.Tensor, k: int) -> torch.Tensor:
    """The NF-k level nearest to each element of ``x``: ``nf_levels(k)[nearest_level_index(x, k)]``.

    Args:
        x: (...) float32.
        cell: ``grid_cell(x)``, computed once for every k the caller needs.
        k: NF bits.

    Returns:
        float32, the shape of ``x``: level[code] with code = base[cell] + [candidate[cell] < x], the same
        code as ``grid_level_index`` (tested), picked without forming it.
    """
    candidate, low, high = _value_tables(k, x.device)
    flat, c = x.reshape(-1), cell.reshape(-1)
    above = torch.lt(candidate.index_select(0, c), flat)  # (n,) bool
    return torch.where(above, high.index_select(0, c), low.index_select(0, c)).view(x.shape)
