"""The attention half of a Llama decoder layer at decode time in one launch.

    out = h + o_proj(attention(rope(qkv(rmsnorm(h)))))     h = hidden (+ residual)

with the new k and v appended to the cache. Composed from the cluster
primitives and the building blocks of ``qkv_rope`` (norm + QKV on tensor
cores), ``decode_attention`` (split-KV online softmax) and ``mma_gemv``.

Grid: one cluster of C CTAs per KV head (``num_kv_heads * C`` CTAs, all
resident at once: the host checks it, the grid barrier needs it)::

  phase A, cluster g (KV head g with its G query heads), CTA rank r:
    QKVRope.project      h slice, sum of squares --ClusterReduce--> rstd, x slice,
                         split-K QKV of the group's (G+2)*hd rows
                         --ClusterReduce.all_reduce--> q|k|v in every CTA (fp32, smem)
    RoPE in place        q pre-scaled by log2(e)/sqrt(hd); k, v rounded to the cache dtype
    KV append            request b's new token is cached token pos_b; the CTA whose
                         KV range holds it writes k, v (then a CTA barrier, so its own
                         attention loop reads it back)
    attention            for each request b: tokens [r*ceil((pos+1)/C), ...) of the
                         cache, online softmax per token group, groups merged in
                         fixed order -> (m, l, o) per (b, head); GQA on tensor cores
                         (``DecodeAttention.attend_mma``, a warp a token stream, loads at
                         each step's start within the 128-register cap)
    merge                ClusterGather of (m, l) [B*G*2]; one thread per (b, head) computes
                         this CTA's weight exp2(m - M) / L -> sWgt, CTA barrier; each CTA
                         scales its o by it; ClusterReduce.reduce_scatter (sum) of
                         o [B*G*hd] -> the owner CTA writes attn[b, head, :] (global
                         scratch, L2-resident)

The output projection, two ways (``o_proj``)::

  "grid" (the default for MHA and for GQA from hidden 3072; every CTA resident at once, checked
  by the host):
  GridBarrier            every CTA's attn slice is written and visible
  phase B, CTA c:        residual_gemv_tiles: 16-row tiles c, c + N, ... of W_o [H, heads*hd];
                         the warps split K, tensor cores with x = attn read from L2,
                         partials summed in warp order through shared memory, + h -> out
  grid_sync="flags":     no grid barrier. After its merge (a cluster arrive, the wait before
                         exit) each CTA release-adds 1 to its KV head's counter (thread 0, after a
                         CTA barrier); warp w of phase B issues its first W_o loads,
                         then waits (acquire, a lane a head) until every KV head of its K slice
                         [w*K/NW, (w+1)*K/NW) counts base + C, and streams all the CTA's tiles
                         in one pipeline; the warp-order sums follow the last tile (same bits).
                         base: the counters all advance by C a launch, so thread 0 reads its own
                         head's (which cannot move before this CTA's part of the merge) after the
                         append.

  "head" (the default for GQA up to hidden 2048; no grid-wide wait, no residency needed):
  merge as above, but ClusterReduce.all_reduce of o -> sX [B, G*hd] (the dtype) in every
  CTA, with each warp's first W_o loads already in flight (``o_early_loads``)
  CTA r, warp w:         tiles t = r*TPC + w, + NW, ... (TPC = H/16/C) of W_o[:, g*G*hd : +G*hd]
                         x sX  ->  P[g, b, 16t : 16t+16]     fp32, in the barrier workspace
  warp_last_arrival      on counter (r, w), one of kv_heads; the last warp of the row group:
                         out[b, row] = h[b, row] + sum_{g' = 0..kv_heads-1} P[g', b, row]
                         (head order, whoever came last; 16-byte loads of P from L2)

  workspace (int32 words): [grid barrier (+ 16 stamps a CTA)] [C*NW counters] [pad to 4]
                           [P: fp32 kv_heads x B x H]
                   "grid": [grid barrier (+ stamps)] [kv_heads head counters with "flags"]
  o_stage_tiles = S > 0:   a warp's W_o tiles 1..S are copied to shared memory (cp.async, each
                           lane the pieces it reads later) right after its attention loop and
                           read from there; the merge waits for the lane's own copies (off:
                           level at one tile, and two 105-KB CTAs on an SM slow the QKV phase)

Deterministic: every sum has a fixed order (warp order, rank order in the
collectives, head order across clusters), no float atomics; the grid barrier and the
arrival counters use integer atomics only.
Shared memory: the QKVRope buffers, the token-group merge buffers of
DecodeAttention, the per-request partials ``sO [B*G*hd]``/``sML [B*G*2]``, the merge
weights ``sWgt [B*G]``, the
two merge collectives and ``sRed [warps, 16, batch]``.
"""

from __future__ import annotations

import dataclasses

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import ClusterGather, ClusterReduce, GridBarrier, cluster_sync, warp_last_arrival
from cf_cute.primitives.plan import SMEM_LIMIT_BYTES, check_smem

from .decode_attention import (MMA_MAX_THREADS, DecodeAttention, DecodeAttentionConfig, merge_parts,
                               takes_tensor_cores)
from .mma_gemv import (X_PAD, mma_atom, stage_tile, store_acc, tiled_layout, warp_gemv_rows, weight_view,
                       x_smem_layout)
