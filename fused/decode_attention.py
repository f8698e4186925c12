"""Split-KV decode attention over a cluster, merged with ClusterGather.

STATUS: GPU-tested on an H100 (tests/test_decode_attention.py, and through the
attention block's tests, which reuse ``attend`` and ``merge_groups``); the tensor-core
path (``attend_mma``, ``merge_stash``) on an H200 (session 10).

One cluster of C CTAs per (request b, KV head g); CTA r of the cluster takes
tokens ``[r*ceil(n/C), (r+1)*ceil(n/C))`` of the request's ``n = lengths[b]``
cached tokens, for all ``G = heads / kv_heads`` query heads that share KV head
g (GQA: K and V are read once for the group)::

    CTA r:   for each token of its range (TPT = head_dim/8 lanes per token,
             16-byte loads of k and v, `unroll` tokens per group loaded
             before any is used):
                 s_h = q_h . k * scale * log2(e)           (shuffle over TPT lanes)
                 online softmax in base 2: m_h, l_h, o_h[lane's 8 dims], one rescale
                 per ``fold`` tokens of the group (max of their scores first)
             merge its T/TPT token groups through shared memory (fixed order)
             -> partial tile [o (G x hd) | m (G) | l (G)] fp32 in shared memory
    cluster: ClusterGather of the partial tiles (one DSMEM round)
             every CTA merges the C partials in rank order (same bits everywhere)
             CTA r writes outputs e = r, r + C, ... of the G x hd outputs

GQA (G >= 2, ``tensor_cores``) takes the tensor-core path instead of the token
groups (``attend_mma``, :mod:`.decode_attention_mma`)::

    CTA r, warp w:  16-token steps w, w + NW, ... of its range, on its own (no CTA barrier):
                    K, V fragments straight from global memory into registers
                    S = q K^T     2 x hd/16 m16n8k16, heads on M (G <= 8 rows), tokens on N
                    online softmax of head r on lane quad r (base 2)
                    O^T += V^T P^T   hd/16 m16n8k16, dims on M, P^T = S's accumulators as they lie
             stash (m, l, O) per warp -> merged in warp order -> the same partial tile

Splits (``splits = S > 1``): S clusters a (request, KV head), for grids that one
cluster a pair leaves too small (few requests, few KV heads). The pair's tokens are
cut into S x C parts, cluster s taking parts s C .. s C + C - 1; each cluster merges
its C partials over DSMEM as above, then goes through global memory::

    cluster s, CTA r:   its elements e = r T + tidx, ... of the cluster-merged o
                        (relative to the cluster's m) -> work[pair, s, e];
                        (m, l) of every head -> work[pair, s, G hd + r 2G ...]
                        (a copy a rank: rank r's merge reads only what rank r's
                        CTAs wrote)
    last_arrival(count[pair, r], S)   integer atomic; the last of the S rank-r CTAs:
                        merges elements e of the S rows in split order -> o

    work [pairs, S, G*hd + C*2*G] fp32, count [pairs, C] int32 (zeroed once; the
    last arrival resets it: graph replays need nothing)

Diagnostics (``phase_timer``): thread 0 of CTA c writes ``%globaltimer_lo`` as int32 at
``work[stamp_base + c * STAMPS + k]`` when phase k of :data:`PHASES` ends (the workspace
grows by STAMPS words a CTA; ``benchmarks/bench_decode_attention.py --phases`` reads them).

The weights exp2(m_part - m_max) are taken as 0 for empty parts (m = -inf), so
CTAs with no tokens (n < S C) contribute nothing. Deterministic: fixed merge
orders, no float atomics (the arrival counters are integers and decide only who
merges, never the order).

Caches: contiguous ``[B, max_len, kv_heads, hd]`` or paged
``[num_pages, page_size, kv_heads, hd]`` with ``page_table [B, max_pages]``
(int32). ``q [B, heads, hd]`` (RoPE applied), ``lengths [B]`` int32 (>= 1),
``o [B, heads, hd]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import ClusterGather, cluster_sync, last_arrival
from cf_cute.primitives.plan import check_smem

from ._attn_shape import AttnShape
from .decode_attention_mma import TensorCoreAttention

__all__ = ["DecodeAttentionConfig", "DecodeAttention", "takes_tensor_cores", "merge_parts", "MMA_MAX_THREADS",
           "MAX_SPLITS", "PHASES"]

_LOG2E = 1.4426950408889634
MMA_MAX_THREADS = 256             # the tensor-core path's ~200 registers a thread fill the register file above this
MAX_SPLITS = 64
# phase_timer stamps a CTA, in order: what ends at each (thread 0's view)
PHASES = ("start", "attend", "warp_merge", "gather", "cluster_merge", "arrival", "end")
STAMPS = len(PHASES)


def takes_tensor_cores(num_heads: int, num_kv_heads: int, tensor_cores: bool = True) -> bool:
    """Whether the attention takes the tensor-core path (``attend_mma``): GQA (two or more
    query heads a KV head) unless ``tensor_cores`` is off; MHA always runs on CUDA cores."""
    return tensor_cores and num_heads // num_kv_heads >= 2


@cute.jit
def merge_parts(n: cutlass.Constexpr[int], m_of, o_of, l_of):
    """Parts ``k = 0 .. n-1`` of an online softmax (base 2) merged in part order, the one
    merge behind every level (warps in a CTA, CTAs in a cluster, clusters of a split):
    ``m_of(k)`` the part's running max (-inf: empty, weight 0), ``o_of(k)`` and ``l_of(k)``
    its output element and row sum relative to it. Returns ``(o, m, l)``, o and l relative
    to m = max_k m_of(k)."""
    mx = -Float32.inf
    for k in cutlass.range_constexpr(n):
        mx = cute.arch.fmax(mx, m_of(k))
    acc = Float32(0.0)
    lsum = Float32(0.0)
    for k in cutlass.range_constexpr(n):
        w = Float32(0.0)
        if m_of(k) != -Float32.inf:
            w = cute.math.exp2(m_of(k) - mx, fastmath=True)
        acc = acc + w * o_of(k)
        lsum = lsum + w * l_of(k)
    return acc, mx, lsum


@dataclass(frozen=True)
class DecodeAttentionConfig(AttnShape):
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_len: int                  # contiguous: cache length; paged: max_pages * page_size
    cluster_size: int = 4
    paged: bool = False
    page_size: int = 16
    num_pages: int = 0            # paged: pages in the pool
    dtype: str = "bfloat16"
    num_threads: int = 256
    unroll: int = 4               # tokens per token group whose k/v loads are issued together
    fold_budget: int = 16         # heads x tokens folded per online-softmax rescale (DecodeAttention.fold; H200,
                                  # batch 16, 8 KV heads: 16K 532 -> 443 µs, 32K 1049 -> 862; 32 KV heads level)
    tensor_cores: bool = True     # GQA (G >= 2): scores and P V on tensor cores, a warp a token stream
                                  # (DecodeAttention.attend_mma); MHA keeps the CUDA-core path
    mma_depth: int = 1            # tensor cores: 16-token steps of K / V loads in flight a warp
    splits: int = 1               # clusters a (request, KV head), merged through global memory (last_arrival)
    phase_timer: bool = False     # diagnostics: thread 0 of each CTA stamps %globaltimer_lo into the int32
                                  # words past the workspace (``stamp_base``; STAMPS a CTA: see PHASES)

    @property
    def mma(self) -> bool:
        """Whether the kernel takes the tensor-core path (:meth:`DecodeAttention.attend_mma`)."""
        return takes_tensor_cores(self.num_heads, self.num_kv_heads, self.tensor_cores)

    def validate(self) -> None:
        self.validate_shape()
        if self.num_threads % 32 or not 32 <= self.num_threads <= 1024:
            raise ValueError(f"num_threads must be a multiple of 32 in 32..1024, got {self.num_threads}")
        if self.mma_depth not in (0, 1, 2, 3):
            raise ValueError(f"mma_depth must be 0, 1, 2 or 3, got {self.mma_depth}")
        if not isinstance(self.splits, int) or not 1 <= self.splits <= MAX_SPLITS:
            raise ValueError(f"splits must be an integer in 1..{MAX_SPLITS}, got {self.splits!r}")
        if self.mma and self.num_threads > MMA_MAX_THREADS:
            raise ValueError(f"the tensor-core path runs at most {MMA_MAX_THREADS} threads a CTA (about 200 "
                             f"registers a thread fill the register file), got {self.num_threads}")

    @property
    def grid(self) -> int:
        return self.batch * self.num_kv_heads * self.splits * self.cluster_size

    @property
    def work_row(self) -> int:
        """fp32 words a split's partial takes in the workspace: o [G*hd] | (m, l) [C, 2, G]."""
        return self.group * self.head_dim + self.cluster_size * 2 * self.group

    @property
    def stamp_base(self) -> int:
        """Words of the split workspace proper (1, never read, without splits)."""
        return self.batch * self.num_kv_heads * self.splits * self.work_row if self.splits > 1 else 1

    @property
    def work_elems(self) -> int:
        """fp32 words of the workspace: the split partials, then (``phase_timer``) STAMPS int32
        stamps a CTA."""
        return self.stamp_base + (STAMPS * self.grid if self.phase_timer else 0)

    @property
    def count_elems(self) -> int:
        """int32 arrival counters, one a (request, KV head, cluster rank); 1, never read, without splits."""
        return self.batch * self.num_kv_heads * self.cluster_size if self.splits > 1 else 1


