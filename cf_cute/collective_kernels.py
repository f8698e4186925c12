"""Harness kernels around the cluster collectives: for tests and benchmarks.

Each kernel runs ``rounds`` rounds of one collective inside one launch, so
that correctness over many reuses of the same buffers and the in-kernel cost
per round (launch cost excluded) can both be measured.

Round ``r`` of CTA ``c`` (rank ``c`` in its cluster) contributes
``x[cta] + (r % 5) * (c + 1)`` (reduce) or ``x[cta] + r`` (gather), so data
from a wrong round or a wrong rank changes the result; the outputs
accumulate over rounds, in fp32, on integer-valued data, so results are
exact and compared bit for bit.

``GlobalExchangeKernel`` is the paper's baseline: the same all-reduce done by
writing partials to global memory, a cluster barrier, and reading back.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cf_cute.primitives import ClusterGather, ClusterReduce, GridBarrier, cluster_sync, last_arrival, warp_last_arrival
from cf_cute.primitives.plan import check_grid, plan_fragment

__all__ = [
    "ReduceHarnessConfig",
    "ReduceHarnessKernel",
    "GatherHarnessConfig",
    "GatherHarnessKernel",
    "GlobalExchangeConfig",
    "GlobalExchangeKernel",
    "GridBarrierHarnessConfig",
    "GridBarrierHarnessKernel",
    "LastArrivalHarnessConfig",
    "LastArrivalHarnessKernel",
    "LaunchProbeConfig",
    "LaunchProbeKernel",
]


@dataclass(frozen=True)
class ReduceHarnessConfig:
    num_elems: int
    cluster_size: int
    num_clusters: int = 2
    num_threads: int = 128
    op: str = "sum"
    algorithm: str = "auto"
    scatter: bool = False
    stages: int = 2
    transport: str = "auto"
    # warp 0 of rank 0 spins this many SM cycles before every round: skew between the
    # warps of a CTA, as real kernels have it (extra work for some threads between rounds)
    skew_cycles: int = 0

    @property
    def grid(self) -> int:
        return self.num_clusters * self.cluster_size


@cute.jit
def _spin(cycles: cutlass.Constexpr[int]):
    """Busy-wait about ``cycles`` SM clock cycles."""
    t = cute.arch.clock64()
    stop = t + cycles
    while t < stop:
        t = cute.arch.clock64()


class _RoundsHarness:
    """Host side shared by the harnesses: ``kernel(mX, mOut, rounds)`` over
    ``cfg.grid`` CTAs in clusters of ``cfg.cluster_size``."""

    @cute.jit
    def __call__(self, mX: cute.Tensor, mOut: cute.Tensor, rounds: Int32, stream):
        self.kernel(mX, mOut, rounds).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream)


class ReduceHarnessKernel(_RoundsHarness):
    """``out[cta, t*V + v] = sum over rounds of the reduced value at position
    (t % active)*V + v`` (all-reduce), or only for owning threads (scatter);
    other entries of ``out`` are left untouched."""

    def __init__(self, cfg: ReduceHarnessConfig):
        self.cfg = cfg
        check_grid(cfg.grid, cfg.cluster_size)
        self.red = ClusterReduce(cfg.num_elems, cfg.cluster_size, cfg.num_threads, op=cfg.op,
                                 algorithm=cfg.algorithm, stages=cfg.stages, scatter=cfg.scatter,
                                 transport=cfg.transport)
        self.out_cols = cfg.num_threads * self.red.per_thread

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mOut: cute.Tensor, rounds: Int32):
        red = self.red
        V = red.per_thread
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        smem = cutlass.memory.SmemAllocator()
        bufs = red.allocate(smem)
        red.init(bufs)
        cute.arch.cluster_arrive_relaxed()
        # load this thread's inputs while the cluster barrier completes
        x = red.make_fragment()
        pos = red.thread_offset(tidx)
        for v in cutlass.range_constexpr(V):
            x[v] = mX[bidx, pos + v]
        acc = red.make_fragment()
        acc.fill(0.0)
        cute.arch.cluster_wait()
        frag = red.make_fragment()
        for r in cutlass.range(rounds, unroll=1):
            bump = Float32((r % 5) * (rank + 1))
            for v in cutlass.range_constexpr(V):
                frag[v] = x[v] + bump
            if const_expr(self.cfg.skew_cycles > 0):
                if rank == 0 and tidx < 32:
                    _spin(self.cfg.skew_cycles)
            if const_expr(self.cfg.scatter):
                res = self.red.reduce_scatter(bufs, frag, r)
            else:
                res = self.red.all_reduce(bufs, frag, r)
            for v in cutlass.range_constexpr(V):
                acc[v] = acc[v] + res[v]
        if const_expr(self.cfg.scatter):
            if red.owns(tidx):
                for v in cutlass.range_constexpr(V):
                    mOut[bidx, tidx * V + v] = acc[v]
        else:
            for v in cutlass.range_constexpr(V):
                mOut[bidx, tidx * V + v] = acc[v]
        red.teardown()


@dataclass(frozen=True)
class GlobalExchangeConfig:
    num_elems: int
    cluster_size: int
    num_clusters: int = 2
    num_threads: int = 128

    @property
    def grid(self) -> int:
        return self.num_clusters * self.cluster_size


class GlobalExchangeKernel:
    """All-reduce (sum) through global memory: each round every CTA writes its
    partial to row ``(cluster * 2 + r % 2) * C + rank`` of ``scratch``
    (16-byte stores), the cluster synchronises (``barrier.cluster``
    release/acquire), and every CTA reads the C partials back in rank order
    (16-byte loads). Double-buffering by round parity makes one cluster
    barrier per round sufficient. Same data, outputs and thread layout as the
    sum harness, so results compare 1:1."""

    def __init__(self, cfg: GlobalExchangeConfig):
        self.cfg = cfg
        check_grid(cfg.grid, cfg.cluster_size)
        self.frag = plan_fragment(cfg.num_elems, cfg.num_threads, cfg.cluster_size, split=False)
        if self.frag is None:
            raise ValueError(f"{cfg.num_elems} values cannot be laid over {cfg.num_threads} threads")
        self.per_thread = self.frag.per_thread
        self.out_cols = cfg.num_threads * self.per_thread

    @cute.jit
    def __call__(self, mX: cute.Tensor, mOut: cute.Tensor, mScratch: cute.Tensor, rounds: Int32, stream):
        self.kernel(mX, mOut, mScratch, rounds).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mOut: cute.Tensor, mScratch: cute.Tensor, rounds: Int32):
        f = self.frag
        V, A, W, C = f.per_thread, f.active, f.vec, self.cfg.cluster_size
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        cl = bidx // C
        lane = tidx % A
        x = cute.make_rmem_tensor(V, Float32)
        for v in cutlass.range_constexpr(V):
            x[v] = mX[bidx, lane * V + v]
        acc = cute.make_rmem_tensor(V, Float32)
        acc.fill(0.0)
        part = cute.make_rmem_tensor((1, W), Float32)
        for r in cutlass.range(rounds, unroll=1):
            bump = Float32((r % 5) * (rank + 1))
            row = (cl * 2 + r % 2) * C
            if tidx < A:
                for i in cutlass.range_constexpr(V // W):
                    for w in cutlass.range_constexpr(W):
                        part[0, w] = x[i * W + w] + bump
                    cute.autovec_copy(part, cute.local_tile(mScratch, (1, W), (row + rank, lane * (V // W) + i)))
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()
            for src in cutlass.range_constexpr(C):
                for i in cutlass.range_constexpr(V // W):
                    got = cute.local_tile(mScratch, (1, W), (row + src, lane * (V // W) + i)).load()
                    for w in cutlass.range_constexpr(W):
                        acc[i * W + w] = acc[i * W + w] + got[w]
        for v in cutlass.range_constexpr(V):
            mOut[bidx, tidx * V + v] = acc[v]


@dataclass(frozen=True)
class GatherHarnessConfig:
    tile_elems: int
    cluster_size: int
    dtype: str = "float32"        # float32 | bfloat16 | int32
    num_clusters: int = 2
    num_threads: int = 128
    stages: int | None = None
    from_registers: bool = False
    transport: str = "auto"
    check: bool = True            # accumulate every gathered value (tests) or touch one (bench)

    @property
    def grid(self) -> int:
        return self.num_clusters * self.cluster_size


_DTYPES = {"float32": cutlass.Float32, "bfloat16": cutlass.BFloat16, "int32": cutlass.Int32}


class GatherHarnessKernel(_RoundsHarness):
    """Round r: CTA c's tile is ``x[cta] + r``; after the gather every thread
    adds, for its elements e = t, t+T, ... and every rank j, the gathered
    ``tile_j[e]`` into ``out[cta, j, e]`` (fp32, same thread every round).
    Expected: ``out[cta, j, e] = R * x[cluster_base + j, e] + R(R-1)/2``."""

    def __init__(self, cfg: GatherHarnessConfig):
        self.cfg = cfg
        check_grid(cfg.grid, cfg.cluster_size)
        self.dtype = _DTYPES[cfg.dtype]
        self.gat = ClusterGather(self.dtype, cfg.tile_elems, cfg.cluster_size, cfg.num_threads,
                                 stages=cfg.stages, transport=cfg.transport)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mOut: cute.Tensor, rounds: Int32):
        cfg, gat = self.cfg, self.gat
        E, C, T = cfg.tile_elems, cfg.cluster_size, cfg.num_threads
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        smem = cutlass.memory.SmemAllocator()
        bufs = gat.allocate(smem)
        sTile = smem.allocate_tensor(self.dtype, cute.make_layout(E), byte_alignment=16)
        gat.init(bufs)
        cluster_sync()
        frag = gat.make_fragment()
        sink = Float32(0.0)
        for r in cutlass.range(rounds, unroll=1):
            if const_expr(self.cfg.from_registers):
                if tidx < self.gat.active:
                    for v in cutlass.range_constexpr(self.gat.per_thread):
                        frag[v] = self.dtype(Float32(mX[bidx, self.gat.element_index(tidx, v)]) + Float32(r))
                sAll = self.gat.gather_fragment(bufs, frag, r)
            else:
                for e in cutlass.range(tidx, E, T, unroll=1):
                    sTile[e] = self.dtype(Float32(mX[bidx, e]) + Float32(r))
                cute.arch.barrier(barrier_id=3, number_of_threads=T)
                sAll = self.gat.gather(bufs, sTile, r)
            if const_expr(self.cfg.check):
                for j in cutlass.range_constexpr(C):
                    for e in cutlass.range(tidx, E, T, unroll=1):
                        mOut[bidx, j, e] = mOut[bidx, j, e] + Float32(sAll[e, j])
            else:
                sink = sink + Float32(sAll[tidx % E, tidx % C])
            # the smem tile is rewritten next round: everyone has sent it (the
            # gather's full-barrier wait implies our own st.asyncs completed)
            self.gat.release(bufs, r)
        if const_expr(not self.cfg.check):
            if sink == Float32(-1.0e30):
                mOut[bidx, 0, 0] = sink
        gat.teardown()


@dataclass(frozen=True)
class GridBarrierHarnessConfig:
    num_ctas: int
    cluster_size: int = 1
    num_threads: int = 128


class GridBarrierHarnessKernel:
    """Round r: CTA c writes ``c * 7 + r`` to ``slots[r % 2, c]``, the grid
    synchronises, every CTA sums all N slots of that round and adds the sum to
    ``out[c]``. Expected: ``out[c] = sum_r (7 * N(N-1)/2 + N r)`` in every CTA;
    a missing or early barrier shows up as a wrong sum."""

    def __init__(self, cfg: GridBarrierHarnessConfig):
        self.cfg = cfg
        check_grid(cfg.num_ctas, cfg.cluster_size)
        self.bar = GridBarrier(cfg.num_ctas)

    @cute.jit
    def __call__(self, mSlots: cute.Tensor, mState: cute.Tensor, mOut: cute.Tensor, rounds: Int32, stream):
        self.kernel(mSlots, mState, mOut, rounds).launch(
            grid=[self.cfg.num_ctas, 1, 1], block=[self.cfg.num_threads, 1, 1],
            cluster=[self.cfg.cluster_size, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mSlots: cute.Tensor, mState: cute.Tensor, mOut: cute.Tensor, rounds: Int32):
        N, T = self.cfg.num_ctas, self.cfg.num_threads
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        acc = Int32(0)
        for r in cutlass.range(rounds, unroll=1):
            if tidx == 0:
                mSlots[r % 2, bidx] = bidx * 7 + r
            self.bar.sync(mState)
            part = Int32(0)
            for c in cutlass.range(tidx, N, T, unroll=1):
                part = part + mSlots[r % 2, c]
            acc = acc + part
        # per-thread partial sums -> one total per CTA, through shared memory
        smem = cutlass.memory.SmemAllocator()
        sAcc = smem.allocate_tensor(Int32, cute.make_layout(T), byte_alignment=16)
        sAcc[tidx] = acc
        cute.arch.barrier()
        if tidx == 0:
            tot = Int32(0)
            for t in cutlass.range(T, unroll=1):
                tot = tot + sAcc[t]
            mOut[bidx] = tot


@dataclass(frozen=True)
class LastArrivalHarnessConfig:
    groups: int
    members: int                  # CTAs a group; groups * members may exceed what is resident at once
    num_threads: int = 128
    per_warp: bool = False        # members are warps (warp_last_arrival): members % (num_threads / 32) == 0

    @property
    def width(self) -> int:
        """Values a member writes (its threads)."""
        return 32 if self.per_warp else self.num_threads

    @property
    def grid(self) -> int:
        return self.groups * self.members // (self.num_threads // 32 if self.per_warp else 1)


class LastArrivalHarnessKernel:
    """CTA (g, s) (``bidx = g * members + s``) copies ``x[g, s, :]`` to ``work[g, s, :]`` and
    arrives on ``count[g]``; the last of the group's CTAs writes ``out[g, t] = sum_s work[g, s,
    t]`` summed in member order (fp32) and ``last[g] = s``. Expected: ``out`` equal bit for bit
    to the in-order fp32 sum of ``x`` over members, whichever member arrived last, and every
    counter back at 0. ``per_warp``: the members are warps (warp w of the group's CTA c is member
    ``c * warps + w``, 32 values each) and arrive through ``warp_last_arrival``."""

    def __init__(self, cfg: LastArrivalHarnessConfig):
        if cfg.groups < 1 or cfg.members < 1:
            raise ValueError(f"groups and members must be positive, got {cfg.groups}, {cfg.members}")
        if cfg.per_warp and cfg.members % (cfg.num_threads // 32):
            raise ValueError(f"per_warp: members ({cfg.members}) must be a multiple of the "
                             f"{cfg.num_threads // 32} warps of a CTA")
        self.cfg = cfg

    @cute.jit
    def __call__(self, mX: cute.Tensor, mWork: cute.Tensor, mCount: cute.Tensor, mOut: cute.Tensor,
                 mLast: cute.Tensor, stream):
        self.kernel(mX, mWork, mCount, mOut, mLast).launch(
            grid=[self.cfg.grid, 1, 1], block=[self.cfg.num_threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mWork: cute.Tensor, mCount: cute.Tensor, mOut: cute.Tensor,
               mLast: cute.Tensor):
        S = self.cfg.members
        bidx = cute.arch.block_idx()[0]
        if const_expr(self.cfg.per_warp):       # member = warp, value t = its lane
            NW = self.cfg.num_threads // 32
            t = cute.arch.lane_idx()
            g = bidx // (S // NW)
            s = (bidx % (S // NW)) * NW + cute.arch.warp_idx()
            mWork[g, s, t] = mX[g, s, t]
            last = warp_last_arrival(mCount, g, S)
        else:                                   # member = CTA, value t = its thread
            t = cute.arch.thread_idx()[0]
            g = bidx // S
            s = bidx % S
            smem = cutlass.memory.SmemAllocator()
            sFlag = smem.allocate_tensor(Int32, cute.make_layout(1), byte_alignment=16)
            mWork[g, s, t] = mX[g, s, t]
            last = last_arrival(mCount, g, S, sFlag)
        if last == Int32(1):
            acc = Float32(0.0)
            for m in cutlass.range(S, unroll=1):
                acc = acc + mWork[g, m, t]
            mOut[g, t] = acc
            if t == 0:
                mLast[g] = s


@dataclass(frozen=True)
class LaunchProbeConfig:
    num_ctas: int
    cluster_size: int = 1
    num_threads: int = 256
    cluster_sync: bool = False    # a cluster barrier at the start and one at the end (what a cluster
                                  # collective's set-up and teardown add to a launch)


class LaunchProbeKernel:
    """An empty launch: thread 0 of CTA c writes ``out[c] = c`` (and, with ``cluster_sync``,
    the CTAs of a cluster meet at a cluster barrier before and after). What a launch of this
    grid costs before any work, for ``benchmarks/bench_launch.py``."""

    def __init__(self, cfg: LaunchProbeConfig):
        check_grid(cfg.num_ctas, cfg.cluster_size)
        self.cfg = cfg

    @cute.jit
    def __call__(self, mOut: cute.Tensor, stream):
        self.kernel(mOut).launch(grid=[self.cfg.num_ctas, 1, 1], block=[self.cfg.num_threads, 1, 1],
                                 cluster=[self.cfg.cluster_size, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mOut: cute.Tensor):
        tidx = cute.arch.thread_idx()[0]
        bidx = cute.arch.block_idx()[0]
        if const_expr(self.cfg.cluster_sync):
            cluster_sync()
        if tidx == 0:
            mOut[bidx] = bidx
        if const_expr(self.cfg.cluster_sync):
            cluster_sync()
