"""MLA front (issue 6, launch 1 of 5): (residual add) + RMSNorm + the whole
``[q | ckv]`` projection of DeepSeek-V2 in one weight stream.

STATUS: compiles for sm_90a; GPU-tested on an H200 (tests/test_mla.py, session 6).

``y = rmsnorm(hidden (+ residual)) * norm  @  w_front.T`` with ``w_front [rows,
hidden]`` = [q_proj rows (heads * (nope + rope)) | kv_a rows (rank + rope)]
(``cf_cute.mla.pack_mla``). Work split (cluster of C CTAs per block of BM rows)::

        hidden ->  | CTA 0 | CTA 1 | ... | CTA C-1 |    CTA r: x slice r (NormSlice: the sums of
    w_front        |   BM rows of this cluster      |   squares all-reduced over the cluster)
                   warp w: 16-row tile  w % (BM/16),  K part  w // (BM/16) of the CTA's slice
    sPart [k_parts, B, BM] fp32 -> summed in k-part order -> ClusterReduce.reduce_scatter
    -> CTA r writes rows r*BM/C .. of y [B, rows] (activation dtype, rounded once, like
       ``x @ w_front.T`` in torch)

Requests sit on the MMA's N side (``fused.mma_gemv``), so w_front is read once for
the whole batch. Cluster 0 also writes h = hidden + residual (activation dtype) to
``h_out`` when a residual is added: the residual stream of the block's output.

Barrier contract: thread 0 initialises both collectives' mbarriers, one relaxed
cluster arrive, NormSlice waits on it before its first DSMEM transfer (it covers the
GEMV's reduce too); ``teardown`` (a cluster barrier) before exit. ``early_loads``: each
warp's first block of weight loads is issued before the norm (NormSlice starts with
``griddepcontrol.wait``, so under ``pdl`` those loads also overlap the previous launch). Named barriers:
1 = the norm collective, 2 = the GEMV reduce. Deterministic: fixed orders, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import ClusterReduce
from cf_cute.primitives.plan import check_cluster_size, check_smem

from .mma_gemv import check_weight_layout, mma_atom, new_acc, store_acc, warp_gemv_tile, weight_view
from .rmsnorm_slice import NormSlice, NormSliceConfig

__all__ = ["MLAFrontConfig", "MLAFront"]

_WARP = 32
_STEP = 32        # k per MMA step


@dataclass(frozen=True)
class MLAFrontConfig:
    batch: int
    hidden: int
    rows: int                     # heads * (nope + rope) + rank + rope
    eps: float
    has_residual: bool = False
    dtype: str = "bfloat16"
    cluster_size: int = 2
    block_m: int = 64             # rows a cluster owns
    num_threads: int = 256
    unroll: int = 8               # MMA steps of weight loads in flight per warp
    w_layout: str = "linear"      # memory order of w_front (mma_gemv.WEIGHT_LAYOUTS)
    early_loads: bool = False     # each warp's first block of w_front loads issued before the norm front
    pdl: bool = False             # launch as a programmatic dependent (NormSlice waits before reading h)

    @property
    def n_tiles(self) -> int:
        return (self.batch + 7) // 8

    @property
    def tiles_per_block(self) -> int:
        return self.block_m // 16

    @property
    def k_parts(self) -> int:
        return self.num_threads // _WARP // self.tiles_per_block

    @property
    def grid(self) -> int:
        return self.rows // self.block_m * self.cluster_size

    def validate(self) -> None:
        check_cluster_size(self.cluster_size)
        check_weight_layout(self.w_layout)
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype!r}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be in 1..16, got {self.batch}")
        if self.block_m % 16 or self.rows % self.block_m:
            raise ValueError(f"w_front rows = {self.rows} must be a multiple of block_m = {self.block_m}, "
                             f"itself a multiple of 16")
        n_warps = self.num_threads // _WARP
        if n_warps % self.tiles_per_block:
            raise ValueError(f"{n_warps} warps do not split evenly over {self.tiles_per_block} row tiles")
        step = self.cluster_size * self.k_parts * _STEP
        if self.hidden % step:
            raise ValueError(f"hidden = {self.hidden} must be a multiple of cluster_size * k_parts * {_STEP} "
                             f"= {step}")


class MLAFront:
    """``y = rmsnorm(h) @ w_front.T`` (module docstring), one launch."""

    def __init__(self, cfg: MLAFrontConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        self.norm = NormSlice(NormSliceConfig(batch=cfg.batch, hidden=cfg.hidden, cluster_size=cfg.cluster_size,
                                              num_threads=cfg.num_threads, eps=cfg.eps,
                                              has_residual=cfg.has_residual, dtype=cfg.dtype, barrier_id=1))
        self.red = ClusterReduce(cfg.batch * cfg.block_m, cfg.cluster_size, cfg.num_threads, op="sum",
                                 scatter=True, stages=1, barrier_id=2)
        self.smem_bytes = (self.norm.smem_bytes + self.red.smem_bytes
                           + 4 * cfg.k_parts * cfg.batch * cfg.block_m + 64)
        check_smem(f"MLAFront(batch {cfg.batch})", self.smem_bytes)

    @cute.jit
    def __call__(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mW: cute.Tensor,
                 mY: cute.Tensor, mHOut: cute.Tensor, stream):
        mW = weight_view(mW, self.cfg.w_layout)
        self.kernel(mHidden, mResidual, mNormW, mW, mY, mHOut).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream, use_pdl=self.cfg.pdl)

    @cute.jit
    def gemv_part(self, mW: cute.Tensor, sX: cute.Tensor, sPart: cute.Tensor, m_base: Int32, k0: Int32,
                  front=None):
        """Warp w: ``sPart[kp, b, tile*16 + row] = x_b . W[m_base + tile*16 + row, K part kp]``
        (``front``: traced between the first block of weight loads and the first MMA)."""
        cfg = self.cfg
        TB, NT = cfg.tiles_per_block, cfg.n_tiles
        kpl = cfg.hidden // cfg.cluster_size // cfg.k_parts
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        mt = warp % TB
        kp = warp // TB
        # the x columns of this K part; local_tile keeps the 16-byte alignment of the rows
        sXk = cute.local_tile(sX, (NT * 8, kpl), (0, kp))
        acc = new_acc(NT)
        warp_gemv_tile(mma_atom(mW.element_type), mW, m_base + mt * 16, k0 + kp * kpl, sXk, acc, lane,
                       kpl // _STEP, NT, cfg.unroll, front=front)
        store_acc(acc, sPart[kp, None, None], mt * 16, lane, NT, cfg.batch)

    @cute.kernel
    def kernel(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mW: cute.Tensor,
               mY: cute.Tensor, mHOut: cute.Tensor):
        cfg = self.cfg
        B, BM, C, KP = cfg.batch, cfg.block_m, cfg.cluster_size, cfg.k_parts
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        m_base = (bidx // C) * BM
        k0 = rank * (cfg.hidden // C)

        smem = cutlass.memory.SmemAllocator()
        nbufs = self.norm.allocate(smem)
        rbufs = self.red.allocate(smem)
        sPart = smem.allocate_tensor(Float32, cute.make_layout((KP, B, BM), stride=(B * BM, BM, 1)),
                                     byte_alignment=16)
        self.norm.init(nbufs)
        self.red.init(rbufs)
        cute.arch.cluster_arrive_relaxed()

        # x slice -> nbufs.sX (waits on the cluster barrier above); cluster 0 writes h
        def front():
            self.norm(nbufs, mHidden, mResidual, mNormW, mHOut, bidx < C)   # starts with griddepcontrol.wait
            if const_expr(cfg.pdl):
                cute.arch.griddepcontrol_launch_dependents()

        if const_expr(cfg.early_loads):      # the norm runs while the first weight loads are in flight
            self.gemv_part(mW, nbufs.sX, sPart, m_base, k0, front=front)
        else:
            front()
            self.gemv_part(mW, nbufs.sX, sPart, m_base, k0)
        cute.arch.barrier()

        # fragment position p = b * BM + row; the K parts summed in a fixed order
        V = self.red.per_thread
        frag = self.red.make_fragment()
        p0 = self.red.thread_offset(tidx)
        for v in cutlass.range_constexpr(V):
            tot = Float32(0.0)
            for kp in cutlass.range_constexpr(KP):
                tot = tot + sPart[kp, (p0 + v) // BM, (p0 + v) % BM]
            frag[v] = tot
        res = self.red.reduce_scatter(rbufs, frag, Int32(0))
        if self.red.owns(tidx):
            for v in cutlass.range_constexpr(V):
                p = tidx * V + v
                mY[p // BM, m_base + p % BM] = self.dtype(res[v])
        self.red.teardown()
