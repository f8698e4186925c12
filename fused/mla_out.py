"""MLA out (issue 6, launch 4 of 5): merge the attention splits, then
``o[b, h] = W_UV[h] @ o_lat[b, h]``.

STATUS: compiles for sm_90a; GPU-tested on an H200 (tests/test_mla.py, session 6).

One cluster of C CTAs per head h; CTA r owns the rank slice ``[r*rank/C, (r+1)*rank/C)``::

    weights  warp w takes requests b = w, w + warps, ...: lanes over the splits,
             M_b = max_s m[b, s, h] (warp max), sW[b, s] = 2^(m_s - M_b) (0 for an empty
             split), sInvL[b] = 1 / sum_s sW[b, s] l[b, s, h]        (split order fixed)
    merge    sX[b, d] = round(sInvL[b] * sum_s sW[b, s] part_o[b, s, h, d])   (d in the slice;
             rounded to the activation dtype like the torch step's o_lat)
    GEMV     warp w: 16-row tiles w, w + warps, ... of W_UV[h] ([v, rank], K = the slice),
             requests on the MMA's N side -> sPart[b, row] (fp32)
    reduce   ClusterReduce.reduce_scatter over the C slices (rank order) -> CTA r writes
             its share of o[b, h*v : h*v + v] (activation dtype)

Deterministic: every sum has a fixed order, no atomics. Barrier contract: thread 0
initialises the reduce's mbarriers, relaxed cluster arrive at start, cluster wait
just before the reduce (the merge hides its latency), ``teardown`` before exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import pdl_handoff
from cf_cute.primitives.cluster_reduce import ClusterReduceBuffers
from cf_cute.primitives.plan import check_cluster_size, check_smem

from .mma_gemv import (X_PAD, batch_reduce, check_weight_layout, mma_atom, new_acc, prefetch_rows_l2,
                       reduce_scatter_rows, store_acc, warp_gemv_tile, weight_view, x_smem_layout)

__all__ = ["MLAOutConfig", "MLAOut"]

_WARP = 32
_STEP = 32


@dataclass(frozen=True)
class MLAOutConfig:
    batch: int
    num_heads: int
    kv_lora_rank: int
    v_head_dim: int
    splits: int
    dtype: str = "bfloat16"
    cluster_size: int = 4
    num_threads: int = 256
    unroll: int = 4
    w_layout: str = "linear"      # memory order of w_uv viewed as [heads * v, rank] (mma_gemv.WEIGHT_LAYOUTS)
    pdl: bool = False             # launch as a programmatic dependent of the previous kernel
    merge_unroll: int = 32        # split loads in flight per thread in the merge (L2 latency chain: splits / this)

    @property
    def n_tiles(self) -> int:
        return (self.batch + 7) // 8

    @property
    def slice(self) -> int:
        return self.kv_lora_rank // self.cluster_size

    @property
    def grid(self) -> int:
        return self.num_heads * self.cluster_size

    def validate(self) -> None:
        check_cluster_size(self.cluster_size)
        check_weight_layout(self.w_layout)
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype!r}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be in 1..16, got {self.batch}")
        if self.kv_lora_rank % (self.cluster_size * _STEP):
            raise ValueError(f"kv_lora_rank = {self.kv_lora_rank} must be a multiple of cluster_size * {_STEP}")
        if self.v_head_dim % 16:
            raise ValueError(f"v_head_dim = {self.v_head_dim} must be a multiple of 16")
        if self.splits < 1:
            raise ValueError(f"splits must be >= 1, got {self.splits}")


class MLAOutBuffers:
    """Shared memory of one MLAOut head (trace-time object)."""

    def __init__(self, red: ClusterReduceBuffers, sX, sPart, sW, sInvL):
        self.red = red        # the cluster reduce's ring and mbarriers
        self.sX = sX          # merged o_lat slice [n_tiles * 8, rank / C] (activation dtype)
        self.sPart = sPart    # fp32 W_UV partial sums [frag_batch, v]
        self.sW = sW          # split weights [B, splits]
        self.sInvL = sInvL    # 1 / merged softmax denominator [B]


class MLAOut:
    def __init__(self, cfg: MLAOutConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        # the reduced fragment covers `frag_batch` >= batch requests (e.g. 9 x 128 values do not
        # lay over 256 threads, 10 x 128 do); the padding rows are zero and never written out
        self.red, self.frag_batch = batch_reduce(cfg.batch, cfg.v_head_dim, cfg.n_tiles * 8, cfg.cluster_size,
                                                 cfg.num_threads, stages=1)
        self.smem_bytes = (self.red.smem_bytes + 2 * cfg.n_tiles * 8 * (cfg.slice + X_PAD)
                           + 4 * self.frag_batch * cfg.v_head_dim + 4 * cfg.batch * (cfg.splits + 1) + 64)
        check_smem(f"MLAOut(batch {cfg.batch}, splits {cfg.splits})", self.smem_bytes)

    @cute.jit
    def __call__(self, mPartO: cute.Tensor, mPartML: cute.Tensor, mWuv: cute.Tensor, mO: cute.Tensor, stream):
        mWuv = weight_view(mWuv, self.cfg.w_layout)
        self.kernel(mPartO, mPartML, mWuv, mO).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream, use_pdl=self.cfg.pdl)

    @cute.jit
    def split_weights(self, mPartML: cute.Tensor, sW: cute.Tensor, sInvL: cute.Tensor, h: Int32):
        """sW[b, s] = 2^(m_s - max_s m_s), sInvL[b] = 1 / sum_s sW l_s (lane order, then a
        shuffle tree: the same bits in every CTA of the cluster)."""
        cfg = self.cfg
        S, NW = cfg.splits, cfg.num_threads // _WARP
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        NS = (S + _WARP - 1) // _WARP
        for b in cutlass.range(warp, cfg.batch, NW, unroll=1):
            mx = -Float32.inf
            for k in cutlass.range_constexpr(NS):
                s = lane + k * _WARP
                if s < S:
                    mx = cute.arch.fmax(mx, mPartML[b, s, 0, h])
            mx = cute.arch.warp_reduction_max(mx)
            lsum = Float32(0.0)
            for k in cutlass.range_constexpr(NS):
                s = lane + k * _WARP
                if s < S:
                    m_s = mPartML[b, s, 0, h]
                    w = Float32(0.0)
                    if m_s != -Float32.inf:
                        w = cute.math.exp2(m_s - mx, fastmath=True)
                    sW[b, s] = w
                    lsum = lsum + w * mPartML[b, s, 1, h]
            lsum = cute.arch.warp_reduction_sum(lsum)
            if lane == 0:
                sInvL[b] = Float32(1.0) / lsum

    @cute.jit
    def merge(self, mPartO: cute.Tensor, sW: cute.Tensor, sInvL: cute.Tensor, sX: cute.Tensor, h: Int32,
              k0: Int32):
        """sX[b, d - k0] = o_lat[b, h, d] for d in this CTA's slice (rows past the batch zero)."""
        cfg = self.cfg
        KS, B = cfg.slice, cfg.batch
        tidx = cute.arch.thread_idx()[0]
        for e in cutlass.range(tidx, cfg.n_tiles * 8 * KS, cfg.num_threads, unroll=1):
            b = e // KS
            d = e % KS
            val = Float32(0.0)
            if b < B:
                acc = Float32(0.0)
                for s in cutlass.range(cfg.splits, unroll=cfg.merge_unroll):
                    acc = acc + sW[b, s] * mPartO[b, s, h, k0 + d]
                val = acc * sInvL[b]
            sX[b, d] = self.dtype(val)

    @cute.jit
    def allocate(self, smem) -> MLAOutBuffers:
        """Carve this kernel's shared memory out of a ``cutlass.memory.SmemAllocator``."""
        cfg = self.cfg
        bufs = self.red.allocate(smem)
        sX = smem.allocate_tensor(self.dtype, x_smem_layout(cfg.n_tiles, cfg.slice), byte_alignment=16)
        sPart = smem.allocate_tensor(Float32, cute.make_layout((self.frag_batch, cfg.v_head_dim),
                                                               stride=(cfg.v_head_dim, 1)), byte_alignment=16)
        sW = smem.allocate_tensor(Float32, cute.make_layout((cfg.batch, cfg.splits), stride=(cfg.splits, 1)),
                                  byte_alignment=16)
        sInvL = smem.allocate_tensor(Float32, cute.make_layout(cfg.batch), byte_alignment=16)
        return MLAOutBuffers(bufs, sX, sPart, sW, sInvL)

    @cute.jit
    def prefetch(self, mWuv: cute.Tensor, h: Int32, k0: Int32):
        """Ask L2 for this CTA's W_UV rows (head ``h``, its rank slice from ``k0``)."""
        cfg = self.cfg
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        for mt in cutlass.range(warp, cfg.v_head_dim // 16, cfg.num_threads // _WARP, unroll=1):
            prefetch_rows_l2(mWuv, h * cfg.v_head_dim + mt * 16, 16, k0, cfg.slice, lane)

    @cute.jit
    def head(self, b: MLAOutBuffers, mPartO: cute.Tensor, mPartML: cute.Tensor, mWuv: cute.Tensor,
             mO: cute.Tensor, h: Int32, k0: Int32, round_idx: Int32, wait_cluster: cutlass.Constexpr[bool] = True):
        """Head ``h`` over this CTA's rank slice from ``k0``: merge, W_UV, the cluster's
        reduce-scatter (round ``round_idx``), its share of ``o[:, h]`` written.
        ``wait_cluster``: run the cluster wait that pairs with the caller's relaxed arrive
        just before the first DSMEM transfer (the merge hides its latency)."""
        cfg = self.cfg
        B, V, NT = cfg.batch, cfg.v_head_dim, cfg.n_tiles
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        self.split_weights(mPartML, b.sW, b.sInvL, h)
        cute.arch.barrier()
        self.merge(mPartO, b.sW, b.sInvL, b.sX, h, k0)
        cute.arch.barrier()

        atom = mma_atom(mWuv.element_type)
        for mt in cutlass.range(warp, V // 16, cfg.num_threads // _WARP, unroll=1):
            acc = new_acc(NT)
            warp_gemv_tile(atom, mWuv, h * V + mt * 16, k0, b.sX, acc, lane, cfg.slice // _STEP, NT, cfg.unroll)
            store_acc(acc, b.sPart, mt * 16, lane, NT, B)
        cute.arch.barrier()

        # fragment position p = b * V + row (requests >= B: zero padding, see __init__)
        def put(bb, row, val):
            mO[bb, h * V + row] = self.dtype(val)

        reduce_scatter_rows(self.red, b.red, b.sPart, B, self.frag_batch, V, round_idx, wait_cluster, put)

    @cute.kernel
    def kernel(self, mPartO: cute.Tensor, mPartML: cute.Tensor, mWuv: cute.Tensor, mO: cute.Tensor):
        cfg = self.cfg
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        h = bidx // cfg.cluster_size
        k0 = rank * cfg.slice

        smem = cutlass.memory.SmemAllocator()
        b = self.allocate(smem)
        self.red.init(b.red)
        cute.arch.cluster_arrive_relaxed()
        if const_expr(cfg.pdl):                  # W_UV does not depend on the previous launch: ask L2 for it
            self.prefetch(mWuv, h, k0)
            pdl_handoff()
        self.head(b, mPartO, mPartML, mWuv, mO, h, k0, Int32(0))
        self.red.teardown()
