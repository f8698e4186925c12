"""ClusterReduce: all-reduce and reduce-scatter of fp32 fragments over DSMEM.

Each CTA of a cluster of ``C`` CTAs holds a fragment of ``N`` fp32 values,
spread over its first ``T`` threads (thread ``t`` holds values
``[t*V, (t+1)*V)``; see ``primitives.plan``). After ``all_reduce`` every
CTA holds the element-wise reduction over the cluster; after
``reduce_scatter`` CTA ``r`` holds the reduced values of slice ``r``
(``[r*N/C, (r+1)*N/C)``), in the threads that held those positions before.
Data moves only through distributed shared memory: ``st.async`` from
registers into the peer's receive buffer, completing on the peer's mbarrier.

Determinism: every CTA sums the contributions in rank order 0..C-1, so the
result is bitwise identical in every CTA and from run to run. No atomics.

Algorithms (``plan.algorithm``):

``direct``  one exchange. Every active thread sends its V values into
            slot ``my_rank`` of every peer and stores them into its own
            CTA's slot ``my_rank``; every thread then folds the C slots in
            rank order. Latency: one DSMEM hop.
            Receive bytes per stage: C * N * 4.
``split``   reduce-scatter then all-gather. Thread t sends its values only
            to the owner of its slice (CTA ``t // (A/C)``); the owner folds
            C slots and st.asyncs the reduced slice to every CTA. Two hops,
            but each CTA sends 2N(C-1)/C values instead of N(C-1): the choice
            for large fragments and large clusters.
            Receive bytes per stage: 2 * N * 4.

Transports (``plan.transport``): ``st_async`` (the default) -- each thread
st.asyncs its values from registers (one mbarrier transaction update per 16
bytes; measured faster than bulk at every size up to 16 KB per CTA on H100);
``bulk`` -- threads write their
values to their own slot / a staging buffer, fence to the async proxy, and
lane j issues one ``cp.async.bulk.shared::cluster`` of the whole message to
CTA j (one update per message). A CTA's own contribution never travels: it
is written to its own slot with plain stores (except direct st_async with
fewer active than calling threads, where it goes through st.async so that
other threads may read it after the barrier).

Inside every slot, vector i (``vec`` words) of lane l of a group of g lanes
sits at word ``(i*g + l)*vec``, so a warp's shared-memory accesses are
contiguous whatever V is (the contiguous ``[t*V, (t+1)*V)`` layout had 8-way
bank conflicts at V = 32 and ran 2-3x slower).

Shared-memory layout (allocated by ``allocate``; S stages, ring by round)::

    direct:  recv  fp32[S][C][N]        slot [s][src] written by CTA src
    split:   rs    fp32[S][C][N/C]      slot [s][src] written by CTA src
             ag    fp32[S][N]           slice [s][r*N/C:] written by CTA r
             stg   fp32[S][N]           (bulk only) own fragment, source of the RS copies
    full     mbarrier[S]  (split: [2][S], rs then ag)   1 arrival + tx bytes
    empty    mbarrier[S]  C-1 arrivals, one remote arrive from each peer

Barrier contract, for round ``k`` (stage ``s = k % S``, parity ``p = (k/S) & 1``):

1. Thread 0 arms ``full[s]`` with ``arrive.expect_tx(bytes this CTA will
   receive)``; peers' bytes may land before or after (the tx count may go
   negative).
2. A sender waits ``empty[s]`` with parity ``p ^ 1`` before writing stage
   ``s`` of any CTA: that completes when every peer released round ``k - S``
   (it passes at once for the first S rounds of a fresh barrier). Only a
   thread whose writes the peers wait for may wait here: the peers cannot
   release round k before its data arrived, so it never sees ``empty[s]``
   past that phase. A thread that sends nothing in round k (a reduce-scatter
   owner keeping its own slice, which only it reads back) must not wait: if
   it came late, after the peers released round k too, parity ``p ^ 1``
   would name the phase of round k + S and the wait would never end (the
   fused MLP hung this way, at random, in two-round reduce-scatters).
3. Every thread waits ``full[s]`` with parity ``p``, then reads.
4. Release: a named barrier over the T threads (all reads done), then thread
   ``j < C`` (``j != my_rank``) arrives remotely on CTA j's ``empty[s]``.

So no buffer is overwritten before its reader consumed it, a fast CTA can run
up to S - 1 rounds ahead of a slow one, and the collective can be called any
number of times (in loops, persistent kernels) with a caller-owned round
counter. ``teardown`` (a cluster barrier) must run before any CTA exits, since
peers may still arrive on its ``empty`` barriers.

Caller's duties::

    reducer = ClusterReduce(num_elems=256, cluster_size=4, num_threads=128, op="sum")
    # in the kernel (all T threads):
    smem = cutlass.memory.SmemAllocator()
    bufs = reducer.allocate(smem)
    reducer.init(bufs)                 # thread 0 initialises; fence
    cf_cute.primitives.cluster_sync()  # barriers visible cluster-wide (once)
    for k in cutlass.range(rounds):
        out = reducer.all_reduce(bufs, frag, k)   # frag: fp32 rmem tensor of V
    reducer.teardown()                 # before exit

Several instances in one kernel need distinct ``barrier_id`` values (named
barriers 1..15; ClusterGather defaults to 2). Cluster size 1 is a no-op that
allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, const_expr

from . import _dsmem
from .plan import (
    FragmentPlan,
    check_cluster_size,
    check_smem,
    check_threads,
    plan_fragment,
)

__all__ = ["ReduceOp", "REDUCE_OPS", "ClusterReducePlan", "ClusterReduce", "ClusterReduceBuffers"]


@dataclass(frozen=True)
class ReduceOp:
    """A commutative, associative fp32 combine with its identity."""

    name: str
    combine: Callable
    identity: float


def _fmax(a, b):
    return cute.arch.fmax(a, b)


def _fmin(a, b):
    return cute.arch.fmin(a, b)


REDUCE_OPS = {
    "sum": ReduceOp("sum", lambda a, b: a + b, 0.0),
    "max": ReduceOp("max", _fmax, float("-inf")),
    "min": ReduceOp("min", _fmin, float("inf")),
}

# Direct exchange while the per-stage receive buffer stays this small, and
# always for 2 CTAs (both algorithms move the same bytes there, direct in one
# hop). Measured on H100: benchmarks/RESULTS.md, docs/NOTES.md.
DIRECT_MAX_RECV_BYTES = 8 * 1024
# transport="auto" takes st.async: with the conflict-free slot layout it beat
# the copy engine at every size and cluster size measured on H100 (up to 16 KB
# per CTA; benchmarks/RESULTS.md). "bulk" stays available by name.


@dataclass(frozen=True)
class ClusterReducePlan:
    algorithm: str            # "identity" (C == 1), "direct" or "split"
    transport: str            # "st_async" or "bulk"
    frag: FragmentPlan
    stages: int

    @property
    def message_bytes(self) -> int:
        """Bytes one CTA sends one peer in one hop."""
        f = self.frag
        return 4 * (f.num_words if self.algorithm == "direct" else f.slice_words)

    @property
    def self_send(self) -> bool:
        """Direct st.async: threads beyond ``active`` read slot ``my_rank``
        written by other threads, so it must arrive through the barrier."""
        return self.algorithm == "direct" and self.transport == "st_async" and \
            self.frag.active < self.frag.num_threads

    @property
    def recv_words(self) -> int:
        C, N = self.frag.cluster_size, self.frag.num_words
        if self.algorithm == "direct":
            return self.stages * C * N
        if self.algorithm == "split":
            # rs [S][C][N/C] + ag [S][N] (+ bulk staging [S][N])
            return self.stages * N * (3 if self.transport == "bulk" else 2)
        return 0

    @property
    def num_full(self) -> int:
        return {"direct": 1, "split": 2}.get(self.algorithm, 0) * self.stages

    @property
    def smem_bytes(self) -> int:
        if self.algorithm == "identity":
            return 0
        # buffers (16-B aligned) + full and empty barriers (8 B each) + alignment slack
        return 4 * self.recv_words + 8 * (self.num_full + self.stages) + 16


def plan_reduce(num_elems: int, cluster_size: int, num_threads: int, algorithm: str, stages: int,
                scatter: bool, transport: str = "auto") -> ClusterReducePlan:
    check_cluster_size(cluster_size)
    check_threads(num_threads)
    if not isinstance(num_elems, int) or num_elems <= 0:
        raise ValueError(f"num_elems must be a positive integer, got {num_elems!r}")
    if stages not in (1, 2, 4, 8):
        raise ValueError(f"stages must be 1, 2, 4 or 8, got {stages!r}")
    if algorithm not in ("auto", "direct", "split"):
        raise ValueError(f"algorithm must be 'auto', 'direct' or 'split', got {algorithm!r}")
    if transport not in ("auto", "st_async", "bulk"):
        raise ValueError(f"transport must be 'auto', 'st_async' or 'bulk', got {transport!r}")
    direct = plan_fragment(num_elems, num_threads, cluster_size, split=False)
    split = plan_fragment(num_elems, num_threads, cluster_size, split=True)
    if direct is None:
        raise ValueError(
            f"{num_elems} values cannot be laid over {num_threads} threads: use a count <= "
            f"{4 * num_threads}, or a multiple of the thread count, of at most 64 per thread"
        )
    if cluster_size == 1:
        return ClusterReducePlan("identity", "st_async", direct, stages)
    if scatter or algorithm == "split":
        if split is None:
            raise ValueError(
                f"reduce-scatter of {num_elems} values over a cluster of {cluster_size} with "
                f"{num_threads} threads needs the active threads to split evenly by CTA "
                f"(num_elems a multiple of {cluster_size} words, at least one per CTA)"
            )
        alg, frag = "split", split
    elif algorithm == "direct":
        alg, frag = "direct", direct
    else:
        small = cluster_size <= 2 or cluster_size * num_elems * 4 <= DIRECT_MAX_RECV_BYTES
        alg, frag = ("direct", direct) if (small or split is None) else ("split", split)
    msg = 4 * (frag.num_words if alg == "direct" else frag.slice_words)
    if transport == "auto":
        transport = "st_async"
    if transport == "bulk" and msg % 16:
        raise ValueError(f"bulk transport moves 16-byte multiples; a message here is {msg} B")
    plan = ClusterReducePlan(alg, transport, frag, stages)
    check_smem(f"ClusterReduce({num_elems} values, cluster {cluster_size}, {alg}/{transport}, "
               f"{stages} stages)", plan.smem_bytes)
    return plan


class ClusterReduceBuffers:
    """Shared-memory pointers of one ClusterReduce instance (trace-time object)."""

    def __init__(self, recv, full, empty):
        self.recv = recv      # Int32-typed pointer to the receive ring (16-B aligned)
        self.full = full      # mbarrier array
        self.empty = empty    # mbarrier array


class ClusterReduce:
    """Cluster all-reduce / reduce-scatter of a per-thread fp32 fragment.

    Static configuration lives here; the device methods are ``@cute.jit`` and
    are traced into the caller's kernel. ``num_threads`` threads (warps
    ``0 .. num_threads/32 - 1`` of the CTA) call every method collectively.
    """

    def __init__(self, num_elems: int, cluster_size: int, num_threads: int, op: str = "sum",
                 algorithm: str = "auto", stages: int = 2, barrier_id: int = 1,
                 scatter: bool = False, transport: str = "auto"):
        if op not in REDUCE_OPS:
            raise ValueError(f"op must be one of {sorted(REDUCE_OPS)}, got {op!r}")
        if not 1 <= barrier_id <= 15:
            raise ValueError(f"barrier_id must be a named barrier 1..15, got {barrier_id!r}")
        self.op = REDUCE_OPS[op]
        self.cluster_size = cluster_size
        self.num_threads = num_threads
        self.barrier_id = barrier_id
        self.plan = plan_reduce(num_elems, cluster_size, num_threads, algorithm, stages, scatter, transport)
        f = self.plan.frag
        self.num_elems = num_elems
        self.per_thread = f.per_thread
        self.active = f.active

    # ---------------------------------------------------------------- host side
    @property
    def smem_bytes(self) -> int:
        return self.plan.smem_bytes

    def owner_of_thread(self, t: int) -> int:
        """(host helper) CTA rank owning the values of thread ``t`` after a reduce-scatter."""
        return t // self.plan.frag.group if t < self.active else -1

    # ---------------------------------------------------------------- device side
    @cute.jit
    def allocate(self, smem) -> ClusterReduceBuffers:
        """Carve the buffers out of a ``cutlass.memory.SmemAllocator``."""
        p = self.plan
        recv, full, empty = None, None, None
        if const_expr(p.algorithm != "identity"):
            recv = smem.allocate_array(Int32, p.recv_words, byte_alignment=16)
            full = smem.allocate_array(Int64, p.num_full, byte_alignment=8)
            empty = smem.allocate_array(Int64, p.stages, byte_alignment=8)
        return ClusterReduceBuffers(recv, full, empty)

    @cute.jit
    def init(self, bufs: ClusterReduceBuffers):
        """Initialise the barriers (thread 0) and fence the init cluster-wide.
        The caller then runs one cluster barrier before the first round."""
        p = self.plan
        if const_expr(p.algorithm != "identity"):
            if cute.arch.thread_idx()[0] == 0:
                _dsmem.init_barrier_array(bufs.full, p.num_full, 1)
                _dsmem.init_barrier_array(bufs.empty, p.stages, self.cluster_size - 1)
                cute.arch.mbarrier_init_fence()

    @cute.jit
    def make_fragment(self) -> cute.Tensor:
        """A register fragment of the right size (V fp32 values per thread)."""
        return cute.make_rmem_tensor(self.per_thread, Float32)

    def thread_offset(self, tidx):
        """First fragment position held by thread ``tidx`` (``t % active``)."""
        return (tidx % self.active) * self.per_thread

    @cute.jit
    def all_reduce(self, bufs: ClusterReduceBuffers, frag: cute.Tensor, round_idx: Int32) -> cute.Tensor:
        """Reduce ``frag`` over the cluster; returns a new fragment holding the
        result for this thread's positions (threads >= active get the result
        for positions of thread ``t % active``)."""
        p = self.plan
        out = cute.make_rmem_tensor(self.per_thread, Float32)
        if const_expr(p.algorithm == "identity"):
            out.store(frag.load())
        elif const_expr(p.algorithm == "direct"):
            self._direct(bufs, frag, out, round_idx)
        else:
            self._split(bufs, frag, out, round_idx, True)
        return out

    @cute.jit
    def reduce_scatter(self, bufs: ClusterReduceBuffers, frag: cute.Tensor, round_idx: Int32) -> cute.Tensor:
        """Reduce ``frag`` over the cluster, keeping only this CTA's slice.
        Threads for which ``owns(tidx)`` holds get the reduced values of their
        own positions; the others get the op's identity."""
        p = self.plan
        out = cute.make_rmem_tensor(self.per_thread, Float32)
        if const_expr(p.algorithm == "identity"):
            out.store(frag.load())
        else:
            self._split(bufs, frag, out, round_idx, False)
        return out

    @cute.jit
    def owns(self, tidx: Int32):
        """Whether thread ``tidx`` holds part of this CTA's reduce-scatter slice."""
        if const_expr(self.plan.algorithm == "identity"):
            return tidx < self.active
        else:
            return (tidx < self.active) & (tidx // self.plan.frag.group == Int32(cute.arch.block_idx_in_cluster()))

    @cute.jit
    def teardown(self):
        """Cluster barrier: after it no peer touches this CTA's shared memory.
        Every thread of every CTA of the cluster calls it once, before exit."""
        if const_expr(self.plan.algorithm != "identity"):
            _dsmem.cluster_sync()

    # ---------------------------------------------------------------- internals
    # A thread's V values travel and rest as V/vec vectors. In every region of
    # shared memory, vector i of lane l (of a group of g lanes) sits at word
    # (i*g + l)*vec: a warp's accesses to vector i are contiguous, so shared
    # memory is read and written without bank conflicts whatever V is.
    @cute.jit
    def _vec_ptr(self, region: cute.Pointer, lane: Int32, group: cutlass.Constexpr[int],
                 i: cutlass.Constexpr[int]) -> cute.Pointer:
        f = self.plan.frag
        return _dsmem.smem_word_ptr(region, (lane + i * group) * f.vec, 4 * f.vec)

    @cute.jit
    def _send(self, src: cute.Tensor, region: cute.Pointer, lane: Int32, group: cutlass.Constexpr[int],
              mbar: cute.Pointer, peer: Int32):
        """st.async this thread's values into ``region`` of CTA ``peer``."""
        f = self.plan.frag
        words = _dsmem.to_words(src)
        for i in cutlass.range_constexpr(f.per_thread // f.vec):
            _dsmem.st_async_words(words, i * f.vec, f.vec, self._vec_ptr(region, lane, group, i), mbar, peer)

    @cute.jit
    def _put(self, src: cute.Tensor, region: cute.Pointer, lane: Int32, group: cutlass.Constexpr[int]):
        """Plain stores of this thread's values into ``region`` of this CTA."""
        f = self.plan.frag
        for i in cutlass.range_constexpr(f.per_thread // f.vec):
            d = cute.make_tensor(cute.recast_ptr(self._vec_ptr(region, lane, group, i), dtype=Float32),
                                 cute.make_layout(f.vec))
            for j in cutlass.range_constexpr(f.vec):
                d[j] = src[i * f.vec + j]

    @cute.jit
    def _get(self, region: cute.Pointer, lane: Int32, group: cutlass.Constexpr[int], out: cute.Tensor):
        f = self.plan.frag
        for i in cutlass.range_constexpr(f.per_thread // f.vec):
            v = cute.make_tensor(cute.recast_ptr(self._vec_ptr(region, lane, group, i), dtype=Float32),
                                 cute.make_layout(f.vec)).load()
            for j in cutlass.range_constexpr(f.vec):
                out[i * f.vec + j] = v[j]

    @cute.jit
    def _fold(self, base: cute.Pointer, slot_words: cutlass.Constexpr[int], lane: Int32,
              group: cutlass.Constexpr[int], out: cute.Tensor):
        """out = op over src = 0..C-1, in rank order, of slot ``src`` of ``base``."""
        f = self.plan.frag
        tmp = cute.make_rmem_tensor(f.per_thread, Float32)
        for src in cutlass.range_constexpr(self.cluster_size):
            region = _dsmem.smem_word_ptr(base, Int32(src * slot_words), 16)
            if const_expr(src == 0):
                self._get(region, lane, group, out)
            else:
                self._get(region, lane, group, tmp)
                for v in cutlass.range_constexpr(f.per_thread):
                    out[v] = self.op.combine(out[v], tmp[v])

    @cute.jit
    def _release(self, bufs: ClusterReduceBuffers, s: Int32, tidx: Int32, rank: Int32):
        cute.arch.barrier(barrier_id=self.barrier_id, number_of_threads=self.num_threads)
        if tidx < self.cluster_size:
            if tidx != rank:
                _dsmem.remote_arrive(bufs.empty + s, tidx)

    @cute.jit
    def _publish(self, src: cute.Pointer, dst: cute.Pointer, mbar: cute.Pointer,
                 nbytes: cutlass.Constexpr[int], tidx: Int32, rank: Int32):
        """Bulk transport, after the local writes of the round: make them visible
        to the copy engine, wait for every writer, then lane ``j`` (``j != rank``)
        copies ``nbytes`` at ``src`` into CTA j's ``dst``."""
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=self.barrier_id, number_of_threads=self.num_threads)
        if tidx < self.cluster_size:
            if tidx != rank:
                _dsmem.bulk_to_peer(src, dst, mbar, tidx, nbytes)

    @cute.jit
    def _direct(self, bufs: ClusterReduceBuffers, frag: cute.Tensor, out: cute.Tensor, round_idx: Int32):
        p = self.plan
        f = p.frag
        C, N, S, A = self.cluster_size, f.num_words, p.stages, f.active
        tidx = cute.arch.thread_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        s, parity = _dsmem.stage_parity(round_idx, S)
        stage_base = _dsmem.smem_word_ptr(bufs.recv, s * (C * N), 16)
        own_slot = _dsmem.smem_word_ptr(stage_base, rank * N, 16)
        full = bufs.full + s
        if tidx == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(full, (C if p.self_send else C - 1) * N * 4)
        if tidx < A:
            _dsmem.wait_parity(bufs.empty + s, parity ^ 1)
            if const_expr(not p.self_send):
                # our own contribution goes to our own slot with plain stores
                self._put(frag, own_slot, tidx, A)
            if const_expr(p.transport == "st_async"):
                for peer in cutlass.range_constexpr(C):
                    if const_expr(p.self_send):
                        self._send(frag, own_slot, tidx, A, full, Int32(peer))
                    elif Int32(peer) != rank:
                        self._send(frag, own_slot, tidx, A, full, Int32(peer))
        if const_expr(p.transport == "bulk"):
            self._publish(own_slot, own_slot, full, N * 4, tidx, rank)
        _dsmem.wait_parity(full, parity)
        self._fold(stage_base, N, tidx % A, A, out)
        self._release(bufs, s, tidx, rank)

    @cute.jit
    def _split(self, bufs: ClusterReduceBuffers, frag: cute.Tensor, out: cute.Tensor, round_idx: Int32,
               gather: cutlass.Constexpr[bool]):
        p = self.plan
        f = p.frag
        C, N, S, A = self.cluster_size, f.num_words, p.stages, f.active
        G, slice_words = f.group, f.slice_words
        bulk = p.transport == "bulk"
        tidx = cute.arch.thread_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        s, parity = _dsmem.stage_parity(round_idx, S)
        rs_base = _dsmem.smem_word_ptr(bufs.recv, s * N, 16)
        ag_base = _dsmem.smem_word_ptr(bufs.recv, S * N + s * N, 16)
        stg_base = _dsmem.smem_word_ptr(bufs.recv, 2 * S * N + s * N, 16)
        rs_own = _dsmem.smem_word_ptr(rs_base, rank * slice_words, 16)     # slot [rank]
        full_rs = bufs.full + s
        full_ag = bufs.full + S + s
        if tidx == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(full_rs, (C - 1) * slice_words * 4)
            if const_expr(gather):
                cute.arch.mbarrier_arrive_and_expect_tx(full_ag, (C - 1 if bulk else C) * slice_words * 4)
        # thread t < A holds a part of slice owner = t // G, as lane t % G of that slice's group
        owner = tidx // G
        lane = tidx % G
        is_owner = (tidx < A) & (owner == rank)
        # ---- reduce-scatter: slice p of every fragment to slot [my rank] of CTA p
        if tidx < A:
            if const_expr(bulk or gather):
                _dsmem.wait_parity(bufs.empty + s, parity ^ 1)
            elif owner != rank:
                # only a thread that writes into a peer waits (contract, point 2): our own
                # slot is read back by this same thread alone, and a thread that sends
                # nothing is no condition of the peers' release, so it could come here
                # after they released round k as well and wait on a phase that never ends
                _dsmem.wait_parity(bufs.empty + s, parity ^ 1)
            if owner == rank:
                # our own slice never leaves: the same thread folds it below
                self._put(frag, rs_own, lane, G)
            if const_expr(bulk):
                self._put(frag, _dsmem.smem_word_ptr(stg_base, owner * slice_words, 16), lane, G)
            else:
                if owner != rank:
                    self._send(frag, rs_own, lane, G, full_rs, owner)
        if const_expr(bulk):
            # lane j ships slice j of the staged fragment to CTA j
            cute.arch.fence_view_async_shared()
            cute.arch.barrier(barrier_id=self.barrier_id, number_of_threads=self.num_threads)
            if tidx < C:
                if tidx != rank:
                    _dsmem.bulk_to_peer(_dsmem.smem_word_ptr(stg_base, tidx * slice_words, 16),
                                        rs_own, full_rs, tidx, slice_words * 4)
        _dsmem.wait_parity(full_rs, parity)
        for v in cutlass.range_constexpr(f.per_thread):
            out[v] = Float32(self.op.identity)
        if is_owner:
            self._fold(rs_base, slice_words, lane, G, out)
        # ---- all-gather of the reduced slices: slice r at ag[r * slice_words]
        if const_expr(gather):
            ag_own = _dsmem.smem_word_ptr(ag_base, rank * slice_words, 16)
            if const_expr(bulk):
                if is_owner:
                    self._put(out, ag_own, lane, G)
                self._publish(ag_own, ag_own, full_ag, slice_words * 4, tidx, rank)
            else:
                if is_owner:
                    for peer in cutlass.range_constexpr(C):
                        self._send(out, ag_own, lane, G, full_ag, Int32(peer))
            _dsmem.wait_parity(full_ag, parity)
            l = tidx % A
            self._get(_dsmem.smem_word_ptr(ag_base, (l // G) * slice_words, 16), l % G, G, out)
        self._release(bufs, s, tidx, rank)
