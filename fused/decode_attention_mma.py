"""The tensor-core path of :class:`~.decode_attention.DecodeAttention` (GQA, G = 2..8
query heads a KV head): a warp a stream of 16-token steps, everything in registers.

Per step (tokens ``t0 + [0, 16)`` of one request and KV head; lane = 4 r + c)::

    K fragments   lane (r, c): tokens t0 + r, t0 + 8 + r, dims [c hd/4, (c+1) hd/4)
                  (hd/32 16-byte loads a token, straight from global memory)
    S = q K^T     2 x hd/16 m16n8k16: heads on M (rows >= G zero), the step's tokens on N,
                  the dot product's K dimension permuted so those runs are the B fragments
                  (k-slot 2c + 8kh + e of k-step ks is dim c hd/4 + 4 ks + 2 kh + e; q's A
                  fragments use the same order, :meth:`TensorCoreAttention.q_fragments`)
    softmax       head r on quad r: max over 4 lanes (2 shuffles), base 2, the row sum kept
                  per lane until the end
    V fragments   lane (r, c): tokens t0 + 8 kh + 2c + e, dims [r hd/8, (r+1) hd/8)
    O^T += V^T P^T   hd/16 m16n8k16: dims on M, the 16 tokens on K, heads on N; P^T's B
                  fragments are the scores' accumulators as they lie (C of n-tiles 0 and 1 at
                  lane (r, c) = B of one k16 step at lane (r, c)); V^T's A fragments pair two
                  tokens' values a register; row r + 8 hh of m-tile mt is dim
                  r hd/8 + hh hd/16 + mt

``mma_depth`` steps of loads stay in flight a warp (step it + depth NW's loads go out as soon
as step it's registers are free; 0: at each step's start, the fewest registers). At the end
each warp stashes (m, l, O) for :meth:`DecodeAttention.merge_stash`. No shared memory and no
CTA barrier in the loop; deterministic (fixed token order a warp, fixed merge order).

A mixin: it uses the host class's ``cfg`` (a ``DecodeAttentionConfig``), ``groups`` (warps a
CTA), ``dtype`` and ``_kv_vec``.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from .mma_gemv import mma_atom

__all__ = ["TensorCoreAttention"]


class TensorCoreAttention:
    @cute.jit
    def q_fragments(self, qv: cute.Tensor) -> cute.Tensor:
        """A fragments of the G <= 8 query heads (heads on M, rows 8..15 zero) from this
        lane's run ``qv`` of hd/4 dims of head r = lane // 4 (zero for r >= G):
        ``qa[v, ks]``, v = e + 2 hh + 4 kh as the MMA wants. Dims are permuted: the
        k-slot ``2 c + 8 kh + e`` of k-step ks is dim ``c hd/4 + 4 ks + 2 kh + e``, so that
        lane (r, c)'s K fragments are one contiguous run of hd/4 dims of a token."""
        KS = self.cfg.head_dim // 16
        qa = cute.make_rmem_tensor(cute.make_layout((8, KS)), qv.element_type)
        qa.fill(0.0)
        for ks in cutlass.range_constexpr(KS):
            for kh in cutlass.range_constexpr(2):
                for e in cutlass.range_constexpr(2):
                    qa[e + 4 * kh, ks] = qv[4 * ks + 2 * kh + e]
        return qa

    @cute.jit
    def load_q_mma(self, mQ: cute.Tensor, b: Int32, g: Int32, lane: Int32) -> cute.Tensor:
        """:meth:`q_fragments` of request b's query heads of KV head g (``mQ [B, heads, hd]``)."""
        G, hd = self.cfg.group, self.cfg.head_dim
        Q4 = hd // 4
        r = lane // 4
        qv = cute.make_rmem_tensor(cute.make_layout((8, Q4 // 8)), mQ.element_type)
        qv.fill(0.0)
        if r < G:
            for v in cutlass.range_constexpr(Q4 // 8):
                qv[None, v].store(cute.local_tile(mQ, (1, 1, 8), (b, g * G + r, (lane % 4) * (Q4 // 8) + v)).load()
                                  .reshape((8,)))
        return self.q_fragments(qv)

    @cute.jit
    def load_q_mma_smem(self, sQ: cute.Tensor, base: Int32, lane: Int32) -> cute.Tensor:
        """:meth:`q_fragments` of the G heads at ``sQ[base + h hd + d]`` (fp32, rounded to
        the cache dtype)."""
        G, hd = self.cfg.group, self.cfg.head_dim
        Q4 = hd // 4
        r = lane // 4
        qv = cute.make_rmem_tensor(Q4, self.dtype)
        qv.fill(0.0)
        if r < G:
            for j in cutlass.range_constexpr(Q4):
                qv[j] = self.dtype(sQ[base + r * hd + (lane % 4) * Q4 + j])
        return self.q_fragments(qv)

    @cute.jit
    def load_k_mma(self, mK: cute.Tensor, mTable: cute.Tensor, b: Int32, g: Int32, t0: Int32, last: Int32,
                   kr: cute.Tensor, lane: Int32):
        """Issue the K loads of tokens ``t0 + [0, 16)`` (clamped to ``last``): lane (r, c) takes
        tokens t0 + r and t0 + 8 + r (``kr[:, :, nt]``), dims ``[c hd/4, (c+1) hd/4)``."""
        K8 = self.cfg.head_dim // 32             # 16-byte vectors of the lane's run
        for nt in cutlass.range_constexpr(2):
            t = cutlass.min(t0 + 8 * nt + lane // 4, last)
            for v in cutlass.range_constexpr(K8):
                kr[None, v, nt].store(self._kv_vec(mK, mTable, b, t, g, (lane % 4) * K8 + v))

    @cute.jit
    def load_v_mma(self, mV: cute.Tensor, mTable: cute.Tensor, b: Int32, g: Int32, t0: Int32, last: Int32,
                   vr: cute.Tensor, lane: Int32):
        """Issue the V loads of tokens ``t0 + [0, 16)`` (clamped to ``last``): lane (r, c) takes
        tokens t0 + 8 kh + 2 c + e (``vr[:, :, 2 kh + e]``), dims ``[r hd/8, (r+1) hd/8)``."""
        V8 = self.cfg.head_dim // 64
        for q in cutlass.range_constexpr(4):
            t = cutlass.min(t0 + 8 * (q // 2) + 2 * (lane % 4) + q % 2, last)
            for v in cutlass.range_constexpr(V8):
                vr[None, v, q].store(self._kv_vec(mV, mTable, b, t, g, (lane // 4) * V8 + v))

    @cute.jit
    def step_mma(self, qa: cute.Tensor, kr: cute.Tensor, vr: cute.Tensor, acc: cute.Tensor, m: Float32,
                 l: Float32, t0: Int32, end: Int32, lane: Int32, scale: cutlass.Constexpr[float]):
        """One 16-token step of :meth:`attend_mma` (tokens ``t0 + [0, 16)``, those at or past
        ``end`` masked; scores times ``scale``): returns the new ``(m, l)`` of head
        r = lane // 4, updates ``acc``."""
        hd = self.cfg.head_dim
        KS, MT = hd // 16, hd // 16
        dt = kr.element_type
        atom = mma_atom(dt)
        c = lane % 4
        # ---- scores, heads on M: s[2 nt + e] is head r, token t0 + 8 nt + 2 c + e
        s = cute.make_rmem_tensor(4, Float32)
        for nt in cutlass.range_constexpr(2):
            cf = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), Float32)
            cf.fill(0.0)
            for ks in cutlass.range_constexpr(KS):
                a = cute.make_rmem_tensor(cute.make_layout(((2, 2, 2), 1, 1)), dt)
                for v in cutlass.range_constexpr(8):
                    a[v] = qa[v, ks]
                bf = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), dt)
                for j in cutlass.range_constexpr(4):
                    bf[j] = kr[(4 * ks + j) % 8, (4 * ks + j) // 8, nt]
                cute.gemm(atom, cf, a, bf, cf)
            for e in cutlass.range_constexpr(2):
                s[2 * nt + e] = cf[e]
        # ---- online softmax of head r over the quad's 16 tokens
        mx = -Float32.inf
        for j in cutlass.range_constexpr(4):
            if const_expr(scale != 1.0):
                s[j] = s[j] * Float32(scale)
            if t0 + 8 * (j // 2) + 2 * c + j % 2 >= end:
                s[j] = -Float32.inf
            mx = cute.arch.fmax(mx, s[j])
        mx = cute.arch.warp_reduction_max(mx, threads_in_group=4)
        m_new = cute.arch.fmax(m, mx)
        m_use = m_new
        if m_new == -Float32.inf:             # nothing valid yet: every p is 0, o and l stay 0
            m_use = Float32(0.0)
        corr = cute.math.exp2(m - m_use, fastmath=True)
        pb = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), dt)
        psum = Float32(0.0)
        for j in cutlass.range_constexpr(4):
            p = cute.math.exp2(s[j] - m_use, fastmath=True)
            psum = psum + p
            pb[j] = dt(p)                     # P^T's B fragment: k-slot 2 c + 8 kh + e = token 8 kh + 2 c + e
        # ---- O^T = O^T * corr + V^T P^T, dims on M: column e of the accumulators is head 2 c + e
        cc = cute.make_rmem_tensor(2, Float32)
        for e in cutlass.range_constexpr(2):
            cc[e] = cute.arch.shuffle_sync(corr, (2 * c + e) * 4)
        for mt in cutlass.range_constexpr(MT):
            av = cute.make_rmem_tensor(cute.make_layout(((2, 2, 2), 1, 1)), dt)
            for hh in cutlass.range_constexpr(2):
                for kh in cutlass.range_constexpr(2):
                    for e in cutlass.range_constexpr(2):
                        x = hh * MT + mt
                        av[e + 2 * hh + 4 * kh] = vr[x % 8, x // 8, 2 * kh + e]
            cf = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), Float32)
            for i in cutlass.range_constexpr(4):
                cf[i] = acc[i, mt] * cc[i % 2]
            cute.gemm(atom, cf, av, pb, cf)
            for i in cutlass.range_constexpr(4):
                acc[i, mt] = cf[i]
        return m_new, l * corr + psum

    @cute.jit
    def attend_mma(self, qa: cute.Tensor, scale: cutlass.Constexpr[float], mK: cute.Tensor, mV: cute.Tensor,
                   mTable: cute.Tensor, b: Int32, g: Int32, start: Int32, end: Int32, sGM: cute.Tensor,
                   sGL: cute.Tensor, sGO: cute.Tensor):
        """Tensor-core online softmax over tokens ``[start, end)`` of request b, KV head g,
        for the query A fragments ``qa`` (:meth:`load_q_mma` / :meth:`load_q_mma_smem`; scores
        times ``scale``: the base-2 softmax scale, or 1 for a q scaled already), stashed per
        warp into ``sGM / sGL / sGO`` (then ``merge_stash``). Warp w takes the 16-token steps
        w, w + NW, ... (:meth:`step_mma`; the layouts are in the module docstring)."""
        cfg = self.cfg
        G, hd, NW, D = cfg.group, cfg.head_dim, self.groups, cfg.mma_depth
        MT = hd // 16
        K8, V8 = hd // 32, hd // 64          # 16-byte vectors of a lane's K / V run
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        r = lane // 4
        c = lane % 4
        dt = mK.element_type
        acc = cute.make_rmem_tensor(cute.make_layout((4, MT)), Float32)
        acc.fill(0.0)
        m = -Float32.inf
        l = Float32(0.0)
        last = cutlass.max(end - 1, Int32(0))
        steps = (cutlass.max(end - start, Int32(0)) + 15) // 16
        if const_expr(D == 0):
            for it in cutlass.range(warp, steps, NW, unroll=1):
                t0 = start + 16 * it
                kr = cute.make_rmem_tensor(cute.make_layout((8, K8, 2)), dt)
                vr = cute.make_rmem_tensor(cute.make_layout((8, V8, 4)), dt)
                self.load_k_mma(mK, mTable, b, g, t0, last, kr, lane)
                self.load_v_mma(mV, mTable, b, g, t0, last, vr, lane)
                m, l = self.step_mma(qa, kr, vr, acc, m, l, t0, end, lane, scale)
        else:
            kr = cute.make_rmem_tensor(cute.make_layout((8, K8, 2, D)), dt)
            vr = cute.make_rmem_tensor(cute.make_layout((8, V8, 4, D)), dt)
            for d in cutlass.range_constexpr(D):
                t0 = start + 16 * (warp + d * NW)
                self.load_k_mma(mK, mTable, b, g, t0, last, kr[None, None, None, d], lane)
                self.load_v_mma(mV, mTable, b, g, t0, last, vr[None, None, None, d], lane)
            # D steps an iteration (buffer d: step it + d NW); a step past the range is all masked
            for it in cutlass.range(warp, steps, D * NW, unroll=1):
                for d in cutlass.range_constexpr(D):
                    t0 = start + 16 * (it + d * NW)
                    m, l = self.step_mma(qa, kr[None, None, None, d], vr[None, None, None, d], acc, m, l, t0,
                                         end, lane, scale)
                    self.load_k_mma(mK, mTable, b, g, t0 + 16 * D * NW, last, kr[None, None, None, d], lane)
                    self.load_v_mma(mV, mTable, b, g, t0 + 16 * D * NW, last, vr[None, None, None, d], lane)
        # ---- stash this warp's state: (m, l) of head r (l summed over the quad), O of heads 2c, 2c+1
        l = cute.arch.warp_reduction_sum(l, threads_in_group=4)
        if r < G and c == 0:
            sGM[warp, r] = m
            sGL[warp, r] = l
        for i in cutlass.range_constexpr(4):
            h = 2 * c + i % 2
            if h < G:
                for mt in cutlass.range_constexpr(MT):
                    sGO[warp, h * hd + r * (hd // 8) + (i // 2) * MT + mt] = acc[i, mt]
