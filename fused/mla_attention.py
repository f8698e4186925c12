"""MLA latent attention (issue 6, launch 3 of 5): flash-decoding over the latent
cache, all heads of a request at once.

STATUS: compiles for sm_90a; GPU-tested on an H200 (tests/test_mla.py, session 6).

Every head attends to the same cached rows ``[c (rank) | k_pe (rope)]`` (MQA-like),
so a token's row is read once per request, not once per head. Request b's tokens
``[0, positions[b]]`` are split over S CTAs (``splits``; the host picks S so that
B * S fills the GPU), CTA s takes the 16-aligned range ``[s*chunk, min(n, (s+1)*chunk))``::

    sQ = qf[b] (heads x (rank + rope), the "requests" of the GEMV core, rows >= heads zero)
    per step of TT = 16 * warps tokens:
      scores   warp w: 16-token tile of the cache (the "W" rows, read from global) x sQ on
               tensor cores (mma_gemv.warp_gemv_tile) -> sS[h, tok] = dot * scale * log2(e)
               (-inf for tokens past the range: garbage rows never reach the softmax)
      softmax  warp w: heads w, w + warps, ...: m_new = max(m, tile max), corr = 2^(m - m_new),
               p = 2^(s - m_new) in place of s, l = l * corr + sum p    (sM, sL, sCorr)
      P V      (default, ``tensor_core_pv``) warp w owns dims [w*DW, (w+1)*DW): per 16-token chunk
               o[heads, dims] = o * corr + P (heads on M, p rounded to the activation dtype)
               x C (4-byte pairs of dims at the fragment's 4 tokens, even / odd dims as two
               n-tiles: no transpose; rows are an L1/L2 hit after the scores), fp32 accumulators
               (``tensor_core_pv=False``: thread (head group, 8 dims), an fp32 FMA loop over the
               valid tokens: the reference path; by estimate compute-bound at long context)
               tokens past the range are zeroed in C (their row may hold NaN; p is 0 there)
    partial  o (fp32, relative to m) -> part_o[b, s, h, :], (m, l) -> part_ml[b, s, :, h]

An empty CTA (s * chunk >= n) writes m = -inf, l = 0, o = 0. The partials are merged
in split order by ``MLAOut`` (fused/mla_out.py): deterministic, no atomics. The cache
is read only (the append happened in the previous launch). CTA barriers only.

Cache rows: contiguous ``[B, max_len, rank + rope]`` viewed as ``[B * max_len, rank + rope]``
(the last tile of the last request is shifted back inside the tensor and its leading
rows masked) or paged ``[pages, page_size, rank + rope]`` viewed as ``[pages * page_size,
rank + rope]`` with ``page_size % 16 == 0`` (a tile never crosses a page).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import pdl_handoff
from cf_cute.primitives.plan import check_smem

from .mma_gemv import X_PAD, acc_coords, mma_atom, new_acc, prefetch_rows_l2, warp_gemv_tile, x_smem_layout

__all__ = ["MLAAttentionConfig", "MLAAttention", "pv_pair_mma", "online_max"]

_WARP = 32
_STEP = 32
_VEC = 8
_LOG2E = 1.4426950408889634


@cute.jit
def online_max(m_old: Float32, tile_max: Float32):
    """Online-softmax running max: ``(m_new, corr)`` with corr = 2^(m_old - m_new)
    (1 while every score so far is -inf)."""
    m_new = cute.arch.fmax(m_old, tile_max)
    corr = Float32(1.0)
    if m_new != -Float32.inf:
        corr = cute.math.exp2(m_old - m_new, fastmath=True)
    return m_new, corr


@cute.jit
def pv_pair_mma(atom, acc: cute.Tensor, a: cute.Tensor, cv: cute.Tensor, g: cutlass.Constexpr[int]):
    """One 16-token chunk of the tensor-core P V for dim group g: ``cv[:, q]`` holds the
    lane's dim pair (2 dp, 2 dp + 1) at its 4 k rows (tokens); the even dims form one
    n-tile (E, ``acc[:, 0, g]``), the odd ones another (O, ``acc[:, 1, g]``), both times
    ``a`` (P, heads on M): no transpose needed (see ``MLAAttention.pv_mma``)."""
    for e in cutlass.range_constexpr(2):
        bf = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), a.element_type)
        for q in cutlass.range_constexpr(4):
            bf[q] = cv[e, q]
        cf = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), Float32)
        for i in cutlass.range_constexpr(4):
            cf[i] = acc[i, e, g]
        cute.gemm(atom, cf, a, bf, cf)
        for i in cutlass.range_constexpr(4):
            acc[i, e, g] = cf[i]


@dataclass(frozen=True)
class MLAAttentionConfig:
    batch: int
    num_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    max_len: int                  # contiguous: cache length; paged: max_pages * page_size
    splits: int                   # CTAs per request
    scale: float                  # softmax scale
    paged: bool = False
    page_size: int = 16
    num_pages: int = 0
    dtype: str = "bfloat16"
    num_threads: int = 256
    unroll: int = 6               # MMA steps of cache loads in flight per warp
    tensor_core_pv: bool = True   # P V on tensor cores (False: the fp32 CUDA-core loop, the reference path)
    l2_prefetch: bool = True      # each warp asks L2 for its next step's tile before this step's scores
    pdl: bool = False             # launch as a programmatic dependent of the previous kernel

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def n_tiles(self) -> int:
        return (self.num_heads + 7) // 8

    @property
    def tokens_per_step(self) -> int:
        return 16 * (self.num_threads // _WARP)

    @property
    def head_groups(self) -> int:
        return self.num_threads // (self.kv_lora_rank // _VEC)

    @property
    def cache_rows(self) -> int:
        return self.num_pages * self.page_size if self.paged else self.batch * self.max_len

    @property
    def grid(self) -> int:
        return self.batch * self.splits

    def validate(self) -> None:
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype!r}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be in 1..16, got {self.batch}")
        if not 1 <= self.num_heads <= 16:
            raise ValueError(f"the latent attention takes 1..16 heads (one MMA N side), got {self.num_heads}")
        if self.latent_dim % _STEP:
            raise ValueError(f"rank + rope = {self.latent_dim} must be a multiple of {_STEP}")
        dv = self.kv_lora_rank // _VEC
        if not self.tensor_core_pv and (self.kv_lora_rank % _VEC or self.num_threads % dv
                                        or self.num_heads % self.head_groups):
            raise ValueError(f"kv_lora_rank = {self.kv_lora_rank}: the CUDA-core P V needs num_threads = "
                             f"{self.num_threads} a multiple of rank / 8 and num_heads a multiple of "
                             f"num_threads / (rank / 8)")
        if self.splits < 1:
            raise ValueError(f"splits must be >= 1, got {self.splits}")
        if self.tensor_core_pv and self.kv_lora_rank % (16 * (self.num_threads // _WARP)):
            raise ValueError(f"kv_lora_rank = {self.kv_lora_rank} must be a multiple of 16 * warps for the "
                             f"tensor-core P V")
        if self.paged and (self.page_size % 16 or self.num_pages < 1):
            raise ValueError(f"a paged latent cache needs page_size % 16 == 0 (got {self.page_size}) "
                             f"and num_pages >= 1")
        if self.cache_rows < 16:
            raise ValueError(f"the latent cache must hold at least 16 rows, has {self.cache_rows}")


class MLAAttention:
    def __init__(self, cfg: MLAAttentionConfig):
        cfg.validate()
        self.cfg = cfg
        self.scale2 = cfg.scale * _LOG2E
        self.smem_bytes = (2 * cfg.n_tiles * 8 * (cfg.latent_dim + X_PAD) + 4 * cfg.num_heads * cfg.tokens_per_step
                           + 3 * 4 * cfg.num_heads + 64)
        check_smem("MLAAttention", self.smem_bytes)

    @cute.jit
    def __call__(self, mQf: cute.Tensor, mCache: cute.Tensor, mTable: cute.Tensor, mPos: cute.Tensor,
                 mPartO: cute.Tensor, mPartML: cute.Tensor, stream):
        self.kernel(mQf, mCache, mTable, mPos, mPartO, mPartML).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1], stream=stream, use_pdl=self.cfg.pdl)

    @cute.jit
    def token_row(self, mTable: cute.Tensor, b: Int32, t: Int32) -> Int32:
        """Row of token t of request b in the 2-D view of the cache."""
        cfg = self.cfg
        row = b * cfg.max_len + t
        if const_expr(cfg.paged):
            P = cfg.page_size
            page = cutlass.min(cutlass.max(mTable[b, t // P], Int32(0)), Int32(cfg.num_pages - 1))
            row = page * P + t % P
        return row

    @cute.jit
    def tile_row0(self, mTable: cute.Tensor, b: Int32, t0: Int32):
        """(first row, shift) of the 16-row tile of tokens t0 .. t0 + 15: a contiguous cache's
        last request may need its tile moved back by ``shift`` rows to stay inside the tensor."""
        row0 = self.token_row(mTable, b, t0)
        shift = row0 - cutlass.min(row0, Int32(self.cfg.cache_rows - 16))
        return row0 - shift, shift

    @cute.jit
    def scores(self, mCache: cute.Tensor, mTable: cute.Tensor, sQ: cute.Tensor, sS: cute.Tensor, b: Int32,
               base: Int32, end: Int32):
        """Warp w: sS[:, 16w : 16w + 16] = scaled scores of tokens base + 16w ... (-inf if invalid)."""
        cfg = self.cfg
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        H, NT = cfg.num_heads, cfg.n_tiles
        for i in cutlass.range_constexpr((16 * H + _WARP - 1) // _WARP):
            e = lane + i * _WARP
            if e < 16 * H:
                sS[e // 16, warp * 16 + e % 16] = -Float32.inf
        cute.arch.sync_warp()
        t0 = base + warp * 16
        if const_expr(cfg.l2_prefetch):
            # the HBM reads of the next step start now and overlap this step's math
            if t0 + cfg.tokens_per_step < end:
                nrow0, nshift = self.tile_row0(mTable, b, t0 + cfg.tokens_per_step)
                prefetch_rows_l2(mCache, nrow0, 16, Int32(0), cfg.latent_dim, lane)
        if t0 < end:
            row0, shift = self.tile_row0(mTable, b, t0)
            acc = new_acc(NT)
            warp_gemv_tile(mma_atom(mCache.element_type), mCache, row0, Int32(0), sQ, acc, lane,
                           cfg.latent_dim // _STEP, NT, cfg.unroll)
            for nt in cutlass.range_constexpr(NT):
                for i in cutlass.range_constexpr(4):
                    rl, h = acc_coords(lane, nt, i)
                    col = rl - shift                       # token t0 + col
                    if h < H and col >= 0 and t0 + col < end:
                        sS[h, warp * 16 + col] = acc[i, nt] * Float32(self.scale2)

    @cute.jit
    def softmax(self, sS: cute.Tensor, sM: cute.Tensor, sL: cute.Tensor, sCorr: cute.Tensor):
        """Online-softmax update of the step's tile (module docstring), p in place of s."""
        cfg = self.cfg
        H, NW, TT = cfg.num_heads, cfg.num_threads // _WARP, cfg.tokens_per_step
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        for hi in cutlass.range_constexpr((H + NW - 1) // NW):
            h = warp + hi * NW
            if h < H:
                mx = -Float32.inf
                for k in cutlass.range_constexpr(TT // _WARP):
                    mx = cute.arch.fmax(mx, sS[h, lane + k * _WARP])
                mx = cute.arch.warp_reduction_max(mx)
                m_new, corr = online_max(sM[h], mx)
                ps = Float32(0.0)
                for k in cutlass.range_constexpr(TT // _WARP):
                    sv = sS[h, lane + k * _WARP]
                    p = Float32(0.0)
                    if sv != -Float32.inf:
                        p = cute.math.exp2(sv - m_new, fastmath=True)
                    sS[h, lane + k * _WARP] = p
                    ps = ps + p
                ps = cute.arch.warp_reduction_sum(ps)
                if lane == 0:
                    sM[h] = m_new
                    sL[h] = sL[h] * corr + ps
                    sCorr[h] = corr

    @cute.jit
    def pv(self, mCache: cute.Tensor, mTable: cute.Tensor, sS: cute.Tensor, sCorr: cute.Tensor, o: cute.Tensor,
           b: Int32, base: Int32, n_valid: Int32):
        """o[h, d8 dims] = o * corr[h] + sum over the step's valid tokens of p[h, t] c_t."""
        cfg = self.cfg
        HPT = cfg.num_heads // cfg.head_groups
        tidx = cute.arch.thread_idx()[0]
        dv = cfg.kv_lora_rank // _VEC
        hg = tidx // dv
        d8 = tidx % dv
        for hh in cutlass.range_constexpr(HPT):
            cr = sCorr[hg * HPT + hh]
            for j in cutlass.range_constexpr(_VEC):
                o[hh, j] = o[hh, j] * cr
        for tt in cutlass.range(n_valid, unroll=4):
            row = self.token_row(mTable, b, base + tt)
            cv = cute.make_rmem_tensor(_VEC, Float32)
            cv.store(cute.local_tile(mCache, (1, _VEC), (row, d8)).load().reshape((_VEC,)).to(Float32))
            for hh in cutlass.range_constexpr(HPT):
                p = sS[hg * HPT + hh, tt]
                for j in cutlass.range_constexpr(_VEC):
                    o[hh, j] = o[hh, j] + p * cv[j]

    @cute.jit
    def pv_mma(self, mCache: cute.Tensor, mTable: cute.Tensor, sS: cute.Tensor, sCorr: cute.Tensor,
               acc: cute.Tensor, b: Int32, base: Int32, end: Int32):
        """Tensor-core P V: ``acc += P (heads x 16 tokens) C (16 tokens x dims)`` per 16-token
        chunk, warp w owning dims ``[w*DW, (w+1)*DW)`` (DW = rank / warps), heads on the MMA's M.

        m16n8k16, lane l = 4r + c. A = P from sS (rounded to the activation dtype, rows >= heads
        zero). B = C: for the 16 dims ``d0 + 2r, d0 + 2r + 1`` (r = 0..7) of a group, the lane
        loads the 4-byte pair at tokens 2c, 2c+1, 2c+8, 2c+9 of the chunk (the k rows of its B
        fragment); the even dims form one n-tile (E), the odd ones another (O), so every load
        feeds both and no transpose is needed. ``acc[i, E/O, g]`` then holds heads r (i < 2) and
        r + 8 (i >= 2) at dims ``d0 + 4c + (0, 2) (E) / (1, 3) (O)`` (+ i % 2 * 2): the
        4 contiguous dims ``d0 + 4c .. d0 + 4c + 3``. Tokens past ``end`` load a valid row and
        are zeroed (their p is 0 too, but the row may hold NaN)."""
        cfg = self.cfg
        H, NW, TT = cfg.num_heads, cfg.num_threads // _WARP, cfg.tokens_per_step
        DW = cfg.kv_lora_rank // NW
        G = DW // 16
        dt = mCache.element_type
        atom = mma_atom(dt)
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        r = lane // 4
        c = lane % 4
        # rescale by this step's correction (rows >= heads stay zero)
        for hh in cutlass.range_constexpr(2):
            h = r + 8 * hh
            if h < H:
                cr = sCorr[h]
                for g in cutlass.range_constexpr(G):
                    for e in cutlass.range_constexpr(2):
                        for i in cutlass.range_constexpr(2):
                            acc[2 * hh + i, e, g] = acc[2 * hh + i, e, g] * cr
        n_chunks = (cutlass.min(Int32(TT), end - base) + 15) // 16
        for kc in cutlass.range(n_chunks, unroll=1):
            # A = P[heads, 16 tokens of the chunk]
            a = cute.make_rmem_tensor(cute.make_layout(((2, 2, 2), 1, 1)), dt)
            for hh in cutlass.range_constexpr(2):
                for kh in cutlass.range_constexpr(2):
                    for e in cutlass.range_constexpr(2):
                        pv = Float32(0.0)
                        if r + 8 * hh < H:
                            pv = sS[r + 8 * hh, kc * 16 + 2 * c + 8 * kh + e]
                        a[4 * kh + 2 * hh + e] = dt(pv)
            # cache rows of the lane's 4 tokens (an invalid token reads the range's last row)
            rows = cute.make_rmem_tensor(4, Int32)
            valid = cute.make_rmem_tensor(4, Int32)
            for q in cutlass.range_constexpr(4):
                t = base + kc * 16 + 2 * c + (q % 2) + 8 * (q // 2)
                valid[q] = Int32(1)
                if t >= end:
                    valid[q] = Int32(0)
                rows[q] = self.token_row(mTable, b, cutlass.min(t, end - 1))
            for g in cutlass.range_constexpr(G):
                dp = (warp * DW + g * 16) // 2 + r            # dim pair index: dims 2*dp, 2*dp + 1
                cv = cute.make_rmem_tensor((2, 4), dt)
                for q in cutlass.range_constexpr(4):
                    cv[None, q].store(cute.local_tile(mCache, (1, 2), (rows[q], dp)).load().reshape((2,)))
                for q in cutlass.range_constexpr(4):
                    if valid[q] == 0:
                        cv[None, q].fill(0.0)
                pv_pair_mma(atom, acc, a, cv, g)

    @cute.jit
    def store_partial_mma(self, acc: cute.Tensor, mPartO: cute.Tensor, b: Int32, s: Int32):
        """part_o[b, s, h, d0 + 4c : +4] from the tensor-core accumulators (see ``pv_mma``)."""
        cfg = self.cfg
        H, NW = cfg.num_heads, cfg.num_threads // _WARP
        DW = cfg.kv_lora_rank // NW
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        r = lane // 4
        c = lane % 4
        for g in cutlass.range_constexpr(DW // 16):
            for hh in cutlass.range_constexpr(2):
                h = r + 8 * hh
                if h < H:
                    v4 = cute.make_rmem_tensor(4, Float32)
                    for k in cutlass.range_constexpr(4):
                        v4[k] = acc[2 * hh + k // 2, k % 2, g]
                    cute.local_tile(mPartO, (1, 1, 1, 4), (b, s, h, (warp * DW + g * 16) // 4 + c)).store(
                        v4.load().reshape((1, 1, 1, 4)))

    @cute.kernel
    def kernel(self, mQf: cute.Tensor, mCache: cute.Tensor, mTable: cute.Tensor, mPos: cute.Tensor,
               mPartO: cute.Tensor, mPartML: cute.Tensor):
        cfg = self.cfg
        H, S, T, NT, TT = cfg.num_heads, cfg.splits, cfg.num_threads, cfg.n_tiles, cfg.tokens_per_step
        HPT = H // max(cfg.head_groups, 1)     # CUDA-core P V: heads a thread owns
        LAT = cfg.latent_dim
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        b = bidx // S
        s = bidx % S

        smem = cutlass.memory.SmemAllocator()
        sQ = smem.allocate_tensor(mQf.element_type, x_smem_layout(NT, LAT), byte_alignment=16)
        sS = smem.allocate_tensor(Float32, cute.make_layout((H, TT), stride=(TT, 1)), byte_alignment=16)
        sM = smem.allocate_tensor(Float32, cute.make_layout(H), byte_alignment=16)
        sL = smem.allocate_tensor(Float32, cute.make_layout(H), byte_alignment=16)
        sCorr = smem.allocate_tensor(Float32, cute.make_layout(H), byte_alignment=16)
        if const_expr(cfg.pdl):
            pdl_handoff()

        # the heads' queries [q_lat | q_pe] -> sQ (16-byte vectors, rows >= heads zero)
        nv = LAT // _VEC
        for i in cutlass.range(tidx, NT * 8 * nv, T, unroll=1):
            r = i // nv
            j = i % nv
            dst = cute.local_tile(sQ, (1, _VEC), (r, j))
            if r < H:
                dst.store(cute.local_tile(mQf, (1, 1, _VEC), (b, r, j)).load().reshape((1, _VEC)))
            else:
                dst.fill(0.0)
        if tidx < H:
            sM[tidx] = -Float32.inf
            sL[tidx] = Float32(0.0)
        if const_expr(cfg.tensor_core_pv):
            o = cute.make_rmem_tensor((4, 2, cfg.kv_lora_rank // (T // _WARP) // 16), Float32)
        else:
            o = cute.make_rmem_tensor((HPT, _VEC), Float32)
        o.fill(0.0)

        # this CTA's token range (positions clamped to the cache for memory safety)
        n = cutlass.min(cutlass.max(mPos[b], Int32(0)), Int32(cfg.max_len - 1)) + 1
        chunk = ((n + S - 1) // S + 15) // 16 * 16
        start = s * chunk
        end = cutlass.min(n, start + chunk)
        steps = (cutlass.max(end - start, Int32(0)) + TT - 1) // TT
        cute.arch.barrier()
        for it in cutlass.range(steps, unroll=1):
            base = start + it * TT
            self.scores(mCache, mTable, sQ, sS, b, base, end)
            cute.arch.barrier()
            self.softmax(sS, sM, sL, sCorr)
            cute.arch.barrier()
            if const_expr(cfg.tensor_core_pv):
                self.pv_mma(mCache, mTable, sS, sCorr, o, b, base, end)
            else:
                self.pv(mCache, mTable, sS, sCorr, o, b, base, cutlass.min(Int32(TT), end - base))
            cute.arch.barrier()

        # partial state of this split
        if const_expr(cfg.tensor_core_pv):
            self.store_partial_mma(o, mPartO, b, s)
        else:
            dv = cfg.kv_lora_rank // _VEC
            hg = tidx // dv
            d8 = tidx % dv
            for hh in cutlass.range_constexpr(HPT):
                cute.local_tile(mPartO, (1, 1, 1, _VEC), (b, s, hg * HPT + hh, d8)).store(
                    o[hh, None].load().reshape((1, 1, 1, _VEC)))
        if tidx < H:
            mPartML[b, s, 0, tidx] = sM[tidx]
            mPartML[b, s, 1, tidx] = sL[tidx]
