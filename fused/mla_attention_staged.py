"""MLA latent attention with the cache staged in shared memory (issue 6, launch 3 of 5):
the same result as :mod:`fused.mla_attention` (same partials, same merge), but the
cache rows travel by the copy engine, several steps ahead of the math.

Why: the direct kernel reads each step's rows from global memory twice (scores, then
P V) and keeps loads in flight only during the score phase, so a CTA's step is a chain
of latencies (about 1.2 TB/s at batch 16, 32K). Here every cached row is read from HBM
once, by ``cp.async.bulk`` into a ring of shared-memory stages, while the warps work on
an earlier stage; both matrix products then read shared memory.

Request b's tokens ``[0, positions[b]]`` are split over S CTAs as in the direct kernel
(CTA s: the 16-aligned range ``[s*chunk, min(n, (s+1)*chunk))``), TT tokens a step::

    stage ring  sC[NS, TT, LAT + 8]  (rows padded by 16 bytes: the 4-byte fragment loads of
                both products hit 32 different banks)   full[NS] mbarriers (1 arrival + tx)
    producer    warp 0, before step it: lane i copies token it+NS-1's row i (one bulk copy
                of LAT * 2 bytes per row, so a paged cache costs nothing extra; tokens past
                the range copy the range's last row) into stage (it+NS-1) % NS, after lane 0
                armed full[] with the stage's bytes
    scores      warp w = (token group tg, K group kg), w = tg * KG + kg: S[h, t] partial over
                the kg-th LAT/KG slice of [c | k_pe], heads on the MMA's M (A = q from
                registers, loaded once), tokens on N (B = 4-byte pairs of a row from sC)
                -> sSp[it % 2, kg, h, t] (fp32)
    softmax     warp w: heads w, w + 8 (a half-warp each); s = scale*log2(e) * sum_kg sSp (kg order)
                (-inf past the range), m, l, corr as the direct kernel -> sP[h, t] (the
                activation dtype, rows >= heads stay zero), sP and sCorr[it % 2]
    P V         warp w owns dims [w*DW, (w+1)*DW): acc = acc * corr + P C per 16-token chunk
                (A = P from sP, B = dim pairs of C from sC: the direct kernel's even / odd
                n-tiles, so no transpose)
    partial     o (fp32, relative to m) -> part_o[b, s, h, :], (m, l) -> part_ml[b, s, :, h]

Barrier contract: thread 0 initialises full[] (then ``mbarrier_init_fence`` and a CTA
barrier); every thread waits on full[it % NS] with parity (it // NS) & 1 before step it;
two CTA barriers a step: A after the scores, B after the softmax. sSp, sP and sCorr are
double-buffered by step parity, so step it + 1's scores may start while slower warps still
run step it's P V (they write the other buffers). Passing A of step it means every warp
finished P V of step it - 1: only then does warp 0 refill that step's stage, (it - 1) % NS,
with step it + NS - 1. Every copy issued is waited on before the kernel ends.
Deterministic: fixed-order sums, no atomics. One CTA an SM (shared memory bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, const_expr
from cutlass.experimental import primitives as _prims

from cf_cute.primitives import pdl_handoff
from cf_cute.primitives.plan import SMEM_LIMIT_BYTES, check_smem

from .mla_attention import MLAAttention, MLAAttentionConfig, online_max, pv_pair_mma
from .mma_gemv import mma_atom

__all__ = ["MLAStagedAttentionConfig", "MLAStagedAttention", "staged_smem_bytes"]

_WARP = 32
_LOG2E = 1.4426950408889634
_ROW_PAD = 8            # elements of padding a staged row (16 bytes)
_MAX_STAGES = 8


def staged_smem_bytes(latent_dim: int, stage_tokens: int, stages: int, k_groups: int) -> int:
    """Shared memory of the staged kernel: ring, partial scores, P, softmax state, barriers."""
    return (2 * stages * stage_tokens * (latent_dim + _ROW_PAD) + 2 * 4 * k_groups * 16 * stage_tokens
            + 2 * 2 * 16 * (stage_tokens + _ROW_PAD) + 4 * 4 * 16 + 8 * stages + 64)


@dataclass(frozen=True)
class MLAStagedAttentionConfig(MLAAttentionConfig):
    stage_tokens: int = 32        # TT: tokens a step (one stage of the ring)
    stages: int = 0               # NS: stages in the ring (0: as many as fit, at most 8)
    k_groups: int = 4             # KG: warps splitting the score's K (latent + rope) dimension

    @property
    def tokens_per_step(self) -> int:
        return self.stage_tokens

    @property
    def num_stages(self) -> int:
        if self.stages:
            return self.stages
        for ns in range(_MAX_STAGES, 0, -1):
            if staged_smem_bytes(self.latent_dim, self.stage_tokens, ns, self.k_groups) <= SMEM_LIMIT_BYTES:
                return ns
        return 1

    def validate(self) -> None:
        super().validate()
        NW = self.num_threads // _WARP
        if NW != 8:
            raise ValueError(f"the staged latent attention runs 8 warps (num_threads = 256), got {self.num_threads}")
        if not self.tensor_core_pv:
            raise ValueError("the staged latent attention computes P V on tensor cores only")
        if self.k_groups not in (1, 2, 4, 8) or (self.latent_dim // 16) % self.k_groups:
            raise ValueError(f"k_groups = {self.k_groups} must be 1, 2, 4 or 8 and divide (rank + rope) / 16 = "
                             f"{self.latent_dim // 16}")
        tg = NW // self.k_groups
        if self.stage_tokens % 32 or self.stage_tokens % (8 * tg):
            raise ValueError(f"stage_tokens = {self.stage_tokens} must be a multiple of 32 and of 8 * "
                             f"{tg} token groups (k_groups = {self.k_groups})")
        if (2 * self.latent_dim) % 16:
            raise ValueError(f"a cache row of {self.latent_dim} elements is not a whole number of 16-byte "
                             f"bulk-copy units")
        if self.stages < 0 or self.stages > _MAX_STAGES:
            raise ValueError(f"stages must be 0 (auto) or 1..{_MAX_STAGES}, got {self.stages}")


class MLAStagedAttention(MLAAttention):
    def __init__(self, cfg: MLAStagedAttentionConfig):
        cfg.validate()
        self.cfg = cfg
        self.scale2 = cfg.scale * _LOG2E
        self.smem_bytes = staged_smem_bytes(cfg.latent_dim, cfg.stage_tokens, cfg.num_stages, cfg.k_groups)
        check_smem(f"MLAStagedAttention({cfg.num_stages} stages of {cfg.stage_tokens} tokens)", self.smem_bytes)

    @cute.jit
    def _buf(self, t: cute.Tensor, par: Int32) -> cute.Tensor:
        """Buffer ``par`` of a double-buffered shared tensor (leading mode 2)."""
        return t[par, None] if const_expr(cute.rank(t) == 2) else cute.slice_(t, (par,) + (None,) * (cute.rank(t) - 1))

    @cute.jit
    def issue_stage(self, mCache: cute.Tensor, mTable: cute.Tensor, sC: cute.Tensor, full: cute.Pointer,
                    b: Int32, step: Int32, start: Int32, end: Int32, lane: Int32):
        """Warp 0: bulk-copy the rows of step ``step`` into stage ``step % NS``."""
        cfg = self.cfg
        TT, NS, LAT = cfg.stage_tokens, cfg.num_stages, cfg.latent_dim
        st = step % NS
        if lane == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(full + st, TT * LAT * 2)
        cute.arch.sync_warp()
        for i in cutlass.range_constexpr(TT // _WARP):
            t = cutlass.min(start + step * TT + i * _WARP + lane, end - 1)
            row = self.token_row(mTable, b, t)
            dst = cute.local_tile(sC, (1, 1, LAT), (st, i * _WARP + lane, 0))
            src = cute.local_tile(mCache, (1, LAT), (row, 0))
            _prims.cp_async_bulk_shared_cluster_global(dst.iterator, src.iterator, full + st, LAT * 2)

    @cute.jit
    def load_q(self, mQf: cute.Tensor, b: Int32, kg: Int32, lane: Int32) -> cute.Tensor:
        """A fragments of q (heads x this warp's K slice), rows >= heads zero:
        ``qa[v, ks]`` for the ks-th k16 step, v = e + 2 hh + 4 kh as the MMA wants."""
        cfg = self.cfg
        H, LAT, KG = cfg.num_heads, cfg.latent_dim, cfg.k_groups
        KS = LAT // 16 // KG
        dt = mQf.element_type
        r = lane // 4
        c = lane % 4
        qa = cute.make_rmem_tensor(cute.make_layout((8, KS)), dt)
        for ks in cutlass.range_constexpr(KS):
            k0 = (kg * KS + ks) * 16
            for hh in cutlass.range_constexpr(2):
                for kh in cutlass.range_constexpr(2):
                    pair = cute.make_rmem_tensor(2, dt)
                    pair.fill(0.0)
                    if r + 8 * hh < H:
                        pair.store(cute.local_tile(mQf, (1, 1, 2), (b, r + 8 * hh, (k0 + 2 * c + 8 * kh) // 2))
                                   .load().reshape((2,)))
                    for e in cutlass.range_constexpr(2):
                        qa[e + 2 * hh + 4 * kh, ks] = pair[e]
        return qa

    @cute.jit
    def staged_scores(self, qa: cute.Tensor, sC: cute.Tensor, sSp: cute.Tensor, st: Int32, kg: Int32, tg: Int32,
                      lane: Int32):
        """sSp[kg, h, t] = partial scores of this warp's tokens over its K slice."""
        cfg = self.cfg
        LAT, KG, TT = cfg.latent_dim, cfg.k_groups, cfg.stage_tokens
        KS = LAT // 16 // KG
        TPW = TT // (8 // KG)                  # tokens of a token group
        NTT = TPW // 8
        dt = sC.element_type
        atom = mma_atom(dt)
        r = lane // 4
        c = lane % 4
        acc = cute.make_rmem_tensor(cute.make_layout((4, NTT)), Float32)
        acc.fill(0.0)
        for ks in cutlass.range_constexpr(KS):
            k0 = (kg * KS + ks) * 16
            a = cute.make_rmem_tensor(cute.make_layout(((2, 2, 2), 1, 1)), dt)
            for v in cutlass.range_constexpr(8):
                a[v] = qa[v, ks]
            for nt in cutlass.range_constexpr(NTT):
                tok = tg * TPW + nt * 8 + r
                bf = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), dt)
                for kh in cutlass.range_constexpr(2):
                    pair = cute.local_tile(sC, (1, 1, 2), (st, tok, (k0 + 2 * c + 8 * kh) // 2)).load()
                    pr = pair.reshape((2,))
                    bf[2 * kh] = pr[0]
                    bf[2 * kh + 1] = pr[1]
                cf = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), Float32)
                for i in cutlass.range_constexpr(4):
                    cf[i] = acc[i, nt]
                cute.gemm(atom, cf, a, bf, cf)
                for i in cutlass.range_constexpr(4):
                    acc[i, nt] = cf[i]
        for nt in cutlass.range_constexpr(NTT):
            for i in cutlass.range_constexpr(4):
                sSp[kg, r + 8 * (i // 2), tg * TPW + nt * 8 + 2 * c + i % 2] = acc[i, nt]

    @cute.jit
    def staged_softmax(self, sSp: cute.Tensor, sP: cute.Tensor, sM: cute.Tensor, sL: cute.Tensor,
                       sCorr: cute.Tensor, n_valid: Int32, lane: Int32, warp: Int32):
        """Online softmax of the step: half-warp j of warp w takes head w + 8 j (both heads'
        shuffle reductions run side by side over 16 lanes); lane l of a half: tokens
        l % 16, l % 16 + 16, ... Heads past ``num_heads`` compute on the zero rows and
        write nothing."""
        cfg = self.cfg
        H, KG, TT = cfg.num_heads, cfg.k_groups, cfg.stage_tokens
        TPL = TT // 16
        dt = sP.element_type
        h = warp + 8 * (lane // 16)
        j = lane % 16
        sv = cute.make_rmem_tensor(TPL, Float32)
        mx = -Float32.inf
        for k in cutlass.range_constexpr(TPL):
            t = j + 16 * k
            tot = Float32(0.0)
            for q in cutlass.range_constexpr(KG):
                tot = tot + sSp[q, h, t]
            sv[k] = -Float32.inf
            if t < n_valid:
                sv[k] = tot * Float32(self.scale2)
            mx = cute.arch.fmax(mx, sv[k])
        mx = cute.arch.warp_reduction_max(mx, threads_in_group=16)
        m_new, corr = online_max(sM[h], mx)
        ps = Float32(0.0)
        for k in cutlass.range_constexpr(TPL):
            p = Float32(0.0)
            if sv[k] != -Float32.inf:
                p = cute.math.exp2(sv[k] - m_new, fastmath=True)
            if h < H:
                sP[h, j + 16 * k] = dt(p)
            ps = ps + p
        ps = cute.arch.warp_reduction_sum(ps, threads_in_group=16)
        if j == 0 and h < H:
            sM[h] = m_new
            sL[h] = sL[h] * corr + ps
            sCorr[h] = corr

    @cute.jit
    def staged_pv(self, sC: cute.Tensor, sP: cute.Tensor, sCorr: cute.Tensor, acc: cute.Tensor, st: Int32,
                  lane: Int32, warp: Int32):
        """acc = acc * corr + P C over the step's tokens (the direct kernel's ``pv_mma`` with
        both operands in shared memory; P is zero past the range)."""
        cfg = self.cfg
        H, TT = cfg.num_heads, cfg.stage_tokens
        DW = cfg.kv_lora_rank // 8
        G = DW // 16
        dt = sC.element_type
        atom = mma_atom(dt)
        r = lane // 4
        c = lane % 4
        for hh in cutlass.range_constexpr(2):
            if r + 8 * hh < H:
                cr = sCorr[r + 8 * hh]
                for g in cutlass.range_constexpr(G):
                    for e in cutlass.range_constexpr(2):
                        for i in cutlass.range_constexpr(2):
                            acc[2 * hh + i, e, g] = acc[2 * hh + i, e, g] * cr
        for kc in cutlass.range_constexpr(TT // 16):
            a = cute.make_rmem_tensor(cute.make_layout(((2, 2, 2), 1, 1)), dt)
            for hh in cutlass.range_constexpr(2):
                for kh in cutlass.range_constexpr(2):
                    pr = cute.local_tile(sP, (1, 2), (r + 8 * hh, (kc * 16 + 2 * c + 8 * kh) // 2)).load()
                    pr2 = pr.reshape((2,))
                    a[4 * kh + 2 * hh] = pr2[0]
                    a[4 * kh + 2 * hh + 1] = pr2[1]
            for g in cutlass.range_constexpr(G):
                dp = (warp * DW + g * 16) // 2 + r            # dims 2*dp, 2*dp + 1
                cv = cute.make_rmem_tensor((2, 4), dt)
                for q in cutlass.range_constexpr(4):
                    tok = kc * 16 + 2 * c + (q % 2) + 8 * (q // 2)
                    cv[None, q].store(cute.local_tile(sC, (1, 1, 2), (st, tok, dp)).load().reshape((2,)))
                pv_pair_mma(atom, acc, a, cv, g)

    @cute.kernel
    def kernel(self, mQf: cute.Tensor, mCache: cute.Tensor, mTable: cute.Tensor, mPos: cute.Tensor,
               mPartO: cute.Tensor, mPartML: cute.Tensor):
        cfg = self.cfg
        H, S, TT, NS, KG = cfg.num_heads, cfg.splits, cfg.stage_tokens, cfg.num_stages, cfg.k_groups
        LAT = cfg.latent_dim
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        bidx = cute.arch.block_idx()[0]
        b = bidx // S
        s = bidx % S
        dt = mQf.element_type

        smem = cutlass.memory.SmemAllocator()
        sC = smem.allocate_tensor(dt, cute.make_layout((NS, TT, LAT), stride=(TT * (LAT + _ROW_PAD), LAT + _ROW_PAD, 1)),
                                  byte_alignment=128)
        sSp = smem.allocate_tensor(Float32, cute.make_layout((2, KG, 16, TT), stride=(KG * 16 * TT, 16 * TT, TT, 1)),
                                   byte_alignment=16)
        sP = smem.allocate_tensor(dt, cute.make_layout((2, 16, TT), stride=(16 * (TT + _ROW_PAD), TT + _ROW_PAD, 1)),
                                  byte_alignment=16)
        sM = smem.allocate_tensor(Float32, cute.make_layout(16), byte_alignment=16)
        sL = smem.allocate_tensor(Float32, cute.make_layout(16), byte_alignment=16)
        sCorr = smem.allocate_tensor(Float32, cute.make_layout((2, 16), stride=(16, 1)), byte_alignment=16)
        full = smem.allocate_array(Int64, NS, byte_alignment=8)

        if tidx == 0:
            for i in cutlass.range_constexpr(NS):
                cute.arch.mbarrier_init(full + i, 1)
            cute.arch.mbarrier_init_fence()
        if tidx < 16:
            sM[tidx] = -Float32.inf
            sL[tidx] = Float32(0.0)
        for i in cutlass.range(tidx, 2 * 16 * TT, 8 * _WARP, unroll=1):
            sP[i // (16 * TT), (i // TT) % 16, i % TT] = dt(0.0)

        # this CTA's token range (positions clamped to the cache for memory safety)
        n = cutlass.min(cutlass.max(mPos[b], Int32(0)), Int32(cfg.max_len - 1)) + 1
        chunk = ((n + S - 1) // S + 15) // 16 * 16
        start = s * chunk
        end = cutlass.min(n, start + chunk)
        steps = (cutlass.max(end - start, Int32(0)) + TT - 1) // TT
        cute.arch.barrier()                  # barriers initialised, sP zeroed

        # prologue: stages whose tokens all precede the appended one (n - 1) hold rows no running
        # launch writes, so they go before the wait (under ``pdl`` the launch before this one
        # may still be appending row n - 1; every launch before that one has finished)
        if warp == 0:
            for i in cutlass.range_constexpr(NS - 1):
                if i < steps and start + (i + 1) * TT < n:
                    self.issue_stage(mCache, mTable, sC, full, b, Int32(i), start, end, lane)
        if const_expr(cfg.pdl):
            pdl_handoff()
        if warp == 0:
            for i in cutlass.range_constexpr(NS - 1):
                if i < steps and start + (i + 1) * TT >= n:
                    self.issue_stage(mCache, mTable, sC, full, b, Int32(i), start, end, lane)
        kg = warp % KG
        tg = warp // KG
        qa = self.load_q(mQf, b, kg, lane)
        acc = cute.make_rmem_tensor((4, 2, cfg.kv_lora_rank // 8 // 16), Float32)
        acc.fill(0.0)

        for it in cutlass.range(steps, unroll=1):
            st = it % NS
            par = it % 2
            cute.arch.mbarrier_wait(full + st, (it // NS) % 2)
            self.staged_scores(qa, sC, self._buf(sSp, par), st, kg, tg, lane)
            cute.arch.barrier()              # A: scores done; every warp is past step it - 1's P V
            if warp == 0:
                if it + NS - 1 < steps:
                    self.issue_stage(mCache, mTable, sC, full, b, it + NS - 1, start, end, lane)
            self.staged_softmax(self._buf(sSp, par), self._buf(sP, par), sM, sL, self._buf(sCorr, par),
                                end - (start + it * TT), lane, warp)
            cute.arch.barrier()              # B: P and the corrections of step it are in place
            self.staged_pv(sC, self._buf(sP, par), self._buf(sCorr, par), acc, st, lane, warp)

        self.store_partial_mma(acc, mPartO, b, s)
        if tidx < H:
            mPartML[b, s, 0, tidx] = sM[tidx]
            mPartML[b, s, 1, tidx] = sL[tidx]