class DecodeAttention(TensorCoreAttention):
    def __init__(self, cfg: DecodeAttentionConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        self.tpt = cfg.head_dim // 8                       # lanes per token (CUDA-core path)
        # token groups per CTA: TPT lanes each on CUDA cores, a warp each on tensor cores
        self.groups = cfg.num_threads // (32 if cfg.mma else self.tpt)
        G, hd = cfg.group, cfg.head_dim
        # partial tile [o (G*hd) | m (G) | l (G)], padded so the gather moves 16-byte vectors
        used = G * hd + 2 * G
        step = 4 * cfg.num_threads if used > 4 * cfg.num_threads else 4
        self.tile_elems = (used + step - 1) // step * step
        # one gather per launch: a single stage
        self.gat = ClusterGather(Float32, self.tile_elems, cfg.cluster_size, cfg.num_threads, stages=1)
        self.scale = _LOG2E / math.sqrt(hd)
        # tokens folded per online-softmax rescale in ``attend``: the largest divisor of unroll
        # with fold x G <= fold_budget (at least 1). Folding costs registers beside q, o, k and v:
        # this kernel alone (no register cap) takes 171 at G = 4, fold 4; the fused block, capped
        # at 128, spilled 616 bytes with G = 4, fold 8 and 328 with fold 4, none with fold 2
        self.fold = max(f for f in range(1, cfg.unroll + 1)
                        if cfg.unroll % f == 0 and f * G <= max(cfg.fold_budget, G))
        self.smem_bytes = (self.gat.smem_bytes + 4 * self.tile_elems + 4 * self.groups * G * (2 + hd)
                           + 4 * 16 + (16 if cfg.splits > 1 else 0))
        check_smem(f"DecodeAttention({G} heads per KV head, cluster {cfg.cluster_size})", self.smem_bytes)

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mTable: cute.Tensor,
                 mLen: cute.Tensor, mO: cute.Tensor, mWork: cute.Tensor, mCount: cute.Tensor, stream):
        self.kernel(mQ, mK, mV, mTable, mLen, mO, mWork, mCount).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream)

    @cute.jit
    def _kv_vec(self, mX: cute.Tensor, mTable: cute.Tensor, b: Int32, t: Int32, g: Int32, d8: Int32):
        """8 values (16 bytes) of token t, kv head g, dims [8*d8, 8*d8 + 8)."""
        if const_expr(self.cfg.paged):
            P = self.cfg.page_size
            page = cutlass.min(cutlass.max(mTable[b, t // P], Int32(0)), Int32(self.cfg.num_pages - 1))
            return cute.local_tile(mX, (1, 1, 1, 8), (page, t % P, g, d8)).load().reshape((8,))
        else:
            return cute.local_tile(mX, (1, 1, 1, 8), (b, t, g, d8)).load().reshape((8,))

    @cute.jit
    def load_q(self, mQ: cute.Tensor, b: Int32, g: Int32) -> cute.Tensor:
        """This lane's 8 dims of the G query heads of KV head g, pre-scaled for exp2."""
        G = self.cfg.group
        d8 = cute.arch.thread_idx()[0] % self.tpt
        q = cute.make_rmem_tensor((G, 8), Float32)
        for h in cutlass.range_constexpr(G):
            qv = cute.local_tile(mQ, (1, 1, 8), (b, g * G + h, d8)).load().to(Float32)
            for j in cutlass.range_constexpr(8):
                q[h, j] = qv[j] * Float32(self.scale)
        return q

    @cute.jit
    def new_state(self):
        """Online-softmax state (m, l, o) of this thread, empty."""
        G = self.cfg.group
        m = cute.make_rmem_tensor(G, Float32)
        l = cute.make_rmem_tensor(G, Float32)
        o = cute.make_rmem_tensor((G, 8), Float32)
        m.fill(-Float32.inf)
        l.fill(0.0)
        o.fill(0.0)
        return m, l, o

    @cute.jit
    def attend(self, mK: cute.Tensor, mV: cute.Tensor, mTable: cute.Tensor, b: Int32, g: Int32, start: Int32,
               end: Int32, q: cute.Tensor, m: cute.Tensor, l: cute.Tensor, o: cute.Tensor):
        """Fold cached tokens ``[start, end)`` of request b, KV head g into this
        thread's state: token group ``tidx // TPT`` takes every NG-th token,
        lane ``tidx % TPT`` 8 dims. All threads of the CTA call it with the same
        range (the shuffles need whole warps)."""
        cfg = self.cfg
        G, TPT, NG = cfg.group, self.tpt, self.groups
        tidx = cute.arch.thread_idx()[0]
        d8 = tidx % TPT
        grp = tidx // TPT
        U = cfg.unroll
        steps = (end - start + NG * U - 1) // (NG * U)
        for it in cutlass.range(steps, unroll=1):
            # issue the 2U loads of this iteration before any of them is used
            kr = cute.make_rmem_tensor((8, U), mK.element_type)
            vr = cute.make_rmem_tensor((8, U), mK.element_type)
            for u in cutlass.range_constexpr(U):
                ts = cutlass.min(start + it * NG * U + u * NG + grp, end - 1)
                kr[None, u].store(self._kv_vec(mK, mTable, b, ts, g, d8))
                vr[None, u].store(self._kv_vec(mV, mTable, b, ts, g, d8))
            # fold F tokens at a time per head with one rescale: m_new = max(m, s_0..s_F-1),
            # then corr = 2^(m - m_new) once and p_u = 2^(s_u - m_new) (tokens past the range
            # count as -inf: p_u = 0); one exp2 and 8 FMAs a head saved per extra token
            F = self.fold
            for c in cutlass.range_constexpr(U // F):
                for h in cutlass.range_constexpr(G):
                    sc = cute.make_rmem_tensor(F, Float32)
                    for f in cutlass.range_constexpr(F):
                        acc = Float32(0.0)
                        for j in cutlass.range_constexpr(8):
                            acc = acc + q[h, j] * Float32(kr[j, c * F + f])
                        sc[f] = acc
                    for f in cutlass.range_constexpr(F):
                        sc[f] = cute.arch.warp_reduction(sc[f], lambda a, b_: a + b_, threads_in_group=TPT)
                        if start + it * NG * U + (c * F + f) * NG + grp >= end:
                            sc[f] = -Float32.inf
                    m_new = m[h]
                    for f in cutlass.range_constexpr(F):
                        m_new = cute.arch.fmax(m_new, sc[f])
                    if m_new != -Float32.inf:       # any valid token so far (else nothing to fold)
                        corr = cute.math.exp2(m[h] - m_new, fastmath=True)
                        p = cute.math.exp2(sc[0] - m_new, fastmath=True)
                        lsum = l[h] * corr + p
                        for j in cutlass.range_constexpr(8):
                            o[h, j] = o[h, j] * corr + p * Float32(vr[j, c * F])
                        for f in cutlass.range_constexpr(1, F):
                            p = cute.math.exp2(sc[f] - m_new, fastmath=True)
                            lsum = lsum + p
                            for j in cutlass.range_constexpr(8):
                                o[h, j] = o[h, j] + p * Float32(vr[j, c * F + f])
                        l[h] = lsum
                        m[h] = m_new

    @cute.jit
    def merge_groups(self, m: cute.Tensor, l: cute.Tensor, o: cute.Tensor, sGM: cute.Tensor, sGL: cute.Tensor,
                     sGO: cute.Tensor, sPart: cute.Tensor):
        """Merge the NG token groups' states (fixed order) into this CTA's
        partial ``sPart = [o (G*hd, relative to m) | m (G) | l (G)]``. Starts
        and ends with a CTA barrier."""
        cfg = self.cfg
        G, hd, TPT = cfg.group, cfg.head_dim, self.tpt
        tidx = cute.arch.thread_idx()[0]
        d8 = tidx % TPT
        grp = tidx // TPT
        cute.arch.barrier()
        for h in cutlass.range_constexpr(G):
            if d8 == 0:
                sGM[grp, h] = m[h]
                sGL[grp, h] = l[h]
            for j in cutlass.range_constexpr(8):
                sGO[grp, h * hd + d8 * 8 + j] = o[h, j]
        self.merge_stash(sGM, sGL, sGO, sPart)

    @cute.jit
    def merge_stash(self, sGM: cute.Tensor, sGL: cute.Tensor, sGO: cute.Tensor, sPart: cute.Tensor):
        """Merge the NG stashed states ``sGM / sGL [NG, G]``, ``sGO [NG, G*hd]`` in group
        order into ``sPart``. Starts and ends with a CTA barrier."""
        cfg = self.cfg
        G, hd, T, NG = cfg.group, cfg.head_dim, cfg.num_threads, self.groups
        tidx = cute.arch.thread_idx()[0]
        cute.arch.barrier()
        for e in cutlass.range(tidx, G * hd, T, unroll=1):
            h = e // hd
            acc, mx, lsum = merge_parts(NG, lambda k: sGM[k, h], lambda k: sGO[k, e], lambda k: sGL[k, h])
            sPart[e] = acc
            if e % hd == 0:
                sPart[G * hd + h] = mx
                sPart[G * hd + G + h] = lsum
        cute.arch.barrier()

    @cute.jit
    def _cluster_merge(self, sAll: cute.Tensor, e: Int32, h: Int32):
        """Element e (head h) of the cluster's C partial tiles ``sAll``, merged in rank
        order: (o relative to mx, mx, l relative to mx)."""
        G, hd, C = self.cfg.group, self.cfg.head_dim, self.cfg.cluster_size
        return merge_parts(C, lambda r: sAll[G * hd + h, r], lambda r: sAll[e, r], lambda r: sAll[G * hd + G + h, r])

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mTable: cute.Tensor,
               mLen: cute.Tensor, mO: cute.Tensor, mWork: cute.Tensor, mCount: cute.Tensor):
        cfg = self.cfg
        G, hd, C, T, S = cfg.group, cfg.head_dim, cfg.cluster_size, cfg.num_threads, cfg.splits
        TPT, NG = self.tpt, self.groups
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        cl = bidx // C
        pair = cl // S                       # (request, KV head)
        split = cl % S
        b = pair // cfg.num_kv_heads
        g = pair % cfg.num_kv_heads

        smem = cutlass.memory.SmemAllocator()
        bufs = self.gat.allocate(smem)
        sPart = smem.allocate_tensor(Float32, cute.make_layout(self.tile_elems), byte_alignment=16)
        sGM = smem.allocate_tensor(Float32, cute.make_layout((NG, G)), byte_alignment=16)
        sGL = smem.allocate_tensor(Float32, cute.make_layout((NG, G)), byte_alignment=16)
        sGO = smem.allocate_tensor(Float32, cute.make_layout((NG, G * hd)), byte_alignment=16)
        self.gat.init(bufs)
        cute.arch.cluster_arrive_relaxed()

        self._stamp(mWork, bidx, 0)
        # memory safety for unchecked device-side lengths / page indices: clamp
        n = cutlass.max(cutlass.min(mLen[b], Int32(cfg.max_len)), Int32(0))
        chunk = (n + S * C - 1) // (S * C)
        start = (split * C + rank) * chunk
        end = cutlass.min(n, start + chunk)
        if const_expr(cfg.mma):
            qa = self.load_q_mma(mQ, b, g, cute.arch.lane_idx())
            self.attend_mma(qa, self.scale, mK, mV, mTable, b, g, start, end, sGM, sGL, sGO)
            self._stamp(mWork, bidx, 1)
            self.merge_stash(sGM, sGL, sGO, sPart)
        else:
            q = self.load_q(mQ, b, g)
            m, l, o = self.new_state()
            # every thread of the CTA runs the same number of steps (the shuffles need
            # whole warps); a token group past the end loads a clamped token and skips
            # the update
            self.attend(mK, mV, mTable, b, g, start, end, q, m, l, o)
            self._stamp(mWork, bidx, 1)
            # ---- merge the NG token groups of this CTA (fixed order)
            self.merge_groups(m, l, o, sGM, sGL, sGO, sPart)
        self._stamp(mWork, bidx, 2)

        # ---- one DSMEM round: every CTA gets every CTA's partial tile
        cute.arch.cluster_wait()
        sAll = self.gat.gather(bufs, sPart, Int32(0))
        self._stamp(mWork, bidx, 3)
        if const_expr(S == 1):
            for e in cutlass.range(rank * T + tidx, G * hd, C * T, unroll=1):
                h = e // hd
                acc, mx, lsum = self._cluster_merge(sAll, e, h)
                mO[b, g * G + h, e % hd] = self.dtype(acc / lsum)
            self.gat.release(bufs, Int32(0))
            self._stamp(mWork, bidx, 4)
            self._stamp(mWork, bidx, 5)
        else:
            # ---- splits: this cluster's partial to the workspace, row (pair, split):
            # o [G*hd] (relative to the cluster's m), then (m, l) [C, 2, G] (a copy a rank,
            # so that rank r's merge reads only what rank r's CTAs wrote)
            R = cfg.work_row
            row = (pair * S + split) * R
            for e in cutlass.range(rank * T + tidx, G * hd, C * T, unroll=1):
                acc, mx, lsum = self._cluster_merge(sAll, e, e // hd)
                mWork[row + e] = acc
            for h in cutlass.range(tidx, G, T, unroll=1):
                acc, mx, lsum = self._cluster_merge(sAll, h, h)
                mWork[row + G * hd + rank * 2 * G + h] = mx
                mWork[row + G * hd + rank * 2 * G + G + h] = lsum
            self.gat.release(bufs, Int32(0))
            self._stamp(mWork, bidx, 4)
            sFlag = smem.allocate_tensor(Int32, cute.make_layout(1), byte_alignment=16)
            # ---- the last of the S clusters' rank-r CTAs merges elements e = r*T + tidx, ... in split order
            last = last_arrival(mCount, pair * C + rank, S, sFlag)
            self._stamp(mWork, bidx, 5)
            if last == Int32(1):
                base = pair * S * R
                for e in cutlass.range(rank * T + tidx, G * hd, C * T, unroll=1):
                    h = e // hd
                    ml = G * hd + rank * 2 * G + h
                    acc, mx, lsum = merge_parts(S, lambda sp: mWork[base + sp * R + ml],
                                                lambda sp: mWork[base + sp * R + e],
                                                lambda sp: mWork[base + sp * R + ml + G])
                    mO[b, g * G + h, e % hd] = self.dtype(acc / lsum)
        self.gat.teardown()
        self._stamp(mWork, bidx, 6)

    @cute.jit
    def _stamp(self, mWork: cute.Tensor, cta: Int32, k: cutlass.Constexpr[int]):
        """``phase_timer``: thread 0 writes %globaltimer_lo to stamp k of CTA ``cta``."""
        cfg = self.cfg
        if const_expr(cfg.phase_timer):
            if cute.arch.thread_idx()[0] == 0:
                words = cute.make_tensor(cute.recast_ptr(mWork.iterator + cfg.stamp_base, dtype=Int32),
                                         cute.make_layout(STAMPS * cfg.grid))
                words[cta * STAMPS + k] = cute.arch.globaltimer_lo()
