"""Split-K GEMV finished by a cluster reduce-scatter: ``y = x @ W.T (+ r)``.

The smallest useful fused kernel built only from the public primitives, and
the README's example of writing your own.

Work split (cluster of C CTAs per block of BM output rows)::

        K  ->   | CTA 0 | CTA 1 | ... | CTA C-1 |     each CTA: BM rows x K/C columns
    W [M, K]    |  BM rows of this cluster         |
                                                         partials: fp32 [B, BM] per CTA
    ClusterReduce.reduce_scatter over DSMEM  ->  CTA r owns rows r*BM/C .. (r+1)*BM/C - 1
                                                 and writes them to y (no atomics)

Inside a CTA, warp w takes rows w, w + W_, ...; each lane streams 16-byte
vectors of the row (8 bf16/fp16), multiplies by x in fp32, and the warp sums
with shuffles. Lane 0 puts the row partial in ``sPart[b, row]``; after a
CTA barrier the threads pick up the reduce-scatter fragment from there.

Shapes are static per compiled kernel: ``K`` must be a multiple of
``C * 256`` (one 16-byte vector per lane per step), ``M`` of ``BM``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import ClusterReduce, cluster_sync
from cf_cute.primitives.plan import check_cluster_size

__all__ = ["SplitKGemvConfig", "SplitKGemv"]

_VEC = 8          # 16 bytes of bf16/fp16
_WARP = 32


@dataclass(frozen=True)
class SplitKGemvConfig:
    m: int
    k: int
    batch: int = 1
    cluster_size: int = 4
    block_m: int = 64
    num_threads: int = 128
    dtype: str = "bfloat16"
    residual: bool = False        # y = x @ W.T + r (the residual stream), added in fp32

    def validate(self) -> None:
        check_cluster_size(self.cluster_size)
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype!r}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be in 1..16, got {self.batch}")
        step = self.cluster_size * _WARP * _VEC
        if self.k % step:
            raise ValueError(f"K = {self.k} must be a multiple of cluster_size * 256 = {step}")
        if self.m % self.block_m:
            raise ValueError(f"M = {self.m} must be a multiple of block_m = {self.block_m}")
        if self.block_m % (self.num_threads // _WARP):
            raise ValueError("block_m must be a multiple of the warp count")

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

    @cute.jit
    def __call__(self, mX: cute.Tensor, mW: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor, stream):
        self.kernel(mX, mW, mR, mY).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mR: cute.Tensor, mY: cute.Tensor):
        cfg = self.cfg
        B, BM, C = cfg.batch, cfg.block_m, cfg.cluster_size
        n_warps = cfg.num_threads // _WARP
        k_chunk = cfg.k // C
        k_steps = k_chunk // (_WARP * _VEC)
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        m_base = (bidx // C) * BM

        smem = cutlass.memory.SmemAllocator()
        bufs = self.red.allocate(smem)
        sPart = smem.allocate_tensor(Float32, cute.make_layout((B, BM)), byte_alignment=16)
        self.red.init(bufs)
        cute.arch.cluster_arrive_relaxed()

        for i in cutlass.range_constexpr(BM // n_warps):
            row = m_base + warp + i * n_warps
            acc = cute.make_rmem_tensor(B, Float32)
            acc.fill(0.0)
            for s in cutlass.range_constexpr(k_steps):
                kv = (rank * k_chunk) // _VEC + s * _WARP + lane
                w = cute.local_tile(mW, (1, _VEC), (row, kv)).load().to(Float32)
                for b in cutlass.range_constexpr(B):
                    xv = cute.local_tile(mX, (1, _VEC), (b, kv)).load().to(Float32)
                    for j in cutlass.range_constexpr(_VEC):
                        acc[b] = acc[b] + w[j] * xv[j]
            for b in cutlass.range_constexpr(B):
                tot = cute.arch.warp_reduction_sum(acc[b])
                if lane == 0:
                    sPart[b, warp + i * n_warps] = tot
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
