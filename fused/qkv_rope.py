"""Fused (residual add) + RMSNorm + QKV projection + RoPE + KV-cache append.

STATUS: GPU-tested on an H100 (tests/test_qkv_rope.py; ``project`` is also the
front of the fused attention block).
The first half of the attention block (issue 3), built from ClusterReduce.

One cluster of C CTAs per KV head g (its G = heads / kv_heads query heads with
it); CTA r owns the hidden slice ``[r*H/C, (r+1)*H/C)`` (split-K)::

    x    = rmsnorm(hidden (+ residual)), this CTA's slice -> sX   (rmsnorm_slice.NormSlice:
           sums of squares all-reduced over the cluster, x rounded to the dtype)
    part[b, row] = x_b . W_g[row, slice]      rows = [q heads of g | k_g | v_g] ((G+2)*hd),
                                              16-row tiles over the warps, tensor cores
    qkv  = ClusterReduce.all_reduce(part)     every CTA holds q, k, v of its group (B*(G+2)*hd)
    RoPE (neox halves or gptj pairs, cos/sin tables [positions, hd/2]) on q and k;
    q -> q_out[b, heads of g], k (roped) and v -> cache slot positions[b]
    (contiguous [B, max_len, kv_heads, hd] or paged via page_table); the
    (b, head, pair) items are shared round-robin by the C CTAs of the cluster.
    cluster 0 also writes h_out (the residual stream) when a residual is added.

The packed weight ``w_qkv [kv_heads, (G+2)*hd, H]`` is ``pack_qkv(wq, wk, wv)``
(cf_cute.qkv_rope): a one-time re-ordering of the nn.Linear weights so that a
cluster's rows are contiguous. Positions and page indices are clamped to the
cache for memory safety (the host wrapper range-checks CPU inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import ClusterReduce, cluster_sync
from cf_cute.primitives.plan import SMEM_LIMIT_BYTES, check_smem

from ._attn_shape import AttnShape
from .mma_gemv import (check_weight_layout, mma_atom, new_acc, prefetch_rows_l2, store_acc, warp_gemv_tile,
                       warp_gemv_tiles, weight_view)
from .rmsnorm_slice import NormSlice, NormSliceConfig

__all__ = ["QKVFields", "QKVRopeConfig", "QKVRope", "QKVBuffers", "RopeAppend"]

_WARP = 32
_STEP = 32


@dataclass(frozen=True)
class QKVFields(AttnShape):
    """The static fields of the QKV + RoPE stage, shared by every kernel built on it
    (:class:`QKVRopeConfig`, ``attention_block.AttentionBlockConfig``)."""
    batch: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_len: int                  # contiguous: cache length; paged: max_pages * page_size
    max_positions: int            # rows of the cos/sin tables
    cluster_size: int = 4
    paged: bool = False
    page_size: int = 16
    num_pages: int = 0
    rope_style: str = "neox"
    eps: float = 1e-5
    has_residual: bool = False
    dtype: str = "bfloat16"
    num_threads: int = 256
    unroll: int = 8               # MMA steps of weight loads in flight per warp
    l2_prefetch: bool = False     # each warp's first weight tile is requested before the norm (slower on the
                                  # H200: the fused attention block 2-7% at batch 1, qkv_project at batch 16
                                  # 36.1 -> 34.1 µs without, Llama-2-7B shape; 23.6 -> 22.7 Llama-3-8B)
    pipeline_tiles: bool = False  # one load pipeline across a warp's row tiles (MHA at 256 threads: 40% slower
                                  # under the 128-register cap; AttentionBlockConfig turns it on at GQA batch 1)
    early_loads: bool = False     # each warp's first block of W loads issued before the norm, landing under it
                                  # (with pipeline_tiles the norm is the pipeline's front; without, each warp's
                                  # first tile is peeled, so every warp needs a row tile, else the norm goes first)
    w_layout: str = "linear"      # memory order of the weights (mma_gemv.WEIGHT_LAYOUTS)

    @property
    def n_tiles(self) -> int:
        return (self.batch + 7) // 8

    @property
    def rows(self) -> int:
        return (self.group + 2) * self.head_dim

    @property
    def slice(self) -> int:
        return self.hidden // self.cluster_size

    @property
    def grid(self) -> int:
        return self.num_kv_heads * self.cluster_size


@dataclass(frozen=True)
class QKVRopeConfig(QKVFields):
    smem_budget: int = SMEM_LIMIT_BYTES   # bytes this stage may use (less when fused into a larger kernel)

    def validate(self) -> None:
        self.validate_shape()
        if self.rope_style not in ("neox", "gptj"):
            raise ValueError(f"rope_style must be 'neox' or 'gptj', got {self.rope_style!r}")
        step = self.cluster_size * _STEP
        if self.hidden % step:
            raise ValueError(f"hidden = {self.hidden} must be a multiple of cluster_size * {_STEP} = {step}: "
                             f"use a smaller cluster")
        if self.head_dim % 16:
            raise ValueError(f"head_dim = {self.head_dim} must be a multiple of 16")
        check_weight_layout(self.w_layout)


class QKVBuffers:
    """Shared-memory buffers of :class:`QKVRope` (see ``allocate``)."""

    def __init__(self, norm, red_qkv, sPart):
        self.norm, self.red_qkv, self.sPart = norm, red_qkv, sPart


class RopeAppend:
    """The RoPE and cache-append steps every QKV stage shares (``self.cfg`` holds
    :class:`QKVFields`, ``self.dtype`` the activation type)."""

    @cute.jit
    def _cache_store(self, mX: cute.Tensor, mTable: cute.Tensor, b: Int32, pos: Int32, g: Int32, d: Int32,
                     val: Float32):
        if const_expr(self.cfg.paged):
            P = self.cfg.page_size
            page = cutlass.min(cutlass.max(mTable[b, pos // P], Int32(0)), Int32(self.cfg.num_pages - 1))
            mX[page, pos % P, g, d] = self.dtype(val)
        else:
            mX[b, pos, g, d] = self.dtype(val)

    @cute.jit
    def rope_dims(self, i: Int32):
        """The two dims rotated by frequency i: halves (neox) or neighbours (gptj)."""
        if const_expr(self.cfg.rope_style == "neox"):
            return i, i + self.cfg.head_dim // 2
        else:
            return 2 * i, 2 * i + 1

    @cute.jit
    def rope_rotate(self, x1: Float32, x2: Float32, mCos: cute.Tensor, mSin: cute.Tensor, prow: Int32, i: Int32):
        """(x1, x2) rotated by the angle of frequency i at table row prow."""
        c = mCos[prow, i]
        s = mSin[prow, i]
        return x1 * c - x2 * s, x2 * c + x1 * s

    @cute.jit
    def store_pair(self, x1: Float32, x2: Float32, b: Int32, g: Int32, hs: Int32, f: Int32, mCos: cute.Tensor,
                   mSin: cute.Tensor, mPos: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mTable: cute.Tensor,
                   mQ: cute.Tensor):
        """Dims ``rope_dims(f)`` (values x1, x2, fp32) of head slot hs of KV head g for
        request b (hs < G: query head g*G + hs; G: k; G + 1: v): q and k rotated by
        frequency f at row positions[b], q stored, k and v appended to the cache there
        (positions clamped to the cache and the table for memory safety)."""
        cfg = self.cfg
        G = cfg.group
        pos = cutlass.min(cutlass.max(mPos[b], Int32(0)), Int32(cfg.max_len - 1))
        d1, d2 = self.rope_dims(f)
        if hs <= G:
            prow = cutlass.min(pos, Int32(cfg.max_positions - 1))
            r1, r2 = self.rope_rotate(x1, x2, mCos, mSin, prow, f)
            if hs < G:
                mQ[b, g * G + hs, d1] = self.dtype(r1)
                mQ[b, g * G + hs, d2] = self.dtype(r2)
            else:
                self._cache_store(mK, mTable, b, pos, g, d1, r1)
                self._cache_store(mK, mTable, b, pos, g, d2, r2)
        else:
            self._cache_store(mV, mTable, b, pos, g, d1, x1)
            self._cache_store(mV, mTable, b, pos, g, d2, x2)


class QKVRope(RopeAppend):
    def __init__(self, cfg: QKVRopeConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        T, C = cfg.num_threads, cfg.cluster_size
        self.norm = NormSlice(NormSliceConfig(batch=cfg.batch, hidden=cfg.hidden, cluster_size=C, num_threads=T,
                                              eps=cfg.eps, has_residual=cfg.has_residual, dtype=cfg.dtype,
                                              keep_h=True))
        # the B*(G+2)*hd partial sums go through the cluster in `qkv_rounds` rounds of
        # at most 32 values per thread (register budget): the fewest rounds that fit
        total = cfg.batch * cfg.rows
        fixed = self.norm.smem_bytes + 4 * total + 4 * 16
        for k in range(1, 65):
            if total % k or total // k > 32 * T or (total // k) % 4:
                continue
            try:
                red = ClusterReduce(total // k, C, T, op="sum", stages=2 if k > 1 else 1, barrier_id=2)
            except ValueError:          # this count cannot be laid over the threads
                continue
            self.qkv_rounds, self.red_qkv = k, red
            self.smem_bytes = fixed + self.red_qkv.smem_bytes
            if self.smem_bytes <= cfg.smem_budget:
                break
        check_smem(f"QKVRope(batch {cfg.batch}, hidden slice {cfg.slice}, cluster {C})", self.smem_bytes)

    @cute.jit
    def __call__(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mW: cute.Tensor,
                 mCos: cute.Tensor, mSin: cute.Tensor, mPos: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
                 mTable: cute.Tensor, mQ: cute.Tensor, mHOut: cute.Tensor, stream):
        mW = weight_view(mW, self.cfg.w_layout)
        self.kernel(mHidden, mResidual, mNormW, mW, mCos, mSin, mPos, mK, mV, mTable, mQ, mHOut).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream)

    @cute.jit
    def allocate(self, smem) -> QKVBuffers:
        """Carve this stage's shared memory out of ``smem`` (a SmemAllocator)."""
        cfg = self.cfg
        return QKVBuffers(norm=self.norm.allocate(smem), red_qkv=self.red_qkv.allocate(smem),
                          sPart=smem.allocate_tensor(Float32, cute.make_layout(cfg.batch * cfg.rows),
                                                     byte_alignment=16))

    @cute.jit
    def init(self, bufs: QKVBuffers):
        """Barrier init (thread 0); the caller then arrives on the cluster barrier
        (``cluster_arrive_relaxed``); :meth:`project` waits on it."""
        self.norm.init(bufs.norm)
        self.red_qkv.init(bufs.red_qkv)

    @cute.jit
    def project(self, bufs: QKVBuffers, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor,
                mW: cute.Tensor, mHOut: cute.Tensor, g: Int32, stamp=None):
        """Residual add, RMSNorm and the QKV projection of KV head ``g``: on
        return ``bufs.sPart[b * rows + i]`` holds row i of [q heads | k | v] of
        request b (fp32, before RoPE) in every CTA of the cluster. ``stamp(k)``, when
        given, is traced after the norm (9) and after the warp's GEMV (10): the
        caller's phase stamps."""
        cfg = self.cfg
        B, C, T = cfg.batch, cfg.cluster_size, cfg.num_threads
        Hc, R = cfg.slice, cfg.rows
        NW = T // _WARP
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        rank = Int32(cute.arch.block_idx_in_cluster())
        k0 = rank * Hc
        bufs_q, sPart, sX = bufs.red_qkv, bufs.sPart, bufs.norm.sX
        if const_expr(cfg.l2_prefetch):
            if warp < R // 16:
                prefetch_rows_l2(mW[g, None, None], warp * 16, 16, k0, Hc, lane)

        def norm():
            self.norm(bufs.norm, mHidden, mResidual, mNormW, mHOut, g == 0)
            if const_expr(stamp is not None):
                stamp(9)

        # early_loads: the norm runs as the front of the GEMV, after each warp's first block of W
        # loads (the per-tile path peels each warp's first tile, so it needs a tile for every warp;
        # the pipelined path clamps the tile index, so every warp has one)
        early = cfg.early_loads and (cfg.pipeline_tiles or R // 16 >= NW)
        peel = early and not cfg.pipeline_tiles
        if const_expr(not early):
            norm()

        # ---- split-K GEMV over this CTA's slice on tensor cores: part[b, row]
        atom = mma_atom(mW.element_type)
        mWg = mW[g, None, None]
        sPartBR = cute.make_tensor(sPart.iterator, cute.make_layout((B, R), stride=(R, 1)))   # [b, row] view
        if const_expr(peel):
            # each warp's first tile peeled: its first block of W loads is in flight under the norm
            acc0 = new_acc(cfg.n_tiles)
            warp_gemv_tile(atom, mWg, warp * 16, k0, sX, acc0, lane, Hc // _STEP, cfg.n_tiles, cfg.unroll, front=norm)
            store_acc(acc0, sPartBR, warp * 16, lane, cfg.n_tiles, B)
        if const_expr(cfg.pipeline_tiles):
            count = (R // 16 + NW - 1) // NW
            accs = warp_gemv_tiles(atom, mWg, warp, NW, R // 16, count, k0, sX, lane, Hc // _STEP, cfg.n_tiles,
                                   cfg.unroll, front=norm if early else None)
            for j in cutlass.range_constexpr(count):
                mt = warp + j * NW
                if mt < R // 16:
                    store_acc(accs[None, None, j], sPartBR, mt * 16, lane, cfg.n_tiles, B)
        else:
            for mt in cutlass.range(warp + NW if peel else warp, R // 16, NW, unroll=1):   # (the rest)
                acc = new_acc(cfg.n_tiles)
                warp_gemv_tile(atom, mWg, mt * 16, k0, sX, acc, lane, Hc // _STEP, cfg.n_tiles, cfg.unroll)
                store_acc(acc, sPartBR, mt * 16, lane, cfg.n_tiles, B)
        if const_expr(stamp is not None):
            stamp(10)
        cute.arch.barrier()
        fq = self.red_qkv.make_fragment()
        pq = self.red_qkv.thread_offset(tidx)
        for k in cutlass.range_constexpr(self.qkv_rounds):
            base = k * self.red_qkv.num_elems
            for v in cutlass.range_constexpr(self.red_qkv.per_thread):
                fq[v] = sPart[base + pq + v]
            qkv = self.red_qkv.all_reduce(bufs_q, fq, Int32(k))
            if tidx < self.red_qkv.active:
                for v in cutlass.range_constexpr(self.red_qkv.per_thread):
                    sPart[base + pq + v] = qkv[v]
        cute.arch.barrier()


    @cute.kernel
    def kernel(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mW: cute.Tensor,
               mCos: cute.Tensor, mSin: cute.Tensor, mPos: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mTable: cute.Tensor, mQ: cute.Tensor, mHOut: cute.Tensor):
        cfg = self.cfg
        B, C, T, G, hd = cfg.batch, cfg.cluster_size, cfg.num_threads, cfg.group, cfg.head_dim
        R = cfg.rows
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        g = bidx // C

        smem = cutlass.memory.SmemAllocator()
        bufs = self.allocate(smem)
        self.init(bufs)
        cute.arch.cluster_arrive_relaxed()
        self.project(bufs, mHidden, mResidual, mNormW, mW, mHOut, g)
        sPart = bufs.sPart

        # ---- RoPE, q out, k/v append: items (b, head slot, pair) round-robin over the cluster
        half = hd // 2
        n_items = B * (G + 2) * half
        for it in cutlass.range(rank * T + tidx, n_items, C * T, unroll=1):
            b = it // ((G + 2) * half)
            hs = (it // half) % (G + 2)
            i = it % half
            d1, d2 = self.rope_dims(i)
            x1 = sPart[b * R + hs * hd + d1]
            x2 = sPart[b * R + hs * hd + d2]
            self.store_pair(x1, x2, b, g, hs, i, mCos, mSin, mPos, mK, mV, mTable, mQ)
        # one cluster barrier retires both collectives' buffers
        cluster_sync()
