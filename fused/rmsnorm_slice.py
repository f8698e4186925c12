"""(Residual add) + RMSNorm of one CTA's hidden slice, written as the x operand
of the tensor-core GEMV core (``mma_gemv``): the front of every split-K block.

A cluster of C CTAs splits the hidden size H; CTA r owns the slice
``k0 = r * H/C .. k0 + H/C``::

    pass 1   h = hidden (+ residual)    fp32, read from global (L2), never stored
             ss[w, b] = sum over warp w's part of the slice of h_b^2   -> sSS[w, b]
             (cluster 0 also writes h to h_out when a residual is added)
    reduce   per-request total over the warps, then over the cluster
             (ClusterReduce.all_reduce of B values, rank order) -> rstd_b in sSS[0, b]
    pass 2   sX[b, j] = round(h_b[k0 + j] * rstd_b * norm_w[k0 + j])
             (``keep_h``: h kept in registers from pass 1 and norm_w loaded before pass 1
             when a thread's share of h is at most 32 values; else both read again, h an
             L2 hit; rows b >= B zero)

Shared memory: the norm collective, ``sSS [warps, B]`` fp32 and ``sX``
(``mma_gemv.x_smem_layout``): ``2 * ceil(B/8)*8 * (H/C + 32)`` bytes. Keeping h
in shared memory instead of re-reading it would cost ``4 * B * H/C`` more
(64 KB at batch 16, slice 1024) for no measurable gain: the second read hits L2.

Barrier contract: the caller runs ``init`` (thread 0 initialises the collective's
mbarriers), then ``cute.arch.cluster_arrive_relaxed()`` before ``__call__``, which
waits on that cluster barrier before the first DSMEM transfer. On return ``sX`` is
complete and visible to the whole CTA (a CTA barrier was passed).

Programmatic dependent launch: ``__call__`` starts with ``griddepcontrol.wait``
(a no-op unless the kernel was launched with ``use_pdl``), because h is the first
thing a block reads that the previous kernel may have written. Whatever the
caller does before it (shared-memory and mbarrier set-up, L2 prefetches of
weights) overlaps the previous kernel's tail; nothing before it may read
activations or write global memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import ClusterReduce

from .mma_gemv import x_smem_layout

__all__ = ["NormSliceConfig", "NormSlice", "NormSliceBuffers"]

_VEC = 8
_WARP = 32
_KEEP_REGS = 32         # h is kept in registers from pass 1 to pass 2 when a thread's share fits in this many


@dataclass(frozen=True)
class NormSliceConfig:
    batch: int
    hidden: int
    cluster_size: int
    num_threads: int
    eps: float
    has_residual: bool
    dtype: str
    barrier_id: int = 1          # named barrier of the norm collective
    keep_h: bool = False         # small batches: h kept in registers from pass 1 to pass 2 and norm_w loaded
                                 # before pass 1 (H200, batch 1: the attention blocks 0.2-0.6 µs faster; the
                                 # MLP at Llama-3-8B's shape spilled 40 more bytes and lost 2.4 µs: off there)

    @property
    def slice(self) -> int:
        return self.hidden // self.cluster_size

    @property
    def n_tiles(self) -> int:
        return (self.batch + 7) // 8


class NormSliceBuffers:
    def __init__(self, red, sSS, sX):
        self.red, self.sSS, self.sX = red, sSS, sX


class NormSlice:
    def __init__(self, cfg: NormSliceConfig):
        if cfg.hidden % (cfg.cluster_size * _VEC):
            raise ValueError(f"hidden = {cfg.hidden} must be a multiple of cluster_size * {_VEC}")
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        self.red = ClusterReduce(cfg.batch, cfg.cluster_size, cfg.num_threads, op="sum", stages=1,
                                 barrier_id=cfg.barrier_id)
        self.smem_bytes = (self.red.smem_bytes + 4 * (cfg.num_threads // _WARP) * cfg.batch
                           + 2 * cfg.n_tiles * 8 * (cfg.slice + 32) + 2 * 16)

    @cute.jit
    def allocate(self, smem) -> NormSliceBuffers:
        cfg = self.cfg
        return NormSliceBuffers(
            red=self.red.allocate(smem),
            sSS=smem.allocate_tensor(Float32, cute.make_layout((cfg.num_threads // _WARP, cfg.batch),
                                                               stride=(cfg.batch, 1)), byte_alignment=16),
            sX=smem.allocate_tensor(self.dtype, x_smem_layout(cfg.n_tiles, cfg.slice), byte_alignment=16))

    @cute.jit
    def init(self, bufs: NormSliceBuffers):
        self.red.init(bufs.red)

    @cute.jit
    def _h(self, mHidden: cute.Tensor, mResidual: cute.Tensor, b: Int32, col8: Int32) -> cute.Tensor:
        """fp32 h[b, 8*col8 : 8*col8 + 8] (hidden + residual)."""
        hr = cute.make_rmem_tensor(_VEC, Float32)
        hr.store(cute.local_tile(mHidden, (1, _VEC), (b, col8)).load().to(Float32))
        if const_expr(self.cfg.has_residual):
            rv = cute.local_tile(mResidual, (1, _VEC), (b, col8)).load().to(Float32)
            for e in cutlass.range_constexpr(_VEC):
                hr[e] = hr[e] + rv[e]
        return hr

    @cute.jit
    def _w(self, mNormW: cute.Tensor, col8: Int32):
        """fp32 norm_w[8*col8 : 8*col8 + 8]."""
        return cute.local_tile(mNormW, (_VEC,), (col8,)).load().to(Float32)

    @cute.jit
    def __call__(self, bufs: NormSliceBuffers, mHidden: cute.Tensor, mResidual: cute.Tensor,
                 mNormW: cute.Tensor, mHOut: cute.Tensor, write_h):
        """Fill ``bufs.sX`` with this CTA's slice of x = rmsnorm(h) (module docstring);
        ``write_h`` (a runtime predicate) also stores h to ``mHOut`` when a residual is added."""
        cfg = self.cfg
        B, T, Hc = cfg.batch, cfg.num_threads, cfg.slice
        NW = T // _WARP
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        k0 = Int32(cute.arch.block_idx_in_cluster()) * Hc
        sSS, sX = bufs.sSS, bufs.sX
        cute.arch.griddepcontrol_wait()      # the previous kernel's writes (h, residual) are visible

        # pass 1, straight-line: every load of h is issued before the first one is used
        # (a dynamic loop per request made batch 16 wait for 16 load round trips in a row)
        NJ = (Hc // _VEC + T - 1) // T
        keep = cfg.keep_h and B * NJ * _VEC <= _KEEP_REGS     # h stays in registers for pass 2, and
        hs = None                                               # norm_w is loaded now: pass 2 waits for no load
        ws = None
        if const_expr(keep):
            hs = cute.make_rmem_tensor(cute.make_layout((_VEC, NJ, B)), Float32)
            ws = cute.make_rmem_tensor(cute.make_layout((_VEC, NJ)), Float32)
            for i in cutlass.range_constexpr(NJ):
                j = tidx + i * T
                if j < Hc // _VEC:
                    ws[None, i].store(self._w(mNormW, k0 // _VEC + j))
        for b in cutlass.range_constexpr(B):
            ss = Float32(0.0)
            for i in cutlass.range_constexpr(NJ):
                j = tidx + i * T
                if j < Hc // _VEC:
                    hr = self._h(mHidden, mResidual, b, k0 // _VEC + j)
                    if const_expr(keep):
                        hs[None, i, b].store(hr.load())
                    if const_expr(cfg.has_residual):
                        if write_h:
                            for e in cutlass.range_constexpr(_VEC):
                                mHOut[b, k0 + j * _VEC + e] = self.dtype(hr[e])
                    for e in cutlass.range_constexpr(_VEC):
                        ss = ss + hr[e] * hr[e]
            ss = cute.arch.warp_reduction_sum(ss)
            if lane == 0:
                sSS[warp, b] = ss
        cute.arch.barrier()
        fn = self.red.make_fragment()
        pn = self.red.thread_offset(tidx)
        for v in cutlass.range_constexpr(self.red.per_thread):
            tot = Float32(0.0)
            for w in cutlass.range_constexpr(NW):
                tot = tot + sSS[w, pn + v]
            fn[v] = tot
        cute.arch.cluster_wait()
        total = self.red.all_reduce(bufs.red, fn, Int32(0))
        # every thread needs rstd of every request: row 0 of sSS
        cute.arch.barrier()
        if tidx < self.red.active:
            for v in cutlass.range_constexpr(self.red.per_thread):
                sSS[0, pn + v] = cute.math.rsqrt(total[v] / Float32(cfg.hidden) + Float32(cfg.eps))
        cute.arch.barrier()

        # pass 2, straight-line as well: h (kept, or an L2 hit now) and norm_w for every (request, column)
        for b in cutlass.range_constexpr(cfg.n_tiles * 8):
            for i in cutlass.range_constexpr(NJ):
                j = tidx + i * T
                if j < Hc // _VEC:
                    if const_expr(b < B):
                        if const_expr(keep):
                            hr = hs[None, i, b]
                            wv = ws[None, i]
                        else:
                            hr = self._h(mHidden, mResidual, b, k0 // _VEC + j)
                            wv = self._w(mNormW, k0 // _VEC + j)
                        xr = cute.make_rmem_tensor(_VEC, Float32)
                        for e in cutlass.range_constexpr(_VEC):
                            xr[e] = hr[e] * sSS[0, b] * wv[e]
                        cute.local_tile(sX, (1, _VEC), (b, j)).store(xr.load().to(self.dtype).reshape((1, _VEC)))
                    else:
                        cute.local_tile(sX, (1, _VEC), (b, j)).fill(0.0)
        cute.arch.barrier()
