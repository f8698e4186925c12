"""Split-K GEMV finished by a cluster reduce-scatter: ``y = x @ W.T (+ r)``.

The smallest useful fused kernel built only from the public primitives, and
the README's example of writing your own.

Work split (cluster of C CTAs per block of BM output rows)::

        K  ->   | CTA 0 | CTA 1 | ... | CTA C-1 |     each CTA: BM rows x K/C columns
    W [M, K]    |  BM rows of this cluster         |
                                                         partials: fp32 [B, BM] per CTA
    ClusterReduce.reduce_scatter over DSMEM  ->  CTA r owns rows r*BM/C .. (r+1)*BM/C - 1
                                                 and writes them to y (no atomics)

Inside a CTA the x slice is staged in shared memory (``fused.mma_gemv``
layout) and warp w takes the 16-row tiles w, w + W_, ... of the block, each
over the CTA's whole K slice, on tensor cores (``warp_gemv_tile``: lanes
stream 16-byte vectors of W, requests on the MMA's N side, so W is read once
for the whole batch). The fp32 tile results go to ``sPart[b, row]``; after a
CTA barrier the threads pick up the reduce-scatter fragment from there.

Shapes are static per compiled kernel: ``K`` must be a multiple of
``C * 32`` (one MMA step), ``M`` of ``BM``, ``BM`` of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import ClusterReduce, pdl_handoff
from cf_cute.primitives.plan import check_cluster_size, check_smem

from .mma_gemv import (check_weight_layout, mma_atom, new_acc, prefetch_rows_l2, store_acc, warp_gemv_tile,
                       weight_view, x_smem_layout)

__all__ = ["SplitKGemvConfig", "SplitKGemv"]

_VEC = 8          # 16 bytes of bf16/fp16
_WARP = 32
_STEP = 32        # k per MMA step


@dataclass(frozen=True)
class SplitKGemvConfig:
    m: int
    k: int
    batch: int = 1
    cluster_size: int = 4
    block_m: int = 128
    num_threads: int = 256
    unroll: int = 8               # MMA steps of W loads issued ahead per warp
    dtype: str = "bfloat16"
    residual: bool = False        # y = x @ W.T + r (the residual stream), added in fp32
    w_layout: str = "linear"      # memory order of W (mma_gemv.WEIGHT_LAYOUTS; "tiled": cf_cute.tiles)
    pdl: bool = False             # launch as a programmatic dependent of the previous kernel

    def validate(self) -> None:
        check_cluster_size(self.cluster_size)
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype!r}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be in 1..16, got {self.batch}")
        step = self.cluster_size * _STEP
        if self.k % step:
            raise ValueError(f"K = {self.k} must be a multiple of cluster_size * {_STEP} = {step}")
        check_weight_layout(self.w_layout)
        if self.block_m % 16 or self.m % self.block_m:
            raise ValueError(f"M = {self.m} must be a multiple of block_m = {self.block_m}, "
                             f"itself a multiple of 16")

    @property
    def n_tiles(self) -> int:
        """MMA n-tiles of 8 requests."""
        return (self.batch + 7) // 8

    @property
    def grid(self) -> int:
        return self.m // self.block_m * self.cluster_size


class SplitKGemv:
    """``y[b, m] = sum_k x[b, k] * W[m, k]``, fp32 accumulation, one launch."""

    def __init__(self, cfg: SplitKGemvConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        self.red = ClusterReduce(cfg.batch * cfg.block_m, cfg.cluster_size, cfg.num_threads,
                                 op="sum", scatter=True)
        kc = cfg.k // cfg.cluster_size
        self.smem_bytes = (self.red.smem_bytes + 2 * cfg.n_tiles * 8 * (kc + 32)
                           + 4 * cfg.batch * cfg.block_m + 64)
        check_smem(f"SplitKGemv(batch {cfg.batch}, K slice {kc})", self.smem_bytes)

    @cute.jit
    def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor, stream):
        mW = weight_view(mW, self.cfg.w_layout)
        self.kernel(mX, mW, mR, mY).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream, use_pdl=self.cfg.pdl)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor):
        cfg = self.cfg
        B, BM, C = cfg.batch, cfg.block_m, cfg.cluster_size
        n_warps = cfg.num_threads // _WARP
        kc = cfg.k // C
        NT = cfg.n_tiles
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        m_base = (bidx // C) * BM
        k0 = rank * kc

        smem = cutlass.memory.SmemAllocator()
        bufs = self.red.allocate(smem)
        sX = smem.allocate_tensor(mX.element_type, x_smem_layout(NT, kc), byte_alignment=16)
        sPart = smem.allocate_tensor(Float32, cute.make_layout((B, BM)), byte_alignment=16)
        self.red.init(bufs)
        cute.arch.cluster_arrive_relaxed()
        if const_expr(cfg.pdl):                  # W does not depend on the previous launch: ask L2 for it
            for mt in cutlass.range(warp, BM // 16, n_warps, unroll=1):
                prefetch_rows_l2(mW, m_base + mt * 16, 16, k0, kc, lane)
            pdl_handoff()

        # x slice -> shared memory (rows past the batch are zero)
        for i in cutlass.range(tidx, NT * 8 * (kc // _VEC), cfg.num_threads, unroll=1):
            b = i // (kc // _VEC)
            j = i % (kc // _VEC)
            dst = cute.local_tile(sX, (1, _VEC), (b, j))
            if b < B:
                dst.store(cute.local_tile(mX, (1, _VEC), (b, k0 // _VEC + j)).load())
            else:
                dst.fill(0.0)
        cute.arch.barrier()

        atom = mma_atom(mW.element_type)
        for mt in cutlass.range(warp, BM // 16, n_warps, unroll=1):
            acc = new_acc(NT)
            warp_gemv_tile(atom, mW, m_base + mt * 16, k0, sX, acc, lane, kc // _STEP, NT, cfg.unroll)
            store_acc(acc, sPart, mt * 16, lane, NT, B)
        cute.arch.barrier()

        # fragment position p = b * BM + row  (thread t holds p in [t*V, t*V+V))
        V = self.red.per_thread
        frag = self.red.make_fragment()
        p0 = self.red.thread_offset(tidx)
        for v in cutlass.range_constexpr(V):
            frag[v] = sPart[(p0 + v) // BM, (p0 + v) % BM]
        cute.arch.cluster_wait()
        res = self.red.reduce_scatter(bufs, frag, Int32(0))
        if self.red.owns(tidx):
            for v in cutlass.range_constexpr(V):
                p = tidx * V + v
                val = res[v]
                if const_expr(cfg.residual):
                    val = val + Float32(mR[p // BM, m_base + p % BM])
                mY[p // BM, m_base + p % BM] = self.dtype(val)
        self.red.teardown()
