"""``out[b, rows] = h[b, rows] + x[b, :] . W[rows, :]`` for a CTA's 16-row tiles of
``W``, the full K of each tile split over the CTA's warps: the back half of the
fused blocks (the attention block's W_o, the MLP block's W_down), run after a
grid barrier with x (``[B, K]``, just written by the grid) read from L2.

    tile i of this CTA = rows 16 * (first + i * stride) .. +16      (i < count)
    warp w:  acc_w = W[tile, w*K/NW : (w+1)*K/NW] x x[:, same]^T     (mma_gemv, x from global)
    sRed [NW, 16, B] fp32 <- acc_w;  CTA barrier
    out[b, row] = round(h[b, row] + sum_w sRed[w, row, b])        (warp order: deterministic)
    h = hidden (+ residual), fp32

Shared memory: ``sRed`` (``4 * NW * 16 * B`` bytes), allocated by the caller.
Two CTA barriers per tile (sRed is reused).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from .mma_gemv import (mma_atom, new_acc, prefetch_rows_l2, store_acc, warp_gemv_rows, warp_gemv_tile,
                       warp_gemv_tiles_shared_x)

__all__ = ["residual_gemv_tiles", "prefetch_tiles_l2", "RED_WORDS_PER_ROW"]

_WARP = 32
_STEP = 32
RED_WORDS_PER_ROW = 16          # sRed is [warps, 16, batch]


@cute.jit
def prefetch_tiles_l2(mW: cute.Tensor, first: Int32, stride: cutlass.Constexpr[int], count: cutlass.Constexpr[int],
                      warp: Int32, lane: Int32):
    """Ask L2 for this CTA's tiles of ``W`` (warp i: tile i, whole rows; warps past
    ``count`` do nothing)."""
    MT = cute.size(mW, mode=[0]) // 16
    for i in cutlass.range_constexpr(count):
        if warp == i and first + i * stride < MT:
            prefetch_rows_l2(mW, (first + i * stride) * 16, 16, Int32(0), cute.size(mW, mode=[1]), lane)


@cute.jit
def _finish_tile(acc: cute.Tensor, mt: Int32, mHidden: cute.Tensor, mResidual: cute.Tensor, mOut: cute.Tensor,
                 sRed: cute.Tensor, batch: cutlass.Constexpr[int], num_warps: cutlass.Constexpr[int],
                 has_residual: cutlass.Constexpr[bool]):
    """Sum tile ``mt``'s per-warp partials through ``sRed`` in warp order, add h, store."""
    B, NW = batch, num_warps
    tidx = cute.arch.thread_idx()[0]
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    T = NW * _WARP
    dt = mOut.element_type
    # this warp's slice of sRed as [b, row]
    sRedW = cute.make_tensor(sRed.iterator + warp, cute.make_layout((B, 16), stride=(16 * NW, NW)))
    store_acc(acc, sRedW, Int32(0), lane, (B + 7) // 8, B)
    cute.arch.barrier()
    for e in cutlass.range(tidx, 16 * B, T, unroll=1):
        rl = e % 16
        b = e // 16
        tot = Float32(0.0)
        for wi in cutlass.range_constexpr(NW):
            tot = tot + sRed[wi, rl, b]
        row = mt * 16 + rl
        hv = Float32(mHidden[b, row])
        if const_expr(has_residual):
            hv = hv + Float32(mResidual[b, row])
        mOut[b, row] = dt(hv + tot)
    cute.arch.barrier()


@cute.jit
def residual_gemv_tiles(mW: cute.Tensor, mX: cute.Tensor, mHidden: cute.Tensor, mResidual: cute.Tensor,
                        mOut: cute.Tensor, sRed: cute.Tensor, first: Int32, stride: cutlass.Constexpr[int],
                        count: cutlass.Constexpr[int], batch: cutlass.Constexpr[int],
                        num_warps: cutlass.Constexpr[int], unroll: cutlass.Constexpr[int],
                        has_residual: cutlass.Constexpr[bool], shared_x: cutlass.Constexpr[bool] = False,
                        front=None, early_front: cutlass.Constexpr[bool] = False,
                        pipelined: cutlass.Constexpr[bool] = False):
    """See the module docstring. ``mW [M, K]``, ``mX [B, K]``, ``mHidden``/``mResidual``/
    ``mOut [B, M]``; ``count = ceil(M/16 / stride)``, tiles past M/16 skipped.
    ``shared_x``: the CTA's tiles in one lock-step pipeline that reads x once for all of
    them (``warp_gemv_tiles_shared_x``; a tile past M/16 is computed on the last tile and
    dropped); otherwise tile after tile. ``front`` (every thread of the CTA runs it exactly
    once, tile or not), e.g. the grid barrier that completes x: first of all, or with
    ``early_front`` after the first tile's first block of W loads and before any x load, so
    that the first W round trip runs under the barrier's wait. ``pipelined``: the CTA's tiles
    in one load pipeline per warp (``warp_gemv_rows``, x read per tile) and summed only after
    the last, so that no CTA barrier stands between one tile's stream and the next: a warp
    whose ``front`` (run per warp, e.g. a wait for its own K slice of x) returns early streams
    all its tiles ahead of a late one. Same bits as tile after tile (each tile's sum is the
    same)."""
    if const_expr(front is not None and not early_front):
        front()
        front = None
    B, NW = batch, num_warps
    lane = cute.arch.lane_idx()
    warp = cute.arch.warp_idx()
    MT = cute.size(mW, mode=[0]) // 16
    kw = cute.size(mW, mode=[1]) // NW
    n_tiles = (B + 7) // 8
    atom = mma_atom(mW.element_type)
    if const_expr(pipelined or shared_x):
        assert not (pipelined and shared_x), "pipelined and shared_x are two orders of the same tiles: pick one"
        rows = [cutlass.min(first + i * stride, Int32(MT - 1)) * 16 for i in range(count)]
        if const_expr(pipelined):
            accs = warp_gemv_rows(atom, mW, rows, warp * kw, mX, lane, kw // _STEP, n_tiles, unroll, front=front,
                                  x_rows=B)
        else:
            accs = warp_gemv_tiles_shared_x(atom, mW, rows, warp * kw, mX, lane, kw // _STEP, n_tiles, unroll, B,
                                            front=front)
        for i in cutlass.range_constexpr(count):
            mt = first + i * stride
            if mt < MT:
                _finish_tile(accs[i], mt, mHidden, mResidual, mOut, sRed, B, NW, has_residual)
    else:
        for i in cutlass.range_constexpr(count):
            mt = first + i * stride
            if mt < MT:
                acc = new_acc(n_tiles)
                warp_gemv_tile(atom, mW, mt * 16, warp * kw, mX, acc, lane, kw // _STEP, n_tiles, unroll, B,
                               front=front if i == 0 else None)
                _finish_tile(acc, mt, mHidden, mResidual, mOut, sRed, B, NW, has_residual)
            else:
                if const_expr(i == 0 and front is not None):
                    front()
