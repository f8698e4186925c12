"""ClusterGather: every CTA of a cluster receives every CTA's tile, in rank order.

Each CTA of a cluster of ``C`` contributes a tile of ``tile_elems`` values of
``dtype`` (a whole number of 32-bit words, from 4 bytes up to what C tiles
fit in shared memory: 16 KB at C <= 8, about 14 KB at C = 16). After
``gather`` every CTA holds all C tiles in its own shared memory, tile ``r``
being CTA ``r``'s, and reads them through the returned tensor
``sAll[(elem, rank)]``. Data moves only through distributed shared memory:
each active thread loads its words of the tile (from registers or from the
caller's shared-memory tile) and either ``st.async``s them into slot
``my_rank`` of every CTA of the cluster (itself included), completing on that
CTA's mbarrier (small tiles), or writes them to its own slot ``my_rank`` and
lane j ships the whole slot to CTA j with one
``cp.async.bulk.shared::cluster`` (tiles of 4 KB and more: one mbarrier
update per tile instead of one per 16 bytes). Threads handle interleaved
vectors of the tile (``element_index``), so shared-memory accesses are
conflict-free; ``stages=None`` takes 2 stages when they fit, else 1.

Shared-memory layout (``allocate``; S stages, ring by round)::

    tiles  words[S][C][W]     W = tile words rounded up to 4 (16-B aligned slots)
    full   mbarrier[S]        1 arrival (thread 0's expect_tx) + the tile bytes from
                              C CTAs (st.async, own included) or C-1 peers (bulk)
    empty  mbarrier[S]        C - 1 arrivals, one remote arrive from each peer

Barrier contract, for round ``k`` (stage ``s = k % S``, parity ``p = (k/S) & 1``):

1. ``gather`` arms ``full[s]`` (thread 0), waits ``empty[s]`` with parity
   ``p ^ 1`` before any st.async into stage s (all peers released round k-S),
   sends, then every thread waits ``full[s]`` with parity ``p``. The returned
   tensor is valid until ``release``.
2. ``release`` (all T threads, once the caller finished reading stage s):
   named barrier, then thread ``j < C, j != my_rank`` arrives remotely on CTA
   j's ``empty[s]``.
3. ``teardown`` (cluster barrier) before any CTA exits.

So round k + S never overwrites a tile that some CTA still reads from round k;
with S >= 2 a CTA may keep round k's tiles while it starts round k + 1.

Example::

    gat = ClusterGather(cutlass.BFloat16, tile_elems=512, cluster_size=8, num_threads=128)
    bufs = gat.allocate(smem); gat.init(bufs); cluster_sync()
    sAll = gat.gather(bufs, sMyTile, k)        # sMyTile: smem tensor of 512 bf16, written
                                               # and barrier-synchronised by the caller
    ... read sAll[i, r] (element i of CTA r's tile) ...
    gat.release(bufs, k)
    gat.teardown()
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64, const_expr

from . import _dsmem
from .plan import (
    SMEM_LIMIT_BYTES,
    FragmentPlan,
    check_cluster_size,
    check_smem,
    check_threads,
    plan_fragment,
)

__all__ = ["ClusterGatherPlan", "ClusterGather", "ClusterGatherBuffers"]


# Tiles at least this large go through the copy engine: from 4 KB on it beat
# st.async at every cluster size on H100 (benchmarks/RESULTS.md).
BULK_MIN_TILE_BYTES = 4096


@dataclass(frozen=True)
class ClusterGatherPlan:
    frag: FragmentPlan        # layout of the tile's words over the threads
    slot_words: int           # tile words rounded up to a 16-byte multiple
    stages: int
    transport: str = "st_async"   # or "bulk"

    @property
    def smem_bytes(self) -> int:
        C = self.frag.cluster_size
        return 4 * self.stages * C * self.slot_words + 16 * self.stages + 16


def plan_gather(dtype_bits: int, tile_elems: int, cluster_size: int, num_threads: int,
                stages: int | None, transport: str = "auto") -> ClusterGatherPlan:
    """Plan a gather; ``stages=None`` takes 2 stages where they fit in shared
    memory, else 1."""
    check_cluster_size(cluster_size)
    check_threads(num_threads)
    if stages is not None and stages not in (1, 2, 4, 8):
        raise ValueError(f"stages must be 1, 2, 4 or 8, got {stages!r}")
    if not isinstance(tile_elems, int) or tile_elems <= 0:
        raise ValueError(f"tile_elems must be a positive integer, got {tile_elems!r}")
    nbits = tile_elems * dtype_bits
    if nbits % 32:
        raise ValueError(
            f"a tile of {tile_elems} x {dtype_bits}-bit values is {nbits / 8:g} B; tiles must be "
            f"a whole number of 4-byte words"
        )
    words = nbits // 32
    frag = plan_fragment(words, num_threads, cluster_size, split=False)
    if frag is None:
        raise ValueError(
            f"a tile of {words} words cannot be laid over {num_threads} threads: use at most "
            f"{4 * num_threads} words or a multiple of {num_threads} words (<= 64 per thread)"
        )
    if transport not in ("auto", "st_async", "bulk"):
        raise ValueError(f"transport must be 'auto', 'st_async' or 'bulk', got {transport!r}")
    slot_words = (words + 3) // 4 * 4
    if transport == "auto":
        transport = "bulk" if slot_words * 4 >= BULK_MIN_TILE_BYTES else "st_async"
    if stages is None:
        fits = ClusterGatherPlan(frag, slot_words, 2).smem_bytes <= SMEM_LIMIT_BYTES
        stages = 2 if fits else 1
    plan = ClusterGatherPlan(frag, slot_words, stages, transport)
    check_smem(f"ClusterGather({words * 4} B tile, cluster {cluster_size}, {stages} stages)",
               plan.smem_bytes)
    return plan


class ClusterGatherBuffers:
    def __init__(self, tiles, full, empty):
        self.tiles = tiles
        self.full = full
        self.empty = empty


class ClusterGather:
    """Cluster all-gather of one typed tile per CTA into every CTA's shared memory."""

    def __init__(self, dtype, tile_elems: int, cluster_size: int, num_threads: int, stages: int | None = None,
                 barrier_id: int = 2, transport: str = "auto"):
        if not 1 <= barrier_id <= 15:
            raise ValueError(f"barrier_id must be a named barrier 1..15, got {barrier_id!r}")
        self.dtype = dtype
        self.tile_elems = tile_elems
        self.cluster_size = cluster_size
        self.num_threads = num_threads
        self.barrier_id = barrier_id
        self.plan = plan_gather(dtype.width, tile_elems, cluster_size, num_threads, stages, transport)
        self.per_thread_words = self.plan.frag.per_thread
        self.active = self.plan.frag.active
        # values of dtype per thread
        self.per_thread = self.per_thread_words * 32 // dtype.width

    @property
    def smem_bytes(self) -> int:
        return self.plan.smem_bytes

    # ---------------------------------------------------------------- device side
    @cute.jit
    def allocate(self, smem) -> ClusterGatherBuffers:
        p = self.plan
        tiles = smem.allocate_array(Int32, p.stages * self.cluster_size * p.slot_words, byte_alignment=16)
        full = smem.allocate_array(Int64, p.stages, byte_alignment=8)
        empty = smem.allocate_array(Int64, p.stages, byte_alignment=8)
        return ClusterGatherBuffers(tiles, full, empty)

    @cute.jit
    def init(self, bufs: ClusterGatherBuffers):
        """Thread 0 initialises the barriers and fences; the caller then runs
        one cluster barrier before the first round."""
        if cute.arch.thread_idx()[0] == 0:
            _dsmem.init_barrier_array(bufs.full, self.plan.stages, 1)
            if const_expr(self.cluster_size > 1):
                _dsmem.init_barrier_array(bufs.empty, self.plan.stages, self.cluster_size - 1)
            cute.arch.mbarrier_init_fence()

    @cute.jit
    def make_fragment(self) -> cute.Tensor:
        """Register fragment for ``gather_fragment``: this thread's values of the tile."""
        return cute.make_rmem_tensor(self.per_thread, self.dtype)

    def element_index(self, tidx, v: int):
        """Tile element held as value ``v`` of thread ``tidx`` (< active) by
        ``gather_fragment``: threads hold interleaved 4/8/16-byte vectors
        (vector i of thread t is vector ``i * active + t`` of the tile), so a
        warp's shared-memory accesses are contiguous and conflict-free."""
        f = self.plan.frag
        vec_elems = f.vec * 32 // self.dtype.width
        return ((v // vec_elems) * f.active + tidx) * vec_elems + v % vec_elems

    @cute.jit
    def tiles(self, bufs: ClusterGatherBuffers, round_idx: Int32) -> cute.Tensor:
        """View of stage ``round_idx % S``: tensor ``(tile_elems, C)`` of dtype."""
        p = self.plan
        s = round_idx % p.stages
        base = _dsmem.smem_word_ptr(bufs.tiles, s * (self.cluster_size * p.slot_words), 16)
        typed = cute.recast_ptr(base, dtype=self.dtype)
        slot_elems = p.slot_words * 32 // self.dtype.width
        return cute.make_tensor(typed, cute.make_layout((self.tile_elems, self.cluster_size),
                                                        stride=(1, slot_elems)))

    @cute.jit
    def gather(self, bufs: ClusterGatherBuffers, sTile: cute.Tensor, round_idx: Int32) -> cute.Tensor:
        """Gather a shared-memory tile (``tile_elems`` values of dtype, 16-B
        aligned, written and barrier-synchronised by the caller)."""
        f = self.plan.frag
        tidx = cute.arch.thread_idx()[0]
        words = cute.make_rmem_tensor(f.per_thread, Int32)
        if tidx < f.active:
            base = cute.recast_ptr(sTile.iterator, dtype=Int32)
            for i in cutlass.range_constexpr(f.per_thread // f.vec):
                v = cute.make_tensor(self._vec_ptr(base, tidx, i), cute.make_layout(f.vec)).load()
                for j in cutlass.range_constexpr(f.vec):
                    words[i * f.vec + j] = v[j]
        return self._exchange(bufs, words, round_idx)

    @cute.jit
    def gather_fragment(self, bufs: ClusterGatherBuffers, frag: cute.Tensor, round_idx: Int32) -> cute.Tensor:
        """Gather a tile held in registers: value v of thread t < active is
        tile element ``element_index(t, v)``."""
        return self._exchange(bufs, _dsmem.to_words(frag), round_idx)

    @cute.jit
    def release(self, bufs: ClusterGatherBuffers, round_idx: Int32):
        """Tell every peer that this CTA finished reading round ``round_idx``."""
        if const_expr(self.cluster_size > 1):
            s = round_idx % self.plan.stages
            tidx = cute.arch.thread_idx()[0]
            rank = Int32(cute.arch.block_idx_in_cluster())
            cute.arch.barrier(barrier_id=self.barrier_id, number_of_threads=self.num_threads)
            if tidx < self.cluster_size:
                if tidx != rank:
                    _dsmem.remote_arrive(bufs.empty + s, tidx)
        else:
            cute.arch.barrier(barrier_id=self.barrier_id, number_of_threads=self.num_threads)

    @cute.jit
    def teardown(self):
        if const_expr(self.cluster_size > 1):
            _dsmem.cluster_sync()

    # ---------------------------------------------------------------- internals
    @cute.jit
    def _vec_ptr(self, region: cute.Pointer, tidx: Int32, i: cutlass.Constexpr[int]) -> cute.Pointer:
        """Word vector i of thread tidx in a tile-shaped region (see element_index)."""
        f = self.plan.frag
        return _dsmem.smem_word_ptr(region, (i * f.active + tidx) * f.vec, 4 * f.vec)

    @cute.jit
    def _exchange(self, bufs: ClusterGatherBuffers, words: cute.Tensor, round_idx: Int32) -> cute.Tensor:
        p = self.plan
        f = p.frag
        C = self.cluster_size
        tidx = cute.arch.thread_idx()[0]
        rank = Int32(cute.arch.block_idx_in_cluster())
        s, parity = _dsmem.stage_parity(round_idx, p.stages)
        base = _dsmem.smem_word_ptr(bufs.tiles, s * (C * p.slot_words), 16)
        own_slot = _dsmem.smem_word_ptr(base, rank * p.slot_words, 16)
        full = bufs.full + s
        if const_expr(p.transport == "bulk"):
            if tidx == 0:
                cute.arch.mbarrier_arrive_and_expect_tx(full, (C - 1) * p.slot_words * 4)
            if tidx < f.active:
                if const_expr(C > 1):
                    _dsmem.wait_parity(bufs.empty + s, parity ^ 1)
                for i in cutlass.range_constexpr(f.per_thread // f.vec):
                    d = cute.make_tensor(self._vec_ptr(own_slot, tidx, i), cute.make_layout(f.vec))
                    for j in cutlass.range_constexpr(f.vec):
                        d[j] = words[i * f.vec + j]
            # own slot complete and visible to the copy engine, then lane j ships it to CTA j
            cute.arch.fence_view_async_shared()
            cute.arch.barrier(barrier_id=self.barrier_id, number_of_threads=self.num_threads)
            if tidx < C:
                if tidx != rank:
                    _dsmem.bulk_to_peer(own_slot, own_slot, full, tidx, p.slot_words * 4)
        else:
            if tidx == 0:
                cute.arch.mbarrier_arrive_and_expect_tx(full, C * f.num_words * 4)
            if tidx < f.active:
                if const_expr(C > 1):
                    _dsmem.wait_parity(bufs.empty + s, parity ^ 1)
                for peer in cutlass.range_constexpr(C):
                    for i in cutlass.range_constexpr(f.per_thread // f.vec):
                        _dsmem.st_async_words(words, i * f.vec, f.vec, self._vec_ptr(own_slot, tidx, i), full,
                                              Int32(peer))
        _dsmem.wait_parity(full, parity)
        return self.tiles(bufs, round_idx)
