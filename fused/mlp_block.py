"""The MLP half of a Llama decoder layer at decode time in one launch.

    out = h + W_down (silu(W_gate x) * (W_up x)),   x = rmsnorm(h),  h = hidden (+ residual)

Weights: ``w_gate_up [2I, H]`` is ``torch.cat([w_gate, w_up])`` (vLLM's merged
layout, nn.Linear rows) and ``w_down [H, I]`` as given, both in nn.Linear order
(``w_layout="linear"``) or both in the GEMV core's tiled order (``"tiled"``,
``cf_cute.tiles.tile_weight``; faster to stream, see ``mma_gemv``). Grid: ``num_clusters``
clusters of C CTAs, all resident at once (the host checks; the grid barrier
needs it). The intermediate rows come in *units* of 16 (unit u: gate rows
16u.. and up rows I + 16u..); cluster c owns units c, c + NC, c + 2 NC, ...::

  phase A, cluster c, CTA rank r (hidden slice k0 = r*H/C, H/C wide):
    NormSlice            x slice = rmsnorm(h) -> sX (sums of squares all-reduced)
    passes               warp w = (tile slot t, K part kp): w = t * KP + kp; a pass
                         covers NW / (2 KP) units, slot t -> unit t // 2, gate/up t % 2;
                         the warp multiplies its 16 rows x (H/C)/KP columns of the
                         unit's tile (tensor cores) -> sAcc[kp, j, b, row, gate|up]
    sum over kp          (fixed order) -> the fragment of ClusterReduce.reduce_scatter
                         over the cluster (split K: every CTA holds a partial of every
                         unit); rounds of Jr units when the whole does not fit
    SiLU                 the owner of each (gate, up) pair (adjacent in the fragment)
                         writes act[b, 16u + row] = round(silu(g) * up)   (global, L2)
  tail (``tail_pieces`` P > 0, when units % NC leaves R units past the last full
  round): cluster c owns units c, c + NC, ... of the first (units // NC) * NC only; the
  R tail units are cut in K into P pieces (piece p: the p-th 1/P of every warp's K
  range, in every CTA), dealt to the UP tile-pair slots of every cluster
  (piece q -> cluster q % NC, slot q // NC), and computed first:
    tail pass            one tile a warp, K/P of its range -> sum over kp -> this CTA's
                         partial (fp32) -> mState parts[q, rank]; one release-add to
                         mState counter[unit] a slot
    combine              the CTA (rank 0) of cluster tu % NC for tail unit tu, once its own
                         passes are done: waits for counter == P * C (acquire;
                         the pieces were published at the start of phase A), resets it, and
                         loads the P * C partials into registers *before* the reduce-scatter
                         (their L2 latency runs under it); after it, sums them (piece, then
                         rank order, through sAcc) and writes act
  GridBarrier            all of act is written and visible (W_down's first tiles were
                         asked of L2 just before)
  phase B                residual_gemv_tiles: 16-row tiles of W_down over the CTAs, K = I
                         split over the warps, x = act from L2, + h -> out

Shared memory: NormSlice (``sX``, 2 B x ceil(B/8)*8 x (H/C + 32)), ``sAcc``
(``4 * KP * J * B * 32``, J = units per cluster), the reduce-scatter buffers,
``sRed [NW, 16, B]``. Global state (``mState``, int32, zeroed once, self-resetting):
the grid barrier's words, then (tail) R counters and the partials
``[R * P, C, B * 32]`` (fp32 bits). Deterministic: fixed-order sums (K parts, rank
order in the collective, piece then rank order in the tail, warp order in phase B);
integer atomics only, for synchronisation (grid barrier, tail counters).
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import GridBarrier, cluster_sync
from cf_cute.primitives.plan import check_smem

from .paired_splitk import PairedGrid, paired_reduce, reduce_pairs
from .mma_gemv import (check_weight_layout, mma_atom, new_acc, prefetch_rows_l2, store_acc, warp_gemv_each,
                       warp_gemv_tile, warp_gemv_tiles, weight_view)
from .residual_gemv import RED_WORDS_PER_ROW, prefetch_tiles_l2, residual_gemv_tiles
from .rmsnorm_slice import NormSlice, NormSliceConfig

__all__ = ["MLPBlockConfig", "MLPBlock"]

_WARP = 32
_STEP = 32
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class MLPBlockConfig(PairedGrid):
    batch: int
    hidden: int
    intermediate: int
    num_clusters: int             # clusters in the grid; all must be resident at once
    cluster_size: int = 2
    eps: float = 1e-5
    has_residual: bool = False
    dtype: str = "bfloat16"
    num_threads: int = 256
    unroll: int = 8               # MMA steps of weight loads in flight per warp
    k_parts: int = 2              # warps sharing one tile's K slice in phase A
    l2_prefetch: bool = False     # ask L2 for the first gate/up tile and W_down's first tile early (slower on the
                                  # H200: Llama-2-7B batch 1 82.1 -> 76.4 µs without, batch 16 88.6 -> 83.1)
    pipeline: bool = True         # a warp's phase-A tiles as one load pipeline (no cold start per tile)
    shared_x: bool = False        # phase B: the CTA's W_down tiles in lock-step (act read once, tile 2 from HBM early)
    pdl: bool = False             # launch as a programmatic dependent of the previous kernel (no gain measured)
    early_loads: bool = False     # phase A's first block of W loads issued before the norm front
    early_phase_b: bool = False   # phase B's first block of W_down loads issued before the grid barrier (H200,
                                  # session 13: level; Llama-2-7B batch 1 73.6 vs 74.5 µs, batch 16 83.1 vs
                                  # 83.5; Llama-3-8B 97.2 vs 97.6, batch 16 103.2 vs 101.3)
    w_layout: str = "linear"      # memory order of W_gate_up and W_down (mma_gemv.WEIGHT_LAYOUTS)
    tail_pieces: int = 0          # P > 0: the units past the last full round split in K into P pieces
                                  # over all clusters (module docstring); 0: the busiest clusters take them
    phase_timer: bool = False     # diagnostics: GridBarrier stamps into mBar (0 start, 1 norm done, 2 gate/up
                                  # GEMV done, 3 reduce + SiLU done, 4 grid barrier passed, 5 end)

    @property
    def phase_b_unroll(self) -> int:
        """Lock-step tiles hold W of every tile in registers: a shallower block keeps
        the bytes in flight per warp about the same."""
        return max(2, self.unroll // 2) if self.shared_x else self.unroll

    @property
    def units(self) -> int:
        return self.intermediate // 16

    @property
    def slice(self) -> int:
        return self.hidden // self.cluster_size

    @property
    def units_per_cluster(self) -> int:
        """J: unit slots of every cluster's own passes (with a tail: the full rounds only)."""
        if self.tail_pieces:
            return self.units // self.num_clusters
        return PairedGrid.units_per_cluster.fget(self)

    @property
    def tail_units(self) -> int:
        return self.units % self.num_clusters if self.tail_pieces else 0

    @property
    def state_words(self) -> int:
        """int32 words of ``mState``: the grid barrier's, then the tail's counters and partials."""
        words = GridBarrier.state_words(self.grid, self.phase_timer)
        if self.tail_pieces:
            words += self.tail_units + self.tail_units * self.tail_pieces * self.cluster_size * self.batch * 32
        return words

    @property
    def n_tiles(self) -> int:
        return (self.batch + 7) // 8

    def validate(self) -> None:
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float16', got {self.dtype!r}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be 1..16, got {self.batch}")
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {self.unroll}")
        if self.cluster_size not in (1, 2, 4, 8, 16):
            raise ValueError(f"cluster_size must be 1, 2, 4, 8 or 16, got {self.cluster_size}")
        if self.num_threads % _WARP or not 64 <= self.num_threads <= 1024:
            raise ValueError(f"num_threads must be a multiple of 32 in 64..1024, got {self.num_threads}")
        if self.k_parts < 1 or self.num_warps % (2 * self.k_parts):
            raise ValueError(f"k_parts = {self.k_parts}: the {self.num_warps} warps must split into gate/up "
                             f"pairs of k_parts warps each")
        if self.intermediate % 16 or self.intermediate <= 0:
            raise ValueError(f"intermediate_size = {self.intermediate} must be a positive multiple of 16")
        step = self.cluster_size * self.k_parts * _STEP
        if self.hidden % step:
            raise ValueError(f"hidden = {self.hidden} must be a multiple of cluster_size * k_parts * {_STEP} = "
                             f"{step}: use a smaller cluster or fewer k_parts")
        if self.hidden % 16:
            raise ValueError(f"hidden = {self.hidden} must be a multiple of 16")
        if self.intermediate % (self.num_warps * _STEP):
            raise ValueError(f"intermediate_size = {self.intermediate} must be a multiple of "
                             f"{self.num_warps * _STEP} (the down projection's K is split over "
                             f"{self.num_warps} warps)")
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be positive, got {self.num_clusters}")
        check_weight_layout(self.w_layout)
        if self.tail_pieces:
            P, jf, R = self.tail_pieces, self.units_per_cluster, self.tail_units
            kw = self.hidden // self.cluster_size // self.k_parts
            if P & (P - 1) or R == 0 or jf < 1 or jf % self.units_per_pass or R * P > self.num_clusters * \
                    self.units_per_pass or kw % (_STEP * P):
                raise ValueError(f"tail_pieces = {P} does not fit {self.units} units over {self.num_clusters} "
                                 f"clusters ({jf} full rounds, a multiple of {self.units_per_pass} needed; {R} "
                                 f"tail units x {P} pieces over {self.num_clusters * self.units_per_pass} slots; "
                                 f"a warp's K range {kw} in pieces of whole {_STEP}-steps)")