from .residual_gemv import RED_WORDS_PER_ROW, prefetch_tiles_l2, residual_gemv_tiles
from .qkv_rope import QKVFields, QKVRope, QKVRopeConfig

__all__ = ["AttentionBlockConfig", "AttentionBlock"]

_WARP = 32
_STEP = 32
_TAIL_HEADS = 16        # o_proj="head": at most this many heads' partials loaded at once in the final sum (the
                        # largest divisor of kv_heads up to it; all 32 at once spilled at 128 registers)


@cute.jit
def _rows4(parts: cute.Tensor, h: Int32, b: Int32, row: Int32):
    """``parts[h, b, row:row+4]`` (fp32, 16-byte aligned) as one 16-byte load."""
    return cute.local_tile(parts, (1, 1, 4), (h, b, row // 4)).load().reshape((4,))


@dataclasses.dataclass(frozen=True)
class AttentionBlockConfig(QKVFields):
    """The QKV stage's fields (:class:`~.qkv_rope.QKVFields`; ``l2_prefetch`` also asks
    L2 for the W_o rows before the grid barrier -- off: on the H200 at batch 1 the block is
    faster without, MHA 1K 53.1 -> 49.3 µs, 4K 66.8 -> 62.2, 16K 118.0 -> 113.2, 32K
    185.8 -> 181.6, GQA 1K 48.4 -> 46.4, 4K 51.2 -> 49.6;
    ``w_layout`` is the memory order of both w_qkv and W_o), plus the attention's and the
    block's own."""
    pipeline_tiles: bool | None = None  # the QKV stage: a warp's row tiles as one load pipeline; None: on at
                                  # batch 1 with 128 threads (no 128-register cap; H200: Llama-3.2-1B shape 21.2
                                  # -> 20.1 µs at 1K, 33.5 -> 32.3 at 16K, -3B level, Llama-3-8B 42.2 -> 41.7),
                                  # else off (MHA's 256 threads: 40% slower under the cap; above batch 1 the
                                  # accumulators spill: Llama-3-8B batch 2 16 bytes, batch 16 688)
    attn_unroll: int = 8          # tokens per token group loaded together (H200, batch 1: 4 -> 8 is
                                  # 2.7% faster at 4K, 4.7% at 16K, 6.1% at 32K, level at 1K and GQA)
    attn_fold_budget: int = 1     # heads x tokens folded per softmax rescale (DecodeAttention.fold): one token a
                                  # rescale here (H200, GQA batch 1: 8, i.e. 2 tokens, was 1-3% slower; more
                                  # spills in the 128 registers)
    attn_tensor_cores: bool = True    # GQA: the attention on tensor cores (DecodeAttention.attend_mma)
    attn_mma_depth: int | None = None  # tensor cores: steps of K / V loads in flight a warp beyond the current one
                                  # (0: at each step's start); None: 1 at 128 threads (221 registers, no
                                  # stack), else 0 (the 128-register cap of two 256-thread CTAs an SM).
                                  # H200, GQA, 128 threads, depth 1 vs 0: 16K 62.9 vs 67.3 µs at batch 1,
                                  # 89.0 vs 99.0 at batch 2; level at 1K and 4K
    early_wo_prefetch: bool = False   # ask L2 for the W_o rows before the attention loop, not after
    early_phase_b: bool = False   # phase B's first block of W_o loads issued before the grid barrier (H200,
                                  # session 13, batch 1: level; Llama-2-7B 1K 49.8 vs 50.1 µs, 16K 113.3 vs
                                  # 113.4; Llama-3.2-1B shape 1K 23.1 vs 22.8)
    pdl: bool = False             # launch as a programmatic dependent of the previous kernel (no gain measured)
    o_proj: str | None = None     # the output projection: "grid" (phase B over the whole grid once attn is
                                  # complete, see grid_sync) or "head" (each cluster multiplies its own heads'
                                  # output by its K slice of W_o, partials combined across clusters by warp
                                  # arrival counters: no grid-wide wait, no residency needed). None: "grid",
                                  # except "head" for GQA (tensor-core attention) up to hidden 2048. H200, batch
                                  # 1, 1K / 4K / 16K, µs, head vs grid with flags (session 19): Llama-3.2-1B
                                  # shape 18.9 / 21.9 / 31.9 vs 19.9 / 22.8 / 31.9 (batch 2 1K 24.8 vs 25.4),
                                  # -3B 31.4 / 35.6 / 50.3 vs 30.2 / 34.0 / 49.3, Llama-3-8B 41.0 / 44.9 /
                                  # 59.7 vs 38.5 / 42.2 / 56.9; Llama-2-7B (MHA, 32 partials a row), session 15,
                                  # 1K / 16K, grid (barrier) vs head 49.5 / 112.0 vs 49.5 / 114.2
    grid_sync: str | None = None  # "grid": how phase B learns that x = attn is complete. "barrier": a grid
                                  # barrier. "flags": each cluster counts its head's slice of attn written on
                                  # one counter; each warp of phase B waits only for the heads of its K slice
                                  # (after its first block of W_o loads), then streams its tiles in one pipeline
                                  # (same bits). A late cluster then delays only the warps that read its heads,
                                  # and they catch up while the others are done. None: "flags" for GQA (tensor-
                                  # core attention; its two clusters on shared SMs are late), else "barrier".
                                  # H200, batch 1, 1K / 4K / 16K, µs, barrier vs flags: Llama-3-8B shape 40.6 /
                                  # 44.8 / 59.7 vs 38.5 / 42.2 / 56.9, -3.2-3B 32.4 / 36.6 / 51.8 vs 30.2 / 34.0 /
                                  # 49.3, -3.2-1B 20.8 / 23.9 / 33.1 vs 19.9 / 22.8 / 31.9; MHA 48.3 / 61.4 /
                                  # 111.3 vs 49.0 / 61.6 / 110.8 (level: its clusters finish evenly late)
    o_early_loads: bool = True    # "head": each warp's first block of W_o loads before the cluster merge
    o_stage_tiles: int = 0        # "head": W_o tiles a warp copies to shared memory (cp.async) right after its
                                  # attention loop, so they travel while the merge leaves HBM idle (its 2nd..).
                                  # H200, batch 1: 1 tile level (Llama-3.2-1B shape 1K 20.4-20.7 vs 21.3 µs, 4K
                                  # 23.9 vs 23.6; MHA 1K 50.0 vs 49.7); 2 tiles at MHA (105 KB a CTA) 35% slower:
                                  # the SMs holding two CTAs ran the QKV phase in 41 µs instead of 26 (NOTES)
    num_threads: int | None = None    # threads a CTA; None: 128 when the attention runs on tensor cores (GQA;
                                  # two CTAs an SM), else 256. H200, Llama-3-8B shape, batch 1, 128 threads
                                  # (depth 1) vs 256 (depth 0): 44.2 vs 46.2 µs at 1K, 48.1 vs 50.1 at 4K,
                                  # 62.9 vs 65.4 at 16K
    phase_timer: bool = False     # diagnostics: GridBarrier stamps into mBar (0 start, 9 norm done, 10 warp 0's
                                  # QKV GEMV done, 1 QKV done, 6 RoPE and KV append done, 7 thread 0's attention
                                  # loop done (the last request's), 2 attention done, 8 (m, l) gathered, 11 merge
                                  # weights done, 12 o reduced, 3 merge done, 4 grid barrier passed, 5 end)

    def __post_init__(self):
        if self.num_threads is None:          # resolved here, so every construction plans the same CTA
            tc = takes_tensor_cores(self.num_heads, self.num_kv_heads, self.attn_tensor_cores)
            object.__setattr__(self, "num_threads", 128 if tc else 256)
        if self.attn_mma_depth is None:
            object.__setattr__(self, "attn_mma_depth", 1 if self.num_threads <= 128 else 0)
        if self.pipeline_tiles is None:
            object.__setattr__(self, "pipeline_tiles", self.num_threads <= 128 and self.batch == 1)
        tc = takes_tensor_cores(self.num_heads, self.num_kv_heads, self.attn_tensor_cores)
        if self.o_proj is None:
            object.__setattr__(self, "o_proj", "head" if tc and self.hidden <= 2048 else "grid")
        if self.grid_sync is None:
            object.__setattr__(self, "grid_sync", "flags" if tc and not self.early_phase_b else "barrier")

    @property
    def o_k(self) -> int:
        """K of the output projection (heads * head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def needs_resident_grid(self) -> bool:
        """Whether every CTA must be resident at once (the grid barrier of ``o_proj="grid"``)."""
        return self.o_proj == "grid"

    @property
    def head_tiles(self) -> int:
        """``o_proj="head"``: 16-row tiles of W_o a CTA multiplies (its rank's rows)."""
        return self.hidden // 16 // self.cluster_size

    @property
    def flags(self) -> bool:
        """Whether phase B waits on per-head counters (``o_proj="grid"``, ``grid_sync="flags"``)."""
        return self.o_proj == "grid" and self.grid_sync == "flags"

    @property
    def counter_words(self) -> int:
        """``o_proj="head"``: arrival counters, one per (rank, warp) row group; ``flags``: one
        counter per KV head (its cluster's CTAs count their slices of attn written)."""
        if self.o_proj == "head":
            return self.cluster_size * (self.num_threads // _WARP)
        return self.num_kv_heads if self.flags else 0

    @property
    def partials_offset(self) -> int:
        """``o_proj="head"``: first word of the fp32 partials ``[kv_heads, B, hidden]`` in the
        barrier workspace (16-byte aligned)."""
        return (GridBarrier.state_words(self.grid, self.phase_timer) + self.counter_words + 3) // 4 * 4

    @property
    def state_align(self) -> int:
        """Byte alignment the barrier workspace needs: 16 with ``o_proj="head"`` (16-byte loads
        of the partials), else 4."""
        return 16 if self.o_proj == "head" else 4

    @property
    def state_words(self) -> int:
        """int32 words of the barrier workspace: the grid barrier's (with stamps); with
        ``o_proj="head"`` then the arrival counters and the fp32 partials."""
        if self.o_proj != "head":
            return GridBarrier.state_words(self.grid, self.phase_timer) + self.counter_words
        return self.partials_offset + self.num_kv_heads * self.batch * self.hidden

    def qkv_config(self, smem_budget: int = SMEM_LIMIT_BYTES) -> QKVRopeConfig:
        return QKVRopeConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QKVFields)},
                             smem_budget=smem_budget)

    def attention_config(self) -> DecodeAttentionConfig:
        return DecodeAttentionConfig(batch=self.batch, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                     head_dim=self.head_dim, max_len=self.max_len,
                                     cluster_size=self.cluster_size, paged=self.paged, page_size=self.page_size,
                                     num_pages=self.num_pages, dtype=self.dtype, num_threads=self.num_threads,
                                     unroll=self.attn_unroll, fold_budget=self.attn_fold_budget,
                                     tensor_cores=self.attn_tensor_cores and self.num_threads <= MMA_MAX_THREADS,
                                     mma_depth=self.attn_mma_depth)

    def validate(self) -> None:
        self.qkv_config().validate()
        self.attention_config().validate()
        nw = self.num_threads // _WARP
        if self.hidden % 16:
            raise ValueError(f"hidden = {self.hidden} must be a multiple of 16")
        if self.o_proj not in ("grid", "head"):
            raise ValueError(f"o_proj must be 'grid' or 'head', got {self.o_proj!r}")
        if self.o_proj == "grid" and self.o_k % (nw * _STEP):
            raise ValueError(f"num_heads * head_dim = {self.o_k} must be a multiple of {nw * _STEP} "
                             f"(the output projection's K is split over {nw} warps)")
        if self.o_proj == "head":
            # W_o's rows split into 16-row tiles over the cluster: hidden % (16 C) == 0 follows
            # from the QKV stage's hidden % (32 C) == 0
            if self.group * self.head_dim % _STEP:
                raise ValueError(f"o_proj='head': a KV head's {self.group} x {self.head_dim} output columns must "
                                 f"be a multiple of {_STEP}")
            if self.early_phase_b or self.early_wo_prefetch:
                raise ValueError("early_phase_b and early_wo_prefetch belong to o_proj='grid'")
        if self.grid_sync not in ("barrier", "flags"):
            raise ValueError(f"grid_sync must be 'barrier' or 'flags', got {self.grid_sync!r}")
        if self.flags and self.early_phase_b:
            raise ValueError("early_phase_b belongs to grid_sync='barrier' (with 'flags' every warp's first "
                             "W_o loads run before its wait)")
        if self.o_stage_tiles < 0 or (self.o_stage_tiles and self.o_proj != "head"):
            raise ValueError(f"o_stage_tiles = {self.o_stage_tiles}: a count >= 0, for o_proj='head' only")


class AttentionBlock:
    def __init__(self, cfg: AttentionBlockConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        B, C, T, G, hd = cfg.batch, cfg.cluster_size, cfg.num_threads, cfg.group, cfg.head_dim
        self.attn = DecodeAttention(cfg.attention_config())
        ml = 2 * B * G
        self.ml_elems = (ml + 3) // 4 * 4
        self.gat_ml = ClusterGather(Float32, self.ml_elems, C, T, stages=1, barrier_id=3)
        self.gbar = GridBarrier(cfg.grid, stamps=cfg.phase_timer)
        NG = self.attn.groups
        self.head = cfg.o_proj == "head"
        self.n_tiles = (B + 7) // 8            # MMA n-tiles of the batch (output projection)
        # "head": the cluster's merged output [n_tiles * 8, G*hd] (+ padding), x of its W_o slice
        self.sx_elems = self.n_tiles * 8 * (G * hd + X_PAD) if self.head else 0
        NW = T // _WARP
        self.stage = (min(cfg.o_stage_tiles, (cfg.head_tiles + NW - 1) // NW - 1) if self.head else 0)
        self.stage_elems = NW * self.stage * 16 * G * hd
        own = (self.gat_ml.smem_bytes + 4 * (NG * G * (2 + hd) + self.attn.tile_elems + B * G * hd + self.ml_elems
                                             + self.ml_elems // 2)
               + 4 * (T // _WARP) * 16 * B + 8 * 16 + 2 * self.sx_elems + 16 + 2 * self.stage_elems + 128
               + (16 if cfg.flags else 0))
        # the o merge goes through the cluster in `o_rounds` rounds of B / o_rounds requests,
        # and the QKV partials in as many rounds as QKVRope needs to fit what is left
        self.front = None
        for o_rounds in (r for r in range(1, B + 1) if B % r == 0):
            try:
                red_o = ClusterReduce(B // o_rounds * G * hd, C, T, op="sum", scatter=not self.head, stages=1,
                                      barrier_id=4)
                front = QKVRope(cfg.qkv_config(SMEM_LIMIT_BYTES - own - red_o.smem_bytes))
            except ValueError:
                continue
            fits = front.smem_bytes + own + red_o.smem_bytes <= SMEM_LIMIT_BYTES
            if fits and (self.front is None or o_rounds + front.qkv_rounds < self.o_rounds + self.front.qkv_rounds):
                self.front, self.red_o, self.o_rounds = front, red_o, o_rounds
        if self.front is None:
            raise ValueError(f"AttentionBlock(batch {B}, {G} query heads per KV head, cluster {C}) does not fit "
                             f"in shared memory: use a larger cluster or a smaller batch")
        self.smem_bytes = self.front.smem_bytes + own + self.red_o.smem_bytes
        # two CTAs per SM when shared memory allows (registers are then capped at 128 a
        # thread): clusters of 4 fill only 120 of the H100's 132 SMs at one CTA per SM
        self.ctas_per_sm = 2 if 2 * (self.smem_bytes + 1024) <= 228 * 1024 and T <= 256 else 1
        check_smem(f"AttentionBlock(batch {B}, {G} query heads per KV head, cluster {C})", self.smem_bytes)

    @cute.jit
    def __call__(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mWqkv: cute.Tensor,
                 mWo: cute.Tensor, mCos: cute.Tensor, mSin: cute.Tensor, mPos: cute.Tensor, mK: cute.Tensor,
                 mV: cute.Tensor, mTable: cute.Tensor, mAttn: cute.Tensor, mHOut: cute.Tensor,
                 mBar: cute.Tensor, mOut: cute.Tensor, stream):
        mWqkv = weight_view(mWqkv, self.cfg.w_layout)
        mWo = weight_view(mWo, self.cfg.w_layout)
        self.kernel(mHidden, mResidual, mNormW, mWqkv, mWo, mCos, mSin, mPos, mK, mV, mTable, mAttn, mHOut,
                    mBar, mOut).launch(grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
                                       cluster=[self.cfg.cluster_size, 1, 1], stream=stream,
                                       min_blocks_per_mp=self.ctas_per_sm, preferred_smem_carveout=100,
                                       use_pdl=self.cfg.pdl)

    @cute.jit
    def _rope_in_place(self, sPart: cute.Tensor, mCos: cute.Tensor, mSin: cute.Tensor, mPos: cute.Tensor):
        """RoPE on q (then scaled for exp2) and k; k and v rounded to the cache dtype."""
        cfg = self.cfg
        B, T, G, hd, R = cfg.batch, cfg.num_threads, cfg.group, cfg.head_dim, cfg.qkv_config().rows
        tidx = cute.arch.thread_idx()[0]
        half = hd // 2
        for it in cutlass.range(tidx, B * (G + 1) * half, T, unroll=1):
            b = it // ((G + 1) * half)
            hs = (it // half) % (G + 1)
            i = it % half
            d1, d2 = self.front.rope_dims(i)
            prow = cutlass.min(cutlass.max(mPos[b], Int32(0)), Int32(min(cfg.max_len, cfg.max_positions) - 1))
            r1, r2 = self.front.rope_rotate(sPart[b * R + hs * hd + d1], sPart[b * R + hs * hd + d2],
                                            mCos, mSin, prow, i)
            if hs < G:
                sPart[b * R + hs * hd + d1] = r1 * Float32(self.attn.scale)
                sPart[b * R + hs * hd + d2] = r2 * Float32(self.attn.scale)
            else:
                sPart[b * R + hs * hd + d1] = Float32(self.dtype(r1))
                sPart[b * R + hs * hd + d2] = Float32(self.dtype(r2))
        for it in cutlass.range(tidx, B * hd, T, unroll=1):
            b = it // hd
            d = it % hd
            sPart[b * R + (G + 1) * hd + d] = Float32(self.dtype(sPart[b * R + (G + 1) * hd + d]))

    @cute.jit
    def _token_range(self, mPos: cute.Tensor, b: Int32, rank: Int32):
        """(pos, start, end, chunk): request b's new token is cached token pos;
        this CTA attends to tokens [start, end) of [0, pos]."""
        C = self.cfg.cluster_size
        pos = cutlass.min(cutlass.max(mPos[b], Int32(0)), Int32(min(self.cfg.max_len, self.cfg.max_positions) - 1))
        chunk = (pos + C) // C                      # ceil((pos + 1) / C)
        start = rank * chunk
        end = cutlass.min(pos + 1, start + chunk)
        return pos, start, end, chunk

    @cute.jit
    def _merge(self, bufs_ml, bufs_o, sML: cute.Tensor, sWgt: cute.Tensor, sO: cute.Tensor, mAttn: cute.Tensor,
               sX: cute.Tensor, mBar: cute.Tensor, g: Int32):
        """The cluster merge of the per-CTA (m, l, o): ClusterGather of (m, l), each CTA scales
        its o by exp2(m - M) / L, then the o sum over the cluster in ``o_rounds`` rounds:
        "grid": reduce-scattered, the owner writes attn[b, heads of g] (global); "head":
        all-reduced into every CTA's ``sX`` (rounded to the dtype)."""
        cfg = self.cfg
        B, C, G, hd = cfg.batch, cfg.cluster_size, cfg.group, cfg.head_dim
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        sAll = self.gat_ml.gather(bufs_ml, sML, Int32(0))
        self.gbar.stamp(mBar, bidx, 8)
        # this CTA's weight of each (request, head), exp2(m - M) / L over the cluster's (m, l)
        # (merge_parts in rank order; its o sum is unused): once per (b, head) by one thread
        # (each o value's thread recomputing it cost the GQA merge 1.5 µs at clusters of 16)
        for bh in cutlass.range(tidx, B * G, cfg.num_threads, unroll=1):
            _, mx, lsum = merge_parts(C, lambda r: sAll[2 * bh, r], lambda r: Float32(0.0),
                                      lambda r: sAll[2 * bh + 1, r])
            wgt = Float32(0.0)
            if sML[2 * bh] != -Float32.inf:
                wgt = cute.math.exp2(sML[2 * bh] - mx, fastmath=True) / lsum
            sWgt[bh] = wgt
        cute.arch.barrier()
        self.gbar.stamp(mBar, bidx, 11)
        V = self.red_o.per_thread
        n_o = self.red_o.num_elems                  # values per round: B / o_rounds requests
        p0 = self.red_o.thread_offset(tidx)
        for k in cutlass.range_constexpr(self.o_rounds):
            frag = self.red_o.make_fragment()
            for v in cutlass.range_constexpr(V):
                p = k * n_o + p0 + v
                frag[v] = sO[p] * sWgt[p // hd]
            if const_expr(self.head):
                res = self.red_o.all_reduce(bufs_o, frag, Int32(k))
                self.gbar.stamp(mBar, bidx, 12)
                if tidx < self.red_o.active:
                    for v in cutlass.range_constexpr(V):
                        p = k * n_o + p0 + v
                        sX[p // (G * hd), p % (G * hd)] = self.dtype(res[v])
            else:
                res = self.red_o.reduce_scatter(bufs_o, frag, Int32(k))
                self.gbar.stamp(mBar, bidx, 12)
                if self.red_o.owns(tidx):
                    for v in cutlass.range_constexpr(V):
                        p = k * n_o + tidx * V + v
                        b = p // (G * hd)
                        mAttn[b, g * G * hd + p % (G * hd)] = self.dtype(res[v])
        self.gat_ml.release(bufs_ml, Int32(0))

    def _counters(self, mBar: cute.Tensor) -> cute.Tensor:
        """The ``counter_words`` int32 counters past the grid barrier's words: one per (rank,
        warp) row group with ``o_proj="head"``, one per KV head with ``flags``."""
        return cute.make_tensor(mBar.iterator + GridBarrier.state_words(self.cfg.grid, self.cfg.phase_timer),
                                cute.make_layout(self.cfg.counter_words))

    @cute.jit
    def _wait_heads(self, mBar: cute.Tensor, base: Int32, warp: Int32, lane: Int32):
        """``flags``: returns once every KV head whose attn columns fall in this warp's K slice of
        phase B counts ``base + C`` (each of its cluster's C CTAs wrote its slice this launch):
        lane i polls the slice's i-th head (acquire), then a warp barrier orders the polls before
        every lane's loads of x. All lanes call it, converged."""
        cfg = self.cfg
        GH = cfg.group * cfg.head_dim
        kw = cfg.o_k // (cfg.num_threads // _WARP)
        ctr = self._counters(mBar).iterator
        for gi in cutlass.range(warp * kw // GH + lane, ((warp + 1) * kw - 1) // GH + 1, _WARP, unroll=1):
            cur = cute.arch.load(ctr + gi, Int32, sem="acquire", scope="gpu")
            while cur - base < Int32(cfg.cluster_size):
                cur = cute.arch.load(ctr + gi, Int32, sem="acquire", scope="gpu")
        cute.arch.sync_warp()

    def _head_rows(self, rank: Int32, warp: Int32) -> list:
        """``o_proj="head"``: first rows of warp ``warp``'s W_o tiles in CTA ``rank`` (tiles past the
        CTA's share repeat its last tile; their results are not stored)."""
        cfg = self.cfg
        NW, TPC = cfg.num_threads // _WARP, cfg.head_tiles
        return [cutlass.min(rank * TPC + warp + j * NW, rank * TPC + (TPC - 1)) * 16
                for j in range((TPC + NW - 1) // NW)]

    @cute.jit
    def _o_proj_head(self, mWo: cute.Tensor, sX: cute.Tensor, mBar: cute.Tensor, mHidden: cute.Tensor,
                     mResidual: cute.Tensor, mOut: cute.Tensor, g: Int32, rank: Int32, warp: Int32, lane: Int32,
                     bidx: Int32, merge, sW):
        """``o_proj="head"``: warp w of CTA r multiplies tiles r*TPC + w, + NW, ... of W_o's rows by
        the K slice of KV head g (x = the merged output in ``sX``), stores the fp32 partials
        ``P[g, b, rows]`` in the workspace, and arrives on its (r, w) counter; the last of the
        ``kv_heads`` warps of that row group sums ``P[0..kv_heads-1]`` in head order, adds h
        and writes ``out``. ``merge`` runs after each warp's first W_o loads (``o_early_loads``),
        else before them."""
        cfg = self.cfg
        B, H, NKV, G, hd = cfg.batch, cfg.hidden, cfg.num_kv_heads, cfg.group, cfg.head_dim
        NW = cfg.num_threads // _WARP
        TPC = cfg.head_tiles
        cnt = (TPC + NW - 1) // NW
        kslice = G * hd
        front = merge if const_expr(cfg.o_early_loads) else None
        if const_expr(front is None):
            merge()
        t0 = rank * TPC + warp
        parts = cute.make_tensor(cute.recast_ptr(mBar.iterator + cfg.partials_offset, dtype=Float32),
                                 cute.make_layout((NKV, B, H), stride=(B * H, H, 1)))
        mine = cute.make_tensor(parts.iterator + g * B * H, cute.make_layout((B, H), stride=(H, 1)))

        def store(j, acc):                      # tile j's partial, as soon as it is complete
            if warp + j * NW < TPC:
                store_acc(acc, mine, (t0 + j * NW) * 16, lane, self.n_tiles, B)

        staged = {q + 1: (sW, (warp * self.stage + q) * 16) for q in range(self.stage)}
        warp_gemv_rows(mma_atom(self.dtype), mWo, self._head_rows(rank, warp), g * kslice, sX, lane, kslice // _STEP,
                       self.n_tiles, min(cfg.unroll, kslice // _STEP), front=front, done=store, staged=staged)
        self.gbar.stamp(mBar, bidx, 4)
        cute.arch.griddepcontrol_launch_dependents()     # PDL: the next launch may start its prologue
        counters = self._counters(mBar)
        if warp_last_arrival(counters, rank * NW + warp, NKV) != 0:
            dt = mOut.element_type
            # lane item = 4 consecutive rows of one request: 16-byte loads of every head's partial
            for it in cutlass.range(lane, cnt * B * 4, _WARP, unroll=1):
                j = it // (4 * B)
                b = (it // 4) % B
                if warp + j * NW < TPC:
                    row = (t0 + j * NW) * 16 + (it % 4) * 4
                    tot = cute.make_rmem_tensor(4, Float32)
                    tot.fill(0.0)
                    chunk = max(d for d in range(1, _TAIL_HEADS + 1) if NKV % d == 0)   # loads in flight
                    for h0 in cutlass.range(0, NKV, chunk, unroll=1):
                        for h in cutlass.range_constexpr(chunk):
                            tot.store(tot.load() + _rows4(parts, h0 + h, b, row))
                    for e in cutlass.range_constexpr(4):
                        hv = Float32(mHidden[b, row + e])
                        if const_expr(cfg.has_residual):
                            hv = hv + Float32(mResidual[b, row + e])
                        mOut[b, row + e] = dt(hv + tot[e])

    @cute.kernel
    def kernel(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mWqkv: cute.Tensor,
               mWo: cute.Tensor, mCos: cute.Tensor, mSin: cute.Tensor, mPos: cute.Tensor, mK: cute.Tensor,
               mV: cute.Tensor, mTable: cute.Tensor, mAttn: cute.Tensor, mHOut: cute.Tensor,
               mBar: cute.Tensor, mOut: cute.Tensor):
        cfg = self.cfg
        B, C, T, G, hd = cfg.batch, cfg.cluster_size, cfg.num_threads, cfg.group, cfg.head_dim
        R = cfg.qkv_config().rows
        NW = T // _WARP
        NG, TPT = self.attn.groups, self.attn.tpt
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        g = bidx // C

        smem = cutlass.memory.SmemAllocator()
        qb = self.front.allocate(smem)
        bufs_ml = self.gat_ml.allocate(smem)
        bufs_o = self.red_o.allocate(smem)
        sGM = smem.allocate_tensor(Float32, cute.make_layout((NG, G)), byte_alignment=16)
        sGL = smem.allocate_tensor(Float32, cute.make_layout((NG, G)), byte_alignment=16)
        sGO = smem.allocate_tensor(Float32, cute.make_layout((NG, G * hd)), byte_alignment=16)
        sTile = smem.allocate_tensor(Float32, cute.make_layout(self.attn.tile_elems), byte_alignment=16)
        sO = smem.allocate_tensor(Float32, cute.make_layout(B * G * hd), byte_alignment=16)
        sML = smem.allocate_tensor(Float32, cute.make_layout(self.ml_elems), byte_alignment=16)
        sWgt = smem.allocate_tensor(Float32, cute.make_layout(self.ml_elems // 2), byte_alignment=16)
        sRed = smem.allocate_tensor(Float32, cute.make_layout((NW, RED_WORDS_PER_ROW, B)), byte_alignment=16)
        sX = None
        sW = None
        sBase = None
        if const_expr(cfg.flags):
            sBase = smem.allocate_tensor(Int32, cute.make_layout(4), byte_alignment=16)
        if const_expr(self.stage > 0):
            sW = smem.allocate_tensor(self.dtype, tiled_layout(NW * self.stage * 16, G * hd), byte_alignment=128)
        if const_expr(self.head):
            sX = smem.allocate_tensor(self.dtype, x_smem_layout(self.n_tiles, G * hd), byte_alignment=16)
            for e in cutlass.range(tidx, (self.n_tiles * 8 - B) * G * hd, T, unroll=1):
                sX[B + e // (G * hd), e % (G * hd)] = self.dtype(0.0)     # the n-tile's rows past the batch
        self.front.init(qb)
        self.gat_ml.init(bufs_ml)
        self.red_o.init(bufs_o)
        cute.arch.cluster_arrive_relaxed()

        # ================= phase A: one cluster per KV head
        self.gbar.stamp(mBar, bidx, 0)
        self.front.project(qb, mHidden, mResidual, mNormW, mWqkv, mHOut, g,
                           stamp=lambda k: self.gbar.stamp(mBar, bidx, k))
        self.gbar.stamp(mBar, bidx, 1)
        sPart = qb.sPart
        self._rope_in_place(sPart, mCos, mSin, mPos)
        cute.arch.barrier()
        # KV append by the CTA whose KV range holds the new token
        for it in cutlass.range(tidx, B * hd, T, unroll=1):
            b = it // hd
            d = it % hd
            pos, start, end, chunk = self._token_range(mPos, b, rank)
            if pos // chunk == rank:
                self.front._cache_store(mK, mTable, b, pos, g, d, sPart[b * R + G * hd + d])
                self.front._cache_store(mV, mTable, b, pos, g, d, sPart[b * R + (G + 1) * hd + d])
        cute.arch.barrier()
        self.gbar.stamp(mBar, bidx, 6)
        if const_expr(cfg.flags):
            # every head counter holds the same count between launches; this cluster's own cannot
            # move before this CTA has sent its part of the merge (its peers count only after
            # theirs completes), so read it now
            if tidx == 0:
                sBase[0] = cute.arch.load(self._counters(mBar).iterator + g, Int32, sem="relaxed", scope="gpu")

        if const_expr(cfg.l2_prefetch and cfg.early_wo_prefetch):       # W_o rows, while attention runs
            prefetch_tiles_l2(mWo, bidx, cfg.grid, (cfg.hidden // 16 + cfg.grid - 1) // cfg.grid, warp,
                              lane)
        d8 = tidx % TPT
        for b in cutlass.range(B, unroll=1):
            pos, start, end, chunk = self._token_range(mPos, b, rank)
            if const_expr(self.attn.cfg.mma):        # q in sPart is scaled for exp2 already
                qa = self.attn.load_q_mma_smem(sPart, b * R, lane)
                self.attn.attend_mma(qa, 1.0, mK, mV, mTable, b, g, start, end, sGM, sGL, sGO)
                self.gbar.stamp(mBar, bidx, 7)
                self.attn.merge_stash(sGM, sGL, sGO, sTile)
            else:
                q = cute.make_rmem_tensor((G, 8), Float32)
                for h in cutlass.range_constexpr(G):
                    for j in cutlass.range_constexpr(8):
                        q[h, j] = sPart[b * R + h * hd + d8 * 8 + j]
                m, l, o = self.attn.new_state()
                self.attn.attend(mK, mV, mTable, b, g, start, end, q, m, l, o)
                self.gbar.stamp(mBar, bidx, 7)
                self.attn.merge_groups(m, l, o, sGM, sGL, sGO, sTile)
            for e in cutlass.range(tidx, G * hd, T, unroll=1):
                sO[b * G * hd + e] = sTile[e]
            for h in cutlass.range(tidx, G, T, unroll=1):
                sML[(b * G + h) * 2] = sTile[G * hd + h]
                sML[(b * G + h) * 2 + 1] = sTile[G * hd + G + h]
        if const_expr(self.stage > 0):       # W_o tiles 1..stage of this warp travel under the merge
            hrows = self._head_rows(rank, warp)
            for q in cutlass.range_constexpr(self.stage):
                stage_tile(mWo, hrows[q + 1], g * G * hd, sW, (warp * self.stage + q) * 16, lane, G * hd // _STEP)
            cute.arch.cp_async_commit_group()
        cute.arch.barrier()
        self.gbar.stamp(mBar, bidx, 2)
        if const_expr(cfg.l2_prefetch and not cfg.early_wo_prefetch and not self.head):   # W_o rows, under the merge
            prefetch_tiles_l2(mWo, bidx, cfg.grid, (cfg.hidden // 16 + cfg.grid - 1) // cfg.grid, warp,
                              lane)

        if const_expr(self.head):
            # ================= output projection per KV head: this cluster's merged output
            # times its K slice of W_o (the first W_o loads in flight under the merge), partials
            # combined across the clusters by the last warp of each row group to arrive
            def merge():
                self._merge(bufs_ml, bufs_o, sML, sWgt, sO, mAttn, sX, mBar, g)
                if const_expr(self.stage > 0):
                    cute.arch.cp_async_wait_group(0)       # this lane's staged W_o pieces
                cute.arch.cluster_arrive()      # this CTA's last DSMEM access; waited before exit
                cute.arch.barrier()             # sX is complete
                self.gbar.stamp(mBar, bidx, 3)

            self._o_proj_head(mWo, sX, mBar, mHidden, mResidual, mOut, g, rank, warp, lane, bidx, merge, sW)
            cute.arch.cluster_wait()
        else:
            self._merge(bufs_ml, bufs_o, sML, sWgt, sO, mAttn, sX, mBar, g)
            if const_expr(cfg.flags):
                # this CTA's last DSMEM access (the wait is before exit): its head counter need
                # not wait for the cluster's slowest CTA, the CTA barrier orders its attn writes
                # before thread 0's release-add
                cute.arch.cluster_arrive()
                cute.arch.barrier()
                if tidx == 0:
                    cute.arch.fence_acq_rel_gpu()
                    cute.arch.atomic_add(self._counters(mBar).iterator + g, Int32(1), sem="release", scope="gpu")
            else:
                cluster_sync()         # retires every collective of phase A
            self.gbar.stamp(mBar, bidx, 3)

            # ================= grid barrier: all of attn is written (early_phase_b: once phase B's
            # first block of W loads is issued); the next kernel may start its prologue.
            # flags: this CTA's slice of attn is counted on its head's counter, and each warp
            # waits for the heads of its own K slice only, after its first block of W loads
            def barrier():
                if const_expr(cfg.flags):
                    self._wait_heads(mBar, sBase[0], warp, lane)
                    cute.arch.griddepcontrol_launch_dependents()
                    self.gbar.stamp(mBar, bidx, 4)
                else:
                    self.gbar.sync_then_trigger(mBar, bidx, 4)

            # ================= phase B: output projection rows, full K, + h
            MT = cfg.hidden // 16
            residual_gemv_tiles(mWo, mAttn, mHidden, mResidual, mOut, sRed, bidx, cfg.grid,
                                (MT + cfg.grid - 1) // cfg.grid, B, NW, cfg.unroll, cfg.has_residual,
                                front=barrier, early_front=cfg.early_phase_b or cfg.flags, pipelined=cfg.flags)
            if const_expr(cfg.flags):
                cute.arch.cluster_wait()
        self.gbar.stamp(mBar, bidx, 5)
