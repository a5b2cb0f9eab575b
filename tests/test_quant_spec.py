"""Tests of coalora.quant's tables: quantization specs (fields, bits, validation, keys) and the NF-k levels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from coalora.quant import QLORA_SPEC, SPEC_FIELDS, QuantSpec, all_specs, nf_levels, nf_midpoints, storage_bits
from coalora.quant.nf import (GRID_CELLS, grid_cell, grid_level_index, grid_level_value, nearest_level_index,
                              nearest_level_index_reference)

# ----------------------------------------------------------------------------------------------- specs


def test_spec_fields_and_all_specs_order():
    specs = all_specs()
    assert len(specs) == 432 == math.prod(len(v) for v in SPEC_FIELDS.values())
    assert len(set(specs)) == 432
    assert specs[0] == QuantSpec(2, 2, "bf16", 16, 16)
    assert specs[1] == QuantSpec(2, 2, "bf16", 16, 64)  # block1 varies fastest
    assert specs[-1] == QuantSpec(8, 8, "fp32", 64, 256)
    assert list(specs) == sorted(specs)


def test_bits_per_param_known_values():
    assert QLORA_SPEC.bits_per_param == 4 + 8 / 64 + 32 / 16384
    assert round(QLORA_SPEC.bits_per_param, 3) == 4.127
    assert QuantSpec(3, 4, "bf16", 32, 64).bits_per_param == 3 + 4 / 32 + 16 / (32 * 64)
    bits = [s.bits_per_param for s in all_specs()]
    assert min(bits) == 2 + 2 / 64 + 16 / (64 * 256) and round(min(bits), 4) == 2.0322
    assert max(bits) == 8 + 8 / 16 + 32 / (16 * 16) == 8.625


def test_storage_bits_exact_for_partial_shape():
    spec = QuantSpec(3, 4, "fp16", 32, 16)
    # n = 91 weights → 3 blocks (last one partial) → 1 super-block (partial).
    assert storage_bits(spec, (7, 13)) == 91 * 3 + 3 * 4 + 1 * 16 + 32
    # 17 super-blocks of 16 blocks of 32 plus one weight: 273 blocks, 18 super-blocks.
    n = 17 * 16 * 32 + 1
    assert storage_bits(spec, (1, n)) == n * 3 + 273 * 4 + 18 * 16 + 32
    # Whole super-blocks: exactly the asymptotic rate plus the offset.
    assert storage_bits(QLORA_SPEC, (4096, 4096)) == QLORA_SPEC.bits_per_param * 4096 * 4096 + 32
    for bad in [(0, 4), (3,), (2, 3, 4)]:
        with pytest.raises(ValueError, match="shape"):
            storage_bits(spec, bad)


@pytest.mark.parametrize(
    "field, value",
    [("weight_bits", 5), ("scale_bits", 1), ("scale2_dtype", "fp8"), ("block0", 128), ("block1", 32),
     ("weight_bits", 4.0), ("block0", True), ("scale2_dtype", 16)],
)
def test_validation_error_names_field_and_allowed_values(field, value):
    kwargs = QLORA_SPEC.to_dict() | {field: value}
    with pytest.raises(ValueError) as info:
        QuantSpec(**kwargs)
    msg = str(info.value)
    assert f"QuantSpec.{field}" in msg and str(SPEC_FIELDS[field]) in msg and repr(value) in msg


def test_validation_message_format():
    with pytest.raises(ValueError, match=r"^QuantSpec\.weight_bits must be one of \(2, 3, 4, 8\), got 5$"):
        QuantSpec(5, 8, "fp32", 64, 256)


def test_numpy_integers_are_normalised():
    spec = QuantSpec(np.int64(4), np.int32(8), "fp32", np.int64(64), 256)
    assert spec == QLORA_SPEC and type(spec.weight_bits) is int and hash(spec) == hash(QLORA_SPEC)


def test_json_and_key_round_trip_for_every_spec():
    keys = set()
    for spec in all_specs():
        assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert QuantSpec.from_key(spec.key) == spec
        keys.add(spec.key)
    assert len(keys) == 432
    assert QLORA_SPEC.key == "b4-s8-fp32-64-256"


def test_from_dict_rejects_unknown_and_missing_keys():
    d = QLORA_SPEC.to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        QuantSpec.from_dict(d | {"colour": 1})
    d.pop("block1")
    with pytest.raises(ValueError, match=r"missing keys \['block1'\]"):
        QuantSpec.from_dict(d)


@pytest.mark.parametrize("key", ["b4-s8-fp32-64", "b5-s8-fp32-64-256", "4-8-fp32-64-256", "b4-s8-fp8-64-256"])
def test_from_key_rejects_bad_keys(key):
    with pytest.raises(ValueError, match="QuantSpec"):
        QuantSpec.from_key(key)


def test_specs_are_frozen_hashable_dict_keys():
    table = {spec: spec.bits_per_param for spec in all_specs()}
    assert table[QuantSpec(4, 8, "fp32", 64, 256)] == QLORA_SPEC.bits_per_param
    with pytest.raises(AttributeError):
        QLORA_SPEC.weight_bits = 2


# ----------------------------------------------------------------------------------------- NF levels


def test_nf_levels_match_method_values():
    nf4 = [-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0910, 0, 0.0796, 0.1609, 0.2461, 0.3379,
           0.4407, 0.5626, 0.7230, 1]
    assert torch.allclose(nf_levels(4), torch.tensor(nf4), atol=5e-5)
    assert torch.allclose(nf_levels(2), torch.tensor([-1, 0, 0.3379, 1]), atol=5e-5)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_nf_levels_properties(k):
    levels = nf_levels(k)
    assert levels.shape == (2**k,) and levels.dtype == torch.float32
    assert bool((levels[1:] > levels[:-1]).all())
    assert levels[0] == -1 and levels[-1] == 1
    assert int((levels == 0).sum()) == 1
    assert int((levels < 0).sum()) == 2 ** (k - 1) - 1  # one more level on the positive side
    mids = nf_midpoints(k)
    exact = (levels[1:].double() + levels[:-1].double()) / 2
    assert bool((mids.double() <= exact).all()) and bool((torch.nextafter(mids, levels[1:]).double() > exact).all())


def test_nf_levels_cached_per_dtype_and_device():
    assert nf_levels(3) is nf_levels(3)
    l64 = nf_levels(3, torch.float64)
    assert l64.dtype == torch.float64 and l64 is not nf_levels(3)
    assert torch.equal(l64.float(), nf_levels(3))
    with pytest.raises(ValueError, match="NF bits"):
        nf_levels(9)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_grid_search_is_the_nearest_level(k):
    x = torch.cat([torch.linspace(-1.3, 1.3, 20001), nf_midpoints(k)])  # includes every exact tie
    codes = nearest_level_index(x, k).long()
    # O(n·L) reference with exact distances (float64 differences of float32 numbers); argmin → lower on ties.
    brute = (x.double()[:, None] - nf_levels(k).double()[None, :]).abs().argmin(dim=1)
    assert torch.equal(codes, brute)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_grid_search_equals_the_binary_search_at_every_edge(k):
    """The grid lookup must agree with bucketize everywhere, in particular right at and beside each
    midpoint and each grid-cell edge (where the cell computation's rounding can be one cell off)."""
    mids, cells = nf_midpoints(k), torch.linspace(-1, 1, GRID_CELLS + 1)
    up, down = torch.full((1,), 9.0), torch.full((1,), -9.0)
    xs = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(k)) * 0.6, mids, cells,
                    torch.nextafter(mids, up.expand_as(mids)), torch.nextafter(mids, down.expand_as(mids)),
                    torch.nextafter(cells, up.expand_as(cells)), torch.nextafter(cells, down.expand_as(cells)),
                    torch.tensor([-3e38, -2.5, -1.0, -0.0, 0.0, 1.0, 2.5, 3e38, float("inf"), -float("inf")])])
    reference = nearest_level_index_reference(xs, k)
    assert torch.equal(grid_level_index(xs, k), reference)
    assert torch.equal(nearest_level_index(xs, k), reference)
    # the level itself, from a cell computed once for every k (the cost-table sweep's path)
    assert torch.equal(grid_level_value(xs, grid_cell(xs), k), nf_levels(k)[reference.long()])
