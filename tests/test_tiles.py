"""The tiled weight order (cf_cute.tiles, fused.mma_gemv.tiled_layout): CPU only."""

import pytest
import torch

import cutlass
import cutlass.cute as cute

from cf_cute.fused.mma_gemv import tiled_layout
from cf_cute.tiles import linear_weight, tile_weight, untile_weight


def _offset(row: int, k: int, K: int) -> int:
    """The order as the docstrings write it."""
    t, h, r = row // 16, (row // 8) % 2, row % 8
    s, c, e = k // 32, (k // 8) % 4, k % 8
    return ((t * (K // 32) + s) * 2 + h) * 256 + (4 * r + c) * 8 + e


@pytest.mark.parametrize("m,k", [(16, 32), (48, 96), (64, 160)])
def test_tile_weight_follows_the_documented_order(m, k):
    w = torch.randn(m, k, dtype=torch.bfloat16)
    flat = tile_weight(w).view(-1)
    idx = torch.tensor([[_offset(r, c, k) for c in range(k)] for r in range(m)])
    assert torch.equal(flat[idx], w)
    assert torch.equal(untile_weight(tile_weight(w)), w)
    assert linear_weight(w, "linear") is w
    assert torch.equal(linear_weight(tile_weight(w), "tiled"), w)


def test_a_stack_is_tiled_as_its_flattened_matrix():
    w = torch.randn(3, 48, 64)
    assert torch.equal(tile_weight(w), tile_weight(w.view(-1, 64)).view(3, 48, 64))
    assert torch.equal(untile_weight(tile_weight(w)), w)


_traced = {}


@cute.jit
def _trace_offsets(m: cutlass.Constexpr[int], k: cutlass.Constexpr[int]):
    lay = tiled_layout(m, k)
    for r in cutlass.range_constexpr(m):
        for c in cutlass.range_constexpr(k):
            _traced[(r, c)] = cute.crd2idx((r, c), lay)


def test_kernel_layout_equals_the_torch_packing():
    """The CuTe layout the kernels index with puts (row, k) where tile_weight put it."""
    m, k = 32, 96
    _traced.clear()
    _trace_offsets(m, k)
    assert all(int(_traced[(r, c)]) == _offset(r, c, k) for r in range(m) for c in range(k))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="M % 16"):
        tile_weight(torch.empty(24, 64))
    with pytest.raises(ValueError, match="K % 32"):
        tile_weight(torch.empty(32, 48))
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        tile_weight(torch.empty(16 * 64))
    with pytest.raises(ValueError, match="M % 16"):
        tile_weight(torch.empty(2, 24, 64))
    with pytest.raises(ValueError, match="layout"):
        linear_weight(torch.empty(16, 32), "blocked")