class MLPBlock:
    def __init__(self, cfg: MLPBlockConfig):
        cfg.validate()
        self.cfg = cfg
        self.dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
        B, C, T, NW = cfg.batch, cfg.cluster_size, cfg.num_threads, cfg.num_warps
        J = cfg.units_per_cluster
        self.norm = NormSlice(NormSliceConfig(batch=B, hidden=cfg.hidden, cluster_size=C, num_threads=T,
                                              eps=cfg.eps, has_residual=cfg.has_residual, dtype=cfg.dtype))
        self.gbar = GridBarrier(cfg.grid, stamps=cfg.phase_timer)
        per_unit = B * 32
        if cfg.tail_pieces:             # the tail combine passes its partials through sAcc after the reduce
            mu = self._tail_slots
            if mu * cfg.tail_pieces * C > cfg.k_parts * J:
                raise ValueError(f"MLPBlock: {mu} tail units a cluster x {cfg.tail_pieces} pieces x {C} ranks do "
                                 f"not fit the {cfg.k_parts} x {J} partial slots: use fewer tail_pieces")
        fixed = (self.norm.smem_bytes + 4 * cfg.k_parts * J * per_unit + 4 * NW * RED_WORDS_PER_ROW * B
                 + 3 * 16)
        # reduce-scatter in `rounds` rounds of Jr units (the last may run past J: those units
        # are beyond every cluster's range and skipped); each owner must hold whole (gate, up) pairs
        plan = paired_reduce(J, per_unit, C, T, fixed)
        if plan is None:
            raise ValueError(f"MLPBlock(batch {B}, hidden {cfg.hidden}, intermediate {cfg.intermediate}, "
                             f"{cfg.num_clusters} clusters of {C}) does not fit in shared memory: "
                             f"use more clusters or fewer k_parts")
        self.red, self.rounds, self.units_per_round = plan
        self.smem_bytes = fixed + self.red.smem_bytes
        check_smem(f"MLPBlock(batch {B}, {cfg.num_clusters} clusters of {C})", self.smem_bytes)

    @cute.jit
    def __call__(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mWgu: cute.Tensor,
                 mWd: cute.Tensor, mAct: cute.Tensor, mBar: cute.Tensor, mOut: cute.Tensor, stream):
        mWgu = weight_view(mWgu, self.cfg.w_layout)
        mWd = weight_view(mWd, self.cfg.w_layout)
        self.kernel(mHidden, mResidual, mNormW, mWgu, mWd, mAct, mBar, mOut).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream, preferred_smem_carveout=100,
            use_pdl=self.cfg.pdl)

    @cute.jit
    def _tile_row(self, c: Int32, j, t):
        """First W_gate_up row of unit slot j, tile t (0 gate, 1 up) of cluster c;
        units past the end map to the last unit (computed, then skipped)."""
        cfg = self.cfg
        uc = cutlass.min(c + j * cfg.num_clusters, Int32(cfg.units - 1))
        return uc * 16 + (t % 2) * cfg.intermediate

    @cute.jit
    def _store_part(self, sAcc: cute.Tensor, acc: cute.Tensor, kp: Int32, j, t: Int32, lane: Int32):
        """This warp's partial of unit slot j, tile t -> sAcc[kp, j, b, row, t % 2]."""
        cfg = self.cfg
        per_unit = cfg.batch * 32
        dst = cute.make_tensor(sAcc.iterator + kp * (cfg.units_per_cluster * per_unit) + j * per_unit + t % 2,
                               cute.make_layout((cfg.batch, 16), stride=(32, 2)))
        store_acc(acc, dst, Int32(0), lane, cfg.n_tiles, cfg.batch)

    @cute.jit
    def _tail_tile(self, c: Int32, t: Int32, rank: Int32, kp: Int32):
        """(first W_gate_up row, first column, K offset in the CTA's slice) of this warp's
        tail piece: slot t // 2 of cluster c, gate or up by t % 2 (pieces past the end
        repeat the last one; its partial is dropped)."""
        cfg = self.cfg
        P, NC = cfg.tail_pieces, cfg.num_clusters
        kw = cfg.slice // cfg.k_parts
        q = cutlass.min(c + (t // 2) * NC, Int32(cfg.tail_units * P - 1))
        u = cfg.units_per_cluster * NC + q // P
        kofs = kp * kw + (q % P) * (kw // P)
        return u * 16 + (t % 2) * cfg.intermediate, rank * cfg.slice + kofs, kofs

    @cute.jit
    def _tail_state(self, mState: cute.Tensor):
        """(the tail units' counters, their partials ``[R * P * C * B * 32]`` as fp32) in ``mState``,
        past the grid barrier's words."""
        cfg = self.cfg
        counters = mState.iterator + GridBarrier.state_words(cfg.grid, cfg.phase_timer)
        parts = cute.make_tensor(cute.recast_ptr(counters + cfg.tail_units, dtype=Float32),
                                 cute.make_layout(cfg.tail_units * cfg.tail_pieces * cfg.cluster_size * cfg.batch * 32))
        return counters, parts

    @cute.jit
    def _tail_publish(self, sAcc: cute.Tensor, mState: cute.Tensor, c: Int32, rank: Int32, tidx: Int32):
        """This CTA's tail partials (sum over K parts) -> parts[q, rank]; then one
        release-add to the unit's counter per slot (thread 0, after a CTA barrier)."""
        cfg = self.cfg
        P, NC, C, KP, UP = cfg.tail_pieces, cfg.num_clusters, cfg.cluster_size, cfg.k_parts, cfg.units_per_pass
        per_unit = cfg.batch * 32
        counters, parts = self._tail_state(mState)
        for pos in cutlass.range(tidx, UP * per_unit, cfg.num_threads, unroll=1):
            q = c + (pos // per_unit) * NC
            if q < cfg.tail_units * P:
                tot = Float32(0.0)
                for k in cutlass.range_constexpr(KP):
                    tot = tot + sAcc[k, pos]
                parts[(q * C + rank) * per_unit + pos % per_unit] = tot
        cute.arch.barrier()
        if tidx == 0:
            cute.arch.fence_acq_rel_gpu()
            for s in cutlass.range_constexpr(UP):
                q = c + s * NC
                if q < cfg.tail_units * P:
                    cute.arch.atomic_add(counters + q // P, Int32(1), sem="release", scope="gpu")

    @property
    def _tail_slots(self) -> int:
        """MU: tail units a cluster combines (unit tu by cluster tu % NC)."""
        return -(-self.cfg.tail_units // self.cfg.num_clusters)

    @property
    def _tail_items(self) -> int:
        """(piece, rank, request, row) items of one tail unit a thread loads (gate and up each)."""
        cfg = self.cfg
        return -(-(cfg.tail_pieces * cfg.cluster_size * cfg.batch * 16) // cfg.num_threads)

    @cute.jit
    def _tail_unit(self, c: Int32, slot: cutlass.Constexpr[int]) -> Int32:
        """The ``slot``-th tail unit cluster c combines (c + slot * NC), or -1. In closed form:
        a static branch per tail unit costs an instruction-cache miss each (H200: 28 of
        them took 3-7 µs), a dynamic search loop 0.5 µs (docs/NOTES.md)."""
        tu = c + slot * self.cfg.num_clusters
        found = Int32(-1)
        if tu < self.cfg.tail_units:
            found = tu
        return found

    @cute.jit
    def _tail_fetch(self, mState: cute.Tensor, c: Int32, rank: Int32, tidx: Int32) -> cute.Tensor:
        """Before the reduce-scatter, in the CTA (rank 0) of cluster tu % NC for each tail
        unit tu: wait for all P * C partials of its units (published at the start of
        phase A, so one acquire load each), reset the counters, and load the partials
        into registers, ``held[slot, item, gate|up]`` (item = tidx + i * T over
        ``(piece, rank, request, row)``): their latency runs under the reduce."""
        cfg = self.cfg
        P, C, B, T = cfg.tail_pieces, cfg.cluster_size, cfg.batch, cfg.num_threads
        per_unit = B * 32
        NI = self._tail_items
        counters, parts = self._tail_state(mState)
        held = cute.make_rmem_tensor((self._tail_slots, NI, 2), Float32)
        if rank == 0:
            for slot in cutlass.range_constexpr(self._tail_slots):
                tu = self._tail_unit(c, slot)
                if tu >= 0:
                    if tidx == 0:
                        cnt = counters + tu
                        seen = cute.arch.load(cnt, Int32, sem="acquire", scope="gpu")
                        while seen != Int32(P * C):
                            seen = cute.arch.load(cnt, Int32, sem="acquire", scope="gpu")
                        cute.arch.store(cnt, Int32(0), sem="relaxed", scope="gpu")
                    cute.arch.barrier()
                    for i in cutlass.range_constexpr(NI):
                        e = tidx + i * T
                        if e < P * C * B * 16:
                            pr = e // (B * 16)                      # piece * C + rank
                            o = (tu * P * C + pr) * per_unit + (e % (B * 16)) // 16 * 32 + 2 * (e % 16)
                            held[slot, i, 0] = parts[o]
                            held[slot, i, 1] = parts[o + 1]
        return held

    @cute.jit
    def _tail_finish(self, held: cute.Tensor, sT: cute.Tensor, mAct: cute.Tensor, c: Int32, rank: Int32,
                     tidx: Int32):
        """After the reduce-scatter (``sT``: free shared memory of ``MU * P * C * B * 32``
        fp32): the combining CTA passes ``held`` through ``sT`` and writes
        act = silu(sum gate) * sum up, summed in piece, then rank order."""
        cfg = self.cfg
        P, C, B, T, NC = cfg.tail_pieces, cfg.cluster_size, cfg.batch, cfg.num_threads, cfg.num_clusters
        NI = self._tail_items
        if rank == 0:
            for slot in cutlass.range_constexpr(self._tail_slots):
                tu = self._tail_unit(c, slot)
                if tu >= 0:
                    for i in cutlass.range_constexpr(NI):
                        e = tidx + i * T
                        if e < P * C * B * 16:
                            sT[(slot * P * C * B * 16 + e) * 2] = held[slot, i, 0]
                            sT[(slot * P * C * B * 16 + e) * 2 + 1] = held[slot, i, 1]
                    cute.arch.barrier()
                    u = cfg.units_per_cluster * NC + tu
                    for e in cutlass.range(tidx, 16 * B, T, unroll=1):
                        g = Float32(0.0)
                        up = Float32(0.0)
                        for pr in cutlass.range_constexpr(P * C):
                            o = (slot * P * C * B * 16 + pr * B * 16 + e) * 2
                            g = g + sT[o]
                            up = up + sT[o + 1]
                        self._act_store(g, up, e // 16, u, e % 16, mAct)

    @cute.jit
    def _act_store(self, g: Float32, up: Float32, b: Int32, u: Int32, row: Int32, mAct: cute.Tensor):
        """act[b, 16 u + row] = silu(g) * up (rounded to the activation dtype)."""
        # g * 1/(1 + e^-g) through rcp.approx: an IEEE divide here adds a slow-path
        # subroutine (and stack) to a kernel at 255 registers (docs/NOTES.md)
        silu = g * cute.arch.rcp_approx(Float32(1.0) + cute.math.exp2(-g * Float32(_LOG2E), fastmath=True))
        mAct[b, u * 16 + row] = self.dtype(silu * up)

    @cute.jit
    def _silu_mul(self, pos: Int32, g: Float32, up: Float32, c: Int32, mAct: cute.Tensor):
        """The owner of fragment pair ``pos`` (gate g, up) of cluster c writes act = silu(g) * up."""
        cfg = self.cfg
        per_unit = cfg.batch * 32
        j = pos // per_unit
        b = (pos % per_unit) // 32
        row = (pos % 32) // 2
        u = c + j * cfg.num_clusters
        if u < cfg.units and j < cfg.units_per_cluster:
            self._act_store(g, up, b, u, row, mAct)

    @cute.kernel
    def kernel(self, mHidden: cute.Tensor, mResidual: cute.Tensor, mNormW: cute.Tensor, mWgu: cute.Tensor,
               mWd: cute.Tensor, mAct: cute.Tensor, mBar: cute.Tensor, mOut: cute.Tensor):
        cfg = self.cfg
        B, C, T, NW, KP = cfg.batch, cfg.cluster_size, cfg.num_threads, cfg.num_warps, cfg.k_parts
        J, UP, Hc = cfg.units_per_cluster, cfg.units_per_pass, cfg.slice
        per_unit = B * 32
        tidx = cute.arch.thread_idx()[0]
        lane = cute.arch.lane_idx()
        warp = cute.arch.warp_idx()
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        c = bidx // C

        smem = cutlass.memory.SmemAllocator()
        nb = self.norm.allocate(smem)
        rb = self.red.allocate(smem)
        sAcc = smem.allocate_tensor(Float32, cute.make_layout((KP, J * per_unit), stride=(J * per_unit, 1)),
                                    byte_alignment=16)
        sRed = smem.allocate_tensor(Float32, cute.make_layout((NW, RED_WORDS_PER_ROW, B)), byte_alignment=16)
        self.norm.init(nb)
        self.red.init(rb)
        cute.arch.cluster_arrive_relaxed()

        # ================= phase A
        self.gbar.stamp(mBar, bidx, 0)
        kp = warp % KP
        t = warp // KP                       # tile slot of this warp in a pass
        kw = Hc // KP
        k0 = rank * Hc + kp * kw
        if const_expr(cfg.tail_pieces > 0):
            trow, tk0, tofs = self._tail_tile(c, t, rank, kp)
        if const_expr(cfg.l2_prefetch):
            prefetch_rows_l2(mWgu, self._tile_row(c, t // 2, t), 16, k0, kw, lane)
            if const_expr(cfg.tail_pieces > 0):
                prefetch_rows_l2(mWgu, trow, 16, tk0, kw // cfg.tail_pieces, lane)

        def front():
            self.norm(nb, mHidden, mResidual, mNormW, mOut, Int32(0) != Int32(0))
            self.gbar.stamp(mBar, bidx, 1)

        # early_loads: the first block of W loads is issued before the norm and lands under it
        early = front if const_expr(cfg.early_loads) else None
        if const_expr(not cfg.early_loads):
            front()
        sX = nb.sX
        atom = mma_atom(mWgu.element_type)
        if const_expr(cfg.tail_pieces > 0):
            # the tail pieces first: their partials are published while the own passes run
            tacc = new_acc(cfg.n_tiles)
            warp_gemv_tile(atom, mWgu, trow, tk0, cute.make_tensor(sX.iterator + tofs, sX.layout), tacc, lane,
                           kw // cfg.tail_pieces // _STEP, cfg.n_tiles, cfg.unroll, front=early)
            early = None
            self._store_part(sAcc, tacc, kp, t // 2, t, lane)
            cute.arch.barrier()
            self._tail_publish(sAcc, mBar, c, rank, tidx)
            cute.arch.barrier()                  # sAcc is free again
        sXk = cute.make_tensor(sX.iterator + kp * kw, sX.layout)       # column 0 = this warp's k0
        if const_expr(cfg.pipeline):
            # this warp's tiles: unit j = p * UP + t // 2 (p < J / UP), gate or up by t % 2
            accs = warp_gemv_tiles(atom, mWgu, c + (t // 2) * cfg.num_clusters + (t % 2) * cfg.units,
                                   UP * cfg.num_clusters, 2 * cfg.units, J // UP, k0, sXk, lane, kw // _STEP,
                                   cfg.n_tiles, cfg.unroll, front=early)
            for p in cutlass.range_constexpr(J // UP):
                self._store_part(sAcc, accs[None, None, p], kp, p * UP + t // 2, t, lane)
        else:
            warp_gemv_each(atom, mWgu, J // UP, lambda p: self._tile_row(c, p * UP + t // 2, t),
                           lambda acc, p: self._store_part(sAcc, acc, kp, p * UP + t // 2, t, lane),
                           k0, sXk, lane, kw // _STEP, cfg.n_tiles, cfg.unroll, front=early)
        if const_expr(cfg.l2_prefetch):      # W_down's first tile of this CTA, while the reduce runs
            prefetch_tiles_l2(mWd, bidx, cfg.grid, 1, warp, lane)
        cute.arch.barrier()
        self.gbar.stamp(mBar, bidx, 2)
        held = None
        if const_expr(cfg.tail_pieces > 0):  # the tail units this CTA combines: partials in flight now
            held = self._tail_fetch(mBar, c, rank, tidx)

        # ---- sum the K parts, reduce-scatter over the cluster, SiLU(gate) * up -> act
        reduce_pairs(self.red, rb, sAcc, self.rounds, KP, J * per_unit, tidx,
                     lambda pos, g, up: self._silu_mul(pos, g, up, c, mAct))
        cluster_sync()                       # retires both collectives
        if const_expr(cfg.tail_pieces > 0):  # sAcc is free: the combine's exchange
            self._tail_finish(held, cute.make_tensor(sAcc.iterator, cute.make_layout(cute.size(sAcc))), mAct, c,
                              rank, tidx)
        self.gbar.stamp(mBar, bidx, 3)

        # ================= grid barrier: all of act is written (early_phase_b: once phase B's
        # first block of W loads is issued); the next kernel may start its prologue
        def barrier():
            self.gbar.sync_then_trigger(mBar, bidx, 4)

        # ================= phase B: down projection rows, full K, + h
        MT = cfg.hidden // 16
        residual_gemv_tiles(mWd, mAct, mHidden, mResidual, mOut, sRed, bidx, cfg.grid,
                            (MT + cfg.grid - 1) // cfg.grid, B, NW,
                            cfg.phase_b_unroll, cfg.has_residual, cfg.shared_x,
                            front=barrier, early_front=cfg.early_phase_b)
        self.gbar.stamp(mBar, bidx, 5)
