"""MLA out + output projection in one launch (issue 6, launches 4 and 5 of the
fused path as one): merge the attention splits, ``o = W_UV o_lat`` per head, a
grid barrier, then ``out = h + o @ wo.T``.

STATUS: compiles for sm_90a (tests/test_mla.py); GPU-tested through ``mla_decode``.

The two halves are :class:`~cf_cute.fused.mla_out.MLAOut` and
:class:`~cf_cute.fused.splitk_gemv.SplitKGemv`, traced into one kernel over the
same grid: G clusters of C CTAs with ``G = num_heads = hidden / block_m`` (the plan
picks ``block_m = hidden / num_heads``)::

    cluster g, CTA r
    phase 1  head g, rank slice r      (MLAOut.head: merge in split order, W_UV,
                                        reduce-scatter)      -> o[:, g*v : (g+1)*v]  (global, L2)
    ------   GridBarrier.sync           every o column written and visible
    phase 2  wo rows g*BM .. (g+1)*BM, K slice r = heads r*heads/C ..  (SplitKGemv.block:
             x slice of o -> shared memory, tensor-core GEMV, reduce-scatter,
             + residual)                                      -> out

Shared memory: both halves' buffers side by side (``MLAOut.allocate`` then
``SplitKGemv.allocate``), each with its own ClusterReduce ring (round 0 of each).

Barrier contract: thread 0 initialises both reduces' mbarriers, one relaxed cluster
arrive at start and its wait before phase 1 (after the PDL hand-off, so it costs
nothing); the grid barrier needs every CTA resident: G * C CTAs of one wave (the plan
keeps G <= 16 clusters, far below the 30 clusters of 4 an H100 holds with one CTA an
SM). Under ``pdl`` every CTA prefetches its W_UV and wo rows into L2 before the hand-off,
and the next launch starts only after every CTA of this one passed the hand-off (so all
are resident by then: the dependent cannot take the SMs the barrier waits for).
``early_loads``: each warp issues its first block of wo loads before the grid barrier,
so the barrier's wait overlaps their L2 round trip. One cluster barrier (``teardown``)
before exit. Deterministic: fixed orders, integer atomics only in the grid barrier.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

from cf_cute.primitives import GridBarrier, pdl_handoff
from cf_cute.primitives.plan import check_smem

from .mla_out import MLAOut, MLAOutConfig
from .mma_gemv import weight_view
from .splitk_gemv import SplitKGemv, SplitKGemvConfig

__all__ = ["MLAOutProjConfig", "MLAOutProj", "MAX_CLUSTERS"]

MAX_CLUSTERS = 16       # clusters of the grid (every CTA must be resident for the grid barrier)


@dataclass(frozen=True)
class MLAOutProjConfig:
    out: MLAOutConfig             # phase 1 (its batch, heads, splits, dtype, cluster size, threads, pdl)
    wo: SplitKGemvConfig          # phase 2 (k = heads * v_head_dim, m = hidden, residual)
    early_loads: bool = True      # phase 2's first block of wo loads issued before the grid barrier

    @property
    def cluster_size(self) -> int:
        return self.out.cluster_size

    @property
    def clusters(self) -> int:
        return self.out.num_heads

    @property
    def grid(self) -> int:
        return self.clusters * self.out.cluster_size

    def validate(self) -> None:
        o, w = self.out, self.wo
        o.validate()
        w.validate()
        same = ("batch", "dtype", "cluster_size", "num_threads", "w_layout", "pdl")
        for f in same:
            if getattr(o, f) != getattr(w, f):
                raise ValueError(f"MLAOutProj: out.{f} = {getattr(o, f)!r} but wo.{f} = {getattr(w, f)!r}")
        if w.k != o.num_heads * o.v_head_dim:
            raise ValueError(f"wo.k = {w.k} must be num_heads * v_head_dim = {o.num_heads * o.v_head_dim}")
        if w.m // w.block_m != o.num_heads:
            raise ValueError(f"wo blocks (m / block_m = {w.m} / {w.block_m}) must equal num_heads = {o.num_heads}: "
                             f"one cluster does a head, then a block")
        if self.clusters > MAX_CLUSTERS:
            raise ValueError(f"{self.clusters} clusters: at most {MAX_CLUSTERS} (the grid barrier needs every CTA "
                             f"resident)")
        if self.early_loads and not w.tile_a_warp:
            raise ValueError(f"early_loads needs block_m / 16 = {w.block_m // 16} <= warps = {w.num_threads // 32}")


class MLAOutProj:
    """``out = h + (W_UV merge(o_lat)) @ wo.T`` (module docstring), one launch."""

    def __init__(self, cfg: MLAOutProjConfig):
        cfg.validate()
        self.cfg = cfg
        self.out = MLAOut(cfg.out)
        self.wo = SplitKGemv(cfg.wo)
        self.barrier = GridBarrier(cfg.grid)
        self.smem_bytes = self.out.smem_bytes + self.wo.smem_bytes
        check_smem(f"MLAOutProj(batch {cfg.out.batch}, splits {cfg.out.splits})", self.smem_bytes)

    @cute.jit
    def __call__(self, mPartO: cute.Tensor, mPartML: cute.Tensor, mWuv: cute.Tensor, mO: cute.Tensor,
                 mWo: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor, mState: cute.Tensor, stream):
        mWuv = weight_view(mWuv, self.cfg.out.w_layout)
        mWo = weight_view(mWo, self.cfg.wo.w_layout)
        C = self.cfg.out.cluster_size
        self.kernel(mPartO, mPartML, mWuv, mO, mWo, mR, mY, mState).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.out.num_threads, 1, 1], cluster=[C, 1, 1],
            stream=stream, use_pdl=self.cfg.out.pdl)

    @cute.kernel
    def kernel(self, mPartO: cute.Tensor, mPartML: cute.Tensor, mWuv: cute.Tensor, mO: cute.Tensor,
               mWo: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor, mState: cute.Tensor):
        cfg = self.cfg
        C = cfg.out.cluster_size
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        g = bidx // C
        k0_out = rank * cfg.out.slice
        m_base = g * cfg.wo.block_m
        k0_wo = rank * (cfg.wo.k // C)

        smem = cutlass.memory.SmemAllocator()
        ob = self.out.allocate(smem)
        wb = self.wo.allocate(smem)
        self.out.red.init(ob.red)
        self.wo.red.init(wb.red)
        cute.arch.cluster_arrive_relaxed()
        if const_expr(cfg.out.pdl):              # weights do not depend on earlier launches: ask L2 for them
            self.out.prefetch(mWuv, g, k0_out)
            self.wo.prefetch(mWo, m_base, k0_wo)
            pdl_handoff()
        cute.arch.cluster_wait()

        self.out.head(ob, mPartO, mPartML, mWuv, mO, g, k0_out, Int32(0), wait_cluster=False)

        def all_heads_written():
            self.barrier.sync(mState)

        self.wo.block(wb, mO, mWo, mR, mY, m_base, k0_wo, Int32(0), wait_cluster=False, front=all_heads_written,
                      early_loads=cfg.early_loads)
        self.wo.red.teardown()
