"""Grid-wide (residual add) + RMSNorm + QKV projection + RoPE + KV append.

The large-batch front of the attention block. :mod:`fused.qkv_rope` gives each KV
head one cluster, so Llama-2-7B runs 32 clusters and Llama-3-8B 8, however many SMs
the GPU has; this kernel deals the rows of every head out to all the clusters of
the grid, as the MLP block's phase A does with the gate/up rows, and measured
2.3x faster at batch 16 (benchmarks/RESULTS.md, session 5).

Rows: the packed ``w_qkv [kv_heads, (G+2)*hd, H]`` (``cf_cute.qkv_rope.pack_qkv``)
seen as ``[S*hd, H]``, S = kv_heads*(G+2) segments of hd rows (segment s: query
head ``hs = s % (G+2) < G`` of KV head ``g = s // (G+2)``, then its k, then its v).
They come in *units* of two 16-row tiles whose rows are RoPE partners::

    unit u:  segment s = u // (hd/32), block i = u % (hd/32), tile t in {0, 1}, row r in 0..15
      neox   rows s*hd + 16i + t*hd/2 + r     -> dims (16i + r, 16i + r + hd/2)
      gptj   rows s*hd + 32i + 16t + r        -> dims (2p, 2p + 1), p = 16i + 8t + r // 2

Cluster c of the NC clusters owns units c, c + NC, c + 2 NC, ... (J slots); CTA
rank r owns the hidden slice ``[r*H/C, (r+1)*H/C)``; warp w = (tile slot, K part
kp) multiplies its 16 rows over a K part of the slice::

    NormSlice                   x slice = rmsnorm(h) -> sX    (cluster 0 writes h_out)
    passes                      sAcc[kp, j, b, e]: unit slot j, request b, e in 0..31 where
                                e = 2r + t (neox) or 16t + r (gptj): the partners of a pair are
                                e and e + 1 in both conventions
    sum over kp, reduce-scatter over the cluster (ClusterReduce, rank order), in rounds
    owner of (e, e + 1)         RoPE on q and k rows (frequency 16i + e // 2, cos/sin row
                                positions[b]); q -> q_out, k and v -> cache slot positions[b]

Shared memory: NormSlice, ``sAcc`` (``4 * KP * J * B * 32`` bytes), the reduce
buffers. Barrier contract: the kernel ends with a cluster barrier, which retires
both collectives; there is no grid-wide synchronisation, so any number of clusters
may be launched. Deterministic: K parts summed in a fixed order, the cluster
reduction in rank order, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import cluster_sync
from cf_cute.primitives.plan import check_smem

from .paired_splitk import PairedGrid, paired_reduce, reduce_pairs
from .mma_gemv import (check_weight_layout, mma_atom, prefetch_rows_l2, store_acc, warp_gemv_each, warp_gemv_rows,
                       weight_view)
from .qkv_rope import QKVFields, RopeAppend
from .rmsnorm_slice import NormSlice, NormSliceConfig

__all__ = ["QKVProjectConfig", "QKVProject"]

_WARP = 32
_STEP = 32


@dataclass(frozen=True)
class QKVProjectConfig(PairedGrid, QKVFields):
    num_clusters: int = 66
    cluster_size: int = 2
    k_parts: int = 2              # warps sharing one tile's K slice
    pipeline: bool = True         # a warp's tiles as one load pipeline (no cold start per tile)
    early_loads: bool = False     # the first block of W loads issued before the norm front

    @property
    def units(self) -> int:
        return self.num_kv_heads * self.rows // 32

    def validate(self) -> None:
        self.validate_shape()
        if self.rope_style not in ("neox", "gptj"):
            raise ValueError(f"rope_style must be 'neox' or 'gptj', got {self.rope_style!r}")
        if self.head_dim % 32:
            raise ValueError(f"head_dim = {self.head_dim} must be a multiple of 32 (units of two 16-row tiles)")
        if self.k_parts < 1 or self.num_warps % (2 * self.k_parts):
            raise ValueError(f"k_parts = {self.k_parts}: the {self.num_warps} warps must split into tile "
                             f"pairs of k_parts warps each")
        step = self.cluster_size * self.k_parts * _STEP
        if self.hidden % step:
            raise ValueError(f"hidden = {self.hidden} must be a multiple of cluster_size * k_parts * {_STEP} = "
                             f"{step}: use a smaller cluster or fewer k_parts")
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be positive, got {self.num_clusters}")
        check_weight_layout(self.w_layout)


class QKVProject(RopeAppend):
    def __init__(self, cfg: QKVProjectConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        B, C, T = cfg.batch, cfg.cluster_size, cfg.num_threads
        self.norm = NormSlice(NormSliceConfig(batch=B, hidden=cfg.hidden, cluster_size=C, num_threads=T,
                                              eps=cfg.eps, has_residual=cfg.has_residual, dtype=cfg.dtype))
        self.per_unit = B * 32
        fixed = self.norm.smem_bytes + 4 * cfg.k_parts * cfg.units_per_cluster * self.per_unit + 3 * 16
        plan = paired_reduce(cfg.units_per_cluster, self.per_unit, C, T, fixed)
        if plan is None:
            raise ValueError(f"QKVProject(batch {B}, {cfg.num_clusters} clusters of {C}) does not fit in shared "
                             f"memory: use more clusters or fewer k_parts")
        self.red, self.rounds, self.units_per_round = plan
        self.smem_bytes = fixed + self.red.smem_bytes
        check_smem(f"QKVProject(batch {B}, {cfg.num_clusters} clusters of {C})", self.smem_bytes)

    @cute.jit
    def __call__(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mW: cute.Tensor,
                 mCos: cute.Tensor, mSin: cute.Tensor, mPos: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
                 mTable: cute.Tensor, mQ: cute.Tensor, mHOut: cute.Tensor, stream):
        mW = weight_view(mW, self.cfg.w_layout)
        self.kernel(mHidden, mResidual, mNormW, mW, mCos, mSin, mPos, mK, mV, mTable, mQ, mHOut).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream)

    @cute.jit
    def _tile_row(self, c: Int32, j: Int32, t: Int32):
        """First row of tile t of unit slot j of cluster c (units past the end map to
        the last unit: computed, then skipped)."""
        cfg = self.cfg
        hd = cfg.head_dim
        u = cutlass.min(c + j * cfg.num_clusters, Int32(cfg.units - 1))
        s = u // (hd // 32)
        i = u % (hd // 32)
        if const_expr(cfg.rope_style == "neox"):
            return s * hd + 16 * i + t * (hd // 2)
        else:
            return s * hd + 32 * i + 16 * t

    @cute.jit
    def _store_part(self, sAcc: cute.Tensor, acc: cute.Tensor, kp: Int32, j: Int32, t: Int32, lane: Int32):
        """This warp's partial of unit slot j, tile t -> sAcc[kp, j, b, e] (module docstring)."""
        cfg = self.cfg
        base = sAcc.iterator + kp * (cfg.units_per_cluster * self.per_unit) + j * self.per_unit
        if const_expr(cfg.rope_style == "neox"):
            dst = cute.make_tensor(base + t, cute.make_layout((cfg.batch, 16), stride=(32, 2)))
        else:
            dst = cute.make_tensor(base + 16 * t, cute.make_layout((cfg.batch, 16), stride=(32, 1)))
        store_acc(acc, dst, Int32(0), lane, cfg.n_tiles, cfg.batch)

    @cute.jit
    def _finish_pair(self, x1: Float32, x2: Float32, pos: Int32, c: Int32, mCos: cute.Tensor, mSin: cute.Tensor,
                     mPos: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mTable: cute.Tensor, mQ: cute.Tensor):
        """The owner of fragment pair ``pos`` of cluster c (rows e, e + 1 of a unit, one
        request): rotate q and k, store q, append k and v."""
        cfg = self.cfg
        G, hd, PU = cfg.group, cfg.head_dim, self.per_unit
        j = pos // PU
        u = c + j * cfg.num_clusters
        if u < cfg.units and j < cfg.units_per_cluster:
            s = u // (hd // 32)
            f = 16 * (u % (hd // 32)) + (pos % 32) // 2      # RoPE frequency of the pair
            self.store_pair(x1, x2, (pos % PU) // 32, s // (G + 2), s % (G + 2), f, mCos, mSin, mPos, mK, mV,
                            mTable, mQ)

    @cute.kernel
    def kernel(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mW: cute.Tensor,
               mCos: cute.Tensor, mSin: cute.Tensor, mPos: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mTable: cute.Tensor, mQ: cute.Tensor, mHOut: cute.Tensor):
        cfg = self.cfg
        B, C, T, NW, KP = cfg.batch, cfg.cluster_size, cfg.num_threads, cfg.num_warps, cfg.k_parts
        J, UP, Hc, PU = cfg.units_per_cluster, cfg.units_per_pass, cfg.slice, self.per_unit
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        c = bidx // C

        smem = cutlass.memory.SmemAllocator()
        nb = self.norm.allocate(smem)
        rb = self.red.allocate(smem)
        sAcc = smem.allocate_tensor(Float32, cute.make_layout((KP, J * PU), stride=(J * PU, 1)), byte_alignment=16)
        self.norm.init(nb)
        self.red.init(rb)
        cute.arch.cluster_arrive_relaxed()

        kp = warp % KP
        t = warp // KP                       # tile slot in a pass: unit t // 2, tile t % 2
        kw = Hc // KP
        k0 = rank * Hc + kp * kw
        if const_expr(cfg.l2_prefetch):      # the first tile's HBM reads start under the norm
            prefetch_rows_l2(mW, self._tile_row(c, t // 2, t % 2), 16, k0, kw, lane)

        def front():
            self.norm(nb, mHidden, mResidual, mNormW, mHOut, c == 0)

        # early_loads: the first block of W loads is issued before the norm and lands under it
        early = front if const_expr(cfg.early_loads) else None
        if const_expr(not cfg.early_loads):
            front()
        sXk = cute.make_tensor(nb.sX.iterator + kp * kw, nb.sX.layout)     # column 0 = this warp's k0
        atom = mma_atom(mW.element_type)
        if const_expr(cfg.pipeline):
            rows = [self._tile_row(c, p * UP + t // 2, t % 2) for p in range(J // UP)]
            accs = warp_gemv_rows(atom, mW, rows, k0, sXk, lane, kw // _STEP, cfg.n_tiles, cfg.unroll, front=early)
            for p in cutlass.range_constexpr(J // UP):
                self._store_part(sAcc, accs[p], kp, p * UP + t // 2, t % 2, lane)
        else:
            warp_gemv_each(atom, mW, J // UP, lambda p: self._tile_row(c, p * UP + t // 2, t % 2),
                           lambda acc, p: self._store_part(sAcc, acc, kp, p * UP + t // 2, t % 2, lane),
                           k0, sXk, lane, kw // _STEP, cfg.n_tiles, cfg.unroll, front=early)
        cute.arch.barrier()

        # ---- sum the K parts, reduce-scatter over the cluster, RoPE + stores by the pair owners
        reduce_pairs(self.red, rb, sAcc, self.rounds, KP, J * PU, tidx,
                     lambda pos, x1, x2: self._finish_pair(x1, x2, pos, c, mCos, mSin, mPos, mK, mV, mTable, mQ))
        cluster_sync()                       # retires both collectives
