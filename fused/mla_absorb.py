"""MLA absorb (issue 6, launch 2 of 5): ``q_lat = W_UK q_nope`` per head, the
latent RMSNorm, RoPE of q_pe and k_pe, and the latent-cache append.

STATUS: compiles for sm_90a; GPU-tested on an H200 (tests/test_mla.py, session 6).

Inputs: ``y [B, heads * (nope + rope) + rank + rope]`` from ``MLAFront`` (activation
dtype). Output: the attention query ``qf [B, heads, rank + rope] = [q_lat | rope(q_pe)]``
(activation dtype, rounded like the torch step) and the cache row of every request.
Work split (grid = heads * rank / (16 * warps) GEMV CTAs, then B latent CTAs)::

    GEMV CTA i:  rows [i*RB, (i+1)*RB) of w_uk viewed [heads * rank, nope] (RB = 16 * warps,
                 one head h per CTA since rank % RB == 0); sX = q_nope[:, h] (B x nope,
                 staged from y); warp w: one 16-row tile over K = nope on tensor cores
                 (requests on N) -> qf[b, h, row]
    latent CTA b: c = rmsnorm(ckv[:rank]) * kv_norm (fp32, block reduce in warp order),
                 k_pe and every head's q_pe rotated (interleaved pairs, table row
                 positions[b]) -> cache[b, positions[b]] = [c, k_pe],  qf[b, :, rank:] = q_pe

The cache is written here, one launch before the attention reads it: no CTA of this
launch reads the cache, so the append does not race. Positions and page indices are
clamped to the cache and the RoPE table for memory safety (the host checks CPU
inputs). No cluster, no DSMEM; CTA barriers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import pdl_handoff
from cf_cute.primitives.plan import check_smem

from .mma_gemv import (X_PAD, acc_coords, check_weight_layout, mma_atom, new_acc, warp_gemv_tile, weight_view,
                       x_smem_layout)

__all__ = ["MLAAbsorbConfig", "MLAAbsorb"]

_WARP = 32
_STEP = 32
_VEC = 8


@dataclass(frozen=True)
class MLAAbsorbConfig:
    batch: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    max_len: int                  # contiguous: cache length; paged: max_pages * page_size
    max_positions: int            # rows of the cos/sin tables
    eps: float
    paged: bool = False
    page_size: int = 16
    num_pages: int = 0
    dtype: str = "bfloat16"
    num_threads: int = 256
    unroll: int = 4
    w_layout: str = "linear"      # memory order of w_uk viewed as [heads * rank, nope] (mma_gemv.WEIGHT_LAYOUTS)
    pdl: bool = False             # launch as a programmatic dependent of the previous kernel

    @property
    def n_tiles(self) -> int:
        return (self.batch + 7) // 8

    @property
    def head_stride(self) -> int:        # columns of one head in y
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def rows_per_cta(self) -> int:
        return 16 * (self.num_threads // _WARP)

    @property
    def gemv_ctas(self) -> int:
        return self.num_heads * self.kv_lora_rank // self.rows_per_cta

    @property
    def grid(self) -> int:
        return self.gemv_ctas + self.batch

    def validate(self) -> None:
        check_weight_layout(self.w_layout)
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype!r}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be in 1..16, got {self.batch}")
        if self.kv_lora_rank % self.rows_per_cta:
            raise ValueError(f"kv_lora_rank = {self.kv_lora_rank} must be a multiple of {self.rows_per_cta}")
        if self.qk_nope_head_dim % _STEP:
            raise ValueError(f"qk_nope_head_dim = {self.qk_nope_head_dim} must be a multiple of {_STEP}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim = {self.qk_rope_head_dim} must be even")
        if self.paged and self.num_pages < 1:
            raise ValueError("a paged cache needs num_pages >= 1")


class MLAAbsorb:
    def __init__(self, cfg: MLAAbsorbConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        self.smem_bytes = 2 * cfg.n_tiles * 8 * (cfg.qk_nope_head_dim + X_PAD) + 4 * 32 + 64
        check_smem("MLAAbsorb", self.smem_bytes)

    @cute.jit
    def __call__(self, mY: cute.Tensor, mWuk: cute.Tensor, mKvNorm: cute.Tensor, mCos: cute.Tensor,
                 mSin: cute.Tensor, mPos: cute.Tensor, mTable: cute.Tensor, mCache: cute.Tensor,
                 mQf: cute.Tensor, stream):
        mWuk = weight_view(mWuk, self.cfg.w_layout)
        self.kernel(mY, mWuk, mKvNorm, mCos, mSin, mPos, mTable, mCache, mQf).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1], stream=stream, use_pdl=self.cfg.pdl)

    # ------------------------------------------------------------------ q_lat
    @cute.jit
    def absorb_tiles(self, mY: cute.Tensor, mWuk: cute.Tensor, mQf: cute.Tensor, sX: cute.Tensor, cta: Int32):
        """GEMV CTA ``cta``: its 16 * warps rows of one head's W_UK against q_nope."""
        cfg = self.cfg
        B, NT, nope = cfg.batch, cfg.n_tiles, cfg.qk_nope_head_dim
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        row_base = cta * cfg.rows_per_cta
        h = row_base // cfg.kv_lora_rank
        # q_nope[:, h] -> sX (16-byte vectors; rows past the batch zero)
        nv = nope // _VEC
        for i in cutlass.range(tidx, NT * 8 * nv, cfg.num_threads, unroll=1):
            b = i // nv
            j = i % nv
            dst = cute.local_tile(sX, (1, _VEC), (b, j))
            if b < B:
                dst.store(cute.local_tile(mY, (1, _VEC), (b, h * (cfg.head_stride // _VEC) + j)).load())
            else:
                dst.fill(0.0)
        cute.arch.barrier()
        row0 = row_base + warp * 16
        acc = new_acc(NT)
        warp_gemv_tile(mma_atom(mWuk.element_type), mWuk, row0, Int32(0), sX, acc, lane, nope // _STEP, NT,
                       cfg.unroll)
        for nt in cutlass.range_constexpr(NT):
            for i in cutlass.range_constexpr(4):
                rl, b = acc_coords(lane, nt, i)
                if b < B:
                    mQf[b, h, row0 % cfg.kv_lora_rank + rl] = self.dtype(acc[i, nt])

    # ------------------------------------------------------------------ latent row, RoPE
    @cute.jit
    def block_sum(self, x: Float32, sRed: cute.Tensor) -> Float32:
        """Sum of ``x`` over the CTA, warps added in index order (same bits everywhere)."""
        n_warps = self.cfg.num_threads // _WARP
        # warp_idx() is NOT a plain register read: the DSL makes it warp-uniform with
        # `shfl.sync.idx ... 0xffffffff`. Called inside `if lane == 0` (as this code did),
        # lane 0 alone ran a full-mask shfl.sync (WARPSYNC.ALL in SASS) while lanes 1..31
        # waited at the CTA barrier below, which Hopper enforces per thread: a deadlock of
        # the latent CTA, i.e. of every MLAAbsorb launch (the GPU test / bench hang).
        # Both indices are taken here, where the whole warp is converged.
        warp = cute.arch.warp_idx()
        lane = cute.arch.lane_idx()
        x = cute.arch.warp_reduction_sum(x)
        if lane == 0:
            sRed[warp] = x
        cute.arch.barrier()
        tot = Float32(0.0)
        for w in cutlass.range_constexpr(n_warps):
            tot = tot + sRed[w]
        return tot

    @cute.jit
    def cache_put(self, mCache: cute.Tensor, mTable: cute.Tensor, b: Int32, pos: Int32, j: Int32, val: Float32):
        cfg = self.cfg
        if const_expr(cfg.paged):
            P = cfg.page_size
            page = cutlass.min(cutlass.max(mTable[b, pos // P], Int32(0)), Int32(cfg.num_pages - 1))
            mCache[page, pos % P, j] = self.dtype(val)
        else:
            mCache[b, pos, j] = self.dtype(val)

    @cute.jit
    def latent(self, mY: cute.Tensor, mKvNorm: cute.Tensor, mCos: cute.Tensor, mSin: cute.Tensor,
               mPos: cute.Tensor, mTable: cute.Tensor, mCache: cute.Tensor, mQf: cute.Tensor,
               sRed: cute.Tensor, b: Int32):
        cfg = self.cfg
        T, rank, nope, rope = cfg.num_threads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        tidx = cute.arch.thread_idx()[0]
        c0 = cfg.num_heads * cfg.head_stride          # first ckv column of y
        pos = cutlass.min(cutlass.max(mPos[b], Int32(0)), Int32(min(cfg.max_len, cfg.max_positions) - 1))

        # latent RMSNorm (fp32 of the rounded projection, like torch's rms_norm(ckv.float()))
        ss = Float32(0.0)
        for i in cutlass.range(tidx, rank, T, unroll=1):
            v = Float32(mY[b, c0 + i])
            ss = ss + v * v
        rstd = cute.math.rsqrt(self.block_sum(ss, sRed) / Float32(rank) + Float32(cfg.eps))
        for i in cutlass.range(tidx, rank, T, unroll=1):
            self.cache_put(mCache, mTable, b, pos, i, Float32(mY[b, c0 + i]) * rstd * Float32(mKvNorm[i]))

        # RoPE on interleaved pairs: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        half = rope // 2
        for i in cutlass.range(tidx, (cfg.num_heads + 1) * half, T, unroll=1):
            hh = i // half
            k = i % half
            cs = mCos[pos, k]
            sn = mSin[pos, k]
            if hh < cfg.num_heads:             # q_pe of head hh
                x1 = Float32(mY[b, hh * cfg.head_stride + nope + 2 * k])
                x2 = Float32(mY[b, hh * cfg.head_stride + nope + 2 * k + 1])
                mQf[b, hh, rank + 2 * k] = self.dtype(x1 * cs - x2 * sn)
                mQf[b, hh, rank + 2 * k + 1] = self.dtype(x2 * cs + x1 * sn)
            else:                              # k_pe -> the cache row
                x1 = Float32(mY[b, c0 + rank + 2 * k])
                x2 = Float32(mY[b, c0 + rank + 2 * k + 1])
                self.cache_put(mCache, mTable, b, pos, rank + 2 * k, x1 * cs - x2 * sn)
                self.cache_put(mCache, mTable, b, pos, rank + 2 * k + 1, x2 * cs + x1 * sn)

    @cute.kernel
    def kernel(self, mY: cute.Tensor, mWuk: cute.Tensor, mKvNorm: cute.Tensor, mCos: cute.Tensor,
               mSin: cute.Tensor, mPos: cute.Tensor, mTable: cute.Tensor, mCache: cute.Tensor,
               mQf: cute.Tensor):
        cfg = self.cfg
        bidx = cute.arch.block_idx()[0]
        smem = cutlass.memory.SmemAllocator()
        sX = smem.allocate_tensor(mY.element_type, x_smem_layout(cfg.n_tiles, cfg.qk_nope_head_dim),
                                  byte_alignment=16)
        sRed = smem.allocate_tensor(Float32, cute.make_layout(_WARP), byte_alignment=16)
        if const_expr(cfg.pdl):
            pdl_handoff()
        if bidx < cfg.gemv_ctas:
            self.absorb_tiles(mY, mWuk, mQf, sX, bidx)
        else:
            self.latent(mY, mKvNorm, mCos, mSin, mPos, mTable, mCache, mQf, sRed, bidx - cfg.gemv_ctas)
