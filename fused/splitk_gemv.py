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

from cf_cute.primitives import pdl_handoff
from cf_cute.primitives.cluster_reduce import ClusterReduceBuffers
from cf_cute.primitives.plan import check_cluster_size, check_smem

from .mma_gemv import (batch_reduce, check_weight_layout, mma_atom, new_acc, prefetch_rows_l2, reduce_scatter_rows,
                       store_acc, warp_gemv_tile, weight_view, x_smem_layout)

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

    @property
    def tile_a_warp(self) -> bool:
        """At most one 16-row tile of the block a warp (what ``SplitKGemv.block``'s
        ``early_loads`` needs)."""
        return self.block_m // 16 <= self.num_threads // _WARP


class SplitKGemvBuffers:
    """Shared memory of one SplitKGemv block (trace-time object)."""

    def __init__(self, red: ClusterReduceBuffers, sX: cute.Tensor, sPart: cute.Tensor):
        self.red = red        # the cluster reduce's ring and mbarriers
        self.sX = sX          # x slice [n_tiles * 8, K / C] (mma_gemv.x_smem_layout)
        self.sPart = sPart    # fp32 partial sums [frag_batch, block_m]


class SplitKGemv:
    """``y[b, m] = sum_k x[b, k] * W[m, k]``, fp32 accumulation, one launch."""

    def __init__(self, cfg: SplitKGemvConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        # the reduced fragment covers `frag_batch` >= batch requests (zero padding rows when
        # batch x block_m values do not lay over the threads, e.g. 9 x 128 over 256)
        self.red, self.frag_batch = batch_reduce(cfg.batch, cfg.block_m, cfg.n_tiles * 8, cfg.cluster_size,
                                                 cfg.num_threads)
        kc = cfg.k // cfg.cluster_size
        self.smem_bytes = (self.red.smem_bytes + 2 * cfg.n_tiles * 8 * (kc + 32)
                           + 4 * self.frag_batch * cfg.block_m + 64)
        check_smem(f"SplitKGemv(batch {cfg.batch}, K slice {kc})", self.smem_bytes)

    @cute.jit
    def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor, stream):
        mW = weight_view(mW, self.cfg.w_layout)
        self.kernel(mX, mW, mR, mY).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream, use_pdl=self.cfg.pdl)

    @cute.jit
    def allocate(self, smem) -> SplitKGemvBuffers:
        """Carve this kernel's shared memory out of a ``cutlass.memory.SmemAllocator``."""
        cfg = self.cfg
        bufs = self.red.allocate(smem)
        sX = smem.allocate_tensor(self.dtype, x_smem_layout(cfg.n_tiles, cfg.k // cfg.cluster_size),
                                  byte_alignment=16)
        sPart = smem.allocate_tensor(Float32, cute.make_layout((self.frag_batch, cfg.block_m)), byte_alignment=16)
        return SplitKGemvBuffers(bufs, sX, sPart)

    @cute.jit
    def prefetch(self, mW: cute.Tensor, m_base: Int32, k0: Int32):
        """Ask L2 for this CTA's W block (rows ``m_base ..``, its K slice from ``k0``)."""
        cfg = self.cfg
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        for mt in cutlass.range(warp, cfg.block_m // 16, cfg.num_threads // _WARP, unroll=1):
            prefetch_rows_l2(mW, m_base + mt * 16, 16, k0, cfg.k // cfg.cluster_size, lane)

    @cute.jit
    def load_x(self, b: SplitKGemvBuffers, mX: cute.Tensor, k0: Int32, front=None):
        """``front`` (if any), then the x slice from ``k0`` -> ``b.sX`` (rows past the
        batch zero), then a CTA barrier."""
        cfg = self.cfg
        B, NT = cfg.batch, cfg.n_tiles
        kc = cfg.k // cfg.cluster_size
        tidx = cute.arch.thread_idx()[0]
        if const_expr(front is not None):
            front()
        for i in cutlass.range(tidx, NT * 8 * (kc // _VEC), cfg.num_threads, unroll=1):
            bb = i // (kc // _VEC)
            j = i % (kc // _VEC)
            dst = cute.local_tile(b.sX, (1, _VEC), (bb, j))
            if bb < B:
                dst.store(cute.local_tile(mX, (1, _VEC), (bb, k0 // _VEC + j)).load())
            else:
                dst.fill(0.0)
        cute.arch.barrier()

    @cute.jit
    def block(self, b: SplitKGemvBuffers, mX: cute.Tensor, mW: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor,
              m_base: Int32, k0: Int32, round_idx: Int32, wait_cluster: cutlass.Constexpr[bool] = True,
              front=None, early_loads: cutlass.Constexpr[bool] = False):
        """One cluster's block of ``block_m`` rows: this CTA's K slice from ``k0``, the
        cluster's reduce-scatter (round ``round_idx``), its share of ``y`` written.
        ``wait_cluster``: run the cluster wait that pairs with the caller's relaxed
        arrive just before the first DSMEM transfer. ``front``: traced for every thread
        before the x slice is read (e.g. a grid barrier that makes x visible).
        ``early_loads``: each warp issues its first block of W loads before ``front``
        and the x slice (needs ``block_m / 16 <= warps``)."""
        cfg = self.cfg
        B, BM, NT = cfg.batch, cfg.block_m, cfg.n_tiles
        NW = cfg.num_threads // _WARP
        kc = cfg.k // cfg.cluster_size
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()

        def load_x():
            self.load_x(b, mX, k0, front)

        atom = mma_atom(mW.element_type)
        if const_expr(early_loads):
            assert cfg.tile_a_warp, "early_loads: one 16-row tile a warp at most"
            for mt in cutlass.range(warp, BM // 16, NW, unroll=1):
                acc = new_acc(NT)
                warp_gemv_tile(atom, mW, m_base + mt * 16, k0, b.sX, acc, lane, kc // _STEP, NT, cfg.unroll,
                               front=load_x)
                store_acc(acc, b.sPart, mt * 16, lane, NT, B)
            if warp >= BM // 16:
                self.load_x(b, mX, k0, front)
        else:
            load_x()
            for mt in cutlass.range(warp, BM // 16, NW, unroll=1):
                acc = new_acc(NT)
                warp_gemv_tile(atom, mW, m_base + mt * 16, k0, b.sX, acc, lane, kc // _STEP, NT, cfg.unroll)
                store_acc(acc, b.sPart, mt * 16, lane, NT, B)
        cute.arch.barrier()

        # fragment position p = b * BM + row; padding requests (see __init__) read as zero
        def put(bb, row, val):
            self.put(mR, mY, bb, m_base + row, val)

        reduce_scatter_rows(self.red, b.red, b.sPart, B, self.frag_batch, BM, round_idx, wait_cluster, put)

    @cute.jit
    def put(self, mR: cute.Tensor, mY: cute.Tensor, bb: Int32, m: Int32, val: Float32):
        if const_expr(self.cfg.residual):
            val = val + Float32(mR[bb, m])
        mY[bb, m] = self.dtype(val)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor):
        cfg = self.cfg
        C = cfg.cluster_size
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        m_base = (bidx // C) * cfg.block_m
        k0 = rank * (cfg.k // C)

        smem = cutlass.memory.SmemAllocator()
        b = self.allocate(smem)
        self.red.init(b.red)
        cute.arch.cluster_arrive_relaxed()
        if const_expr(cfg.pdl):                  # W does not depend on the previous launch: ask L2 for it
            self.prefetch(mW, m_base, k0)
            pdl_handoff()
        self.block(b, mX, mW, mR, mY, m_base, k0, Int32(0))
        self.red.teardown()
