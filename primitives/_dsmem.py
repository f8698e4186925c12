"""Low-level DSMEM helpers shared by the cluster collectives.

Every helper here is a thin, named wrapper over one PTX idiom, so that the
collectives read as protocols rather than as address arithmetic:

* ``smem_word_ptr``   a 4-byte-word pointer into a shared-memory buffer at a
                      run-time word offset, re-typed with the alignment that
                      the caller proves (pointer arithmetic loses it).
* ``st_async_words``  ``st.async.shared::cluster.mbarrier::complete_tx::bytes``
                      of 1, 2 or 4 words (``.b32 / .v2.b32 / .v4.b32``) into a
                      peer CTA's shared memory, completing on the *peer's*
                      copy of a local mbarrier (both mapped with ``mapa``).
* ``bulk_to_peer``    ``cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes``:
                      the copy engine moves a 16-byte-multiple range of this
                      CTA's shared memory into a peer's, one transaction-count
                      update on the peer's mbarrier for the whole range.
* ``remote_arrive``   ``mbarrier.arrive.release.cluster`` on a peer's mbarrier.
* ``wait_parity``     blocking ``mbarrier.try_wait.parity`` loop.
* ``stage_parity``    (stage, parity) of a round in an S-stage ring.

All of these are device-side and must be called from inside a ``@cute.kernel``
or a ``@cute.jit`` function traced from one.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, const_expr
from cutlass._mlir.dialects import nvvm
from cutlass.experimental import primitives as _prims

__all__ = [
    "smem_word_ptr",
    "st_async_words",
    "bulk_to_peer",
    "remote_arrive",
    "wait_parity",
    "stage_parity",
    "init_barrier_array",
    "cluster_sync",
    "to_words",
]


@cute.jit
def smem_word_ptr(base: cute.Pointer, word_offset: Int32, align_bytes: cutlass.Constexpr[int]) -> cute.Pointer:
    """Pointer to ``base + word_offset`` words (4 bytes each) in shared memory.

    ``align_bytes`` is the alignment the caller guarantees for the result
    (``word_offset`` a multiple of ``align_bytes // 4`` and ``base`` aligned
    at least as much); it is what lets ``st.async.v4`` and 128-bit shared
    loads compile.
    """
    addr = base.toint() + word_offset * Int32(4)
    return cute.make_ptr(Int32, addr, cute.AddressSpace.smem, assumed_align=align_bytes)


@cute.jit
def st_async_words(
    words: cute.Tensor,
    first: cutlass.Constexpr[int],
    width: cutlass.Constexpr[int],
    dst: cute.Pointer,
    mbar: cute.Pointer,
    peer: Int32,
):
    """st.async ``width`` (1, 2 or 4) words ``words[first:first+width]`` of a
    register tensor of Int32 into ``dst`` of CTA ``peer``; the transfer's
    bytes complete on ``mbar`` of CTA ``peer``."""
    if const_expr(width == 1):
        cute.arch.store_async_dsmem(dst, words[first], mbar, peer)
    elif const_expr(width == 2):
        cute.arch.store_async_dsmem(dst, (words[first], words[first + 1]), mbar, peer)
    else:
        cute.arch.store_async_dsmem(
            dst,
            (words[first], words[first + 1], words[first + 2], words[first + 3]),
            mbar,
            peer,
        )


@cute.jit
def bulk_to_peer(src: cute.Pointer, dst: cute.Pointer, mbar: cute.Pointer, peer: Int32,
                 nbytes: cutlass.Constexpr[int]):
    """Copy ``nbytes`` (a multiple of 16) from local ``src`` to ``dst`` in CTA
    ``peer`` (``dst`` and ``mbar`` given as this CTA's addresses of the same
    fields; both are mapped). The source must have been made visible to the
    async proxy (``fence_view_async_shared`` by its writers, then a barrier)."""
    _prims.cp_async_bulk_shared_cluster_shared_cta(
        cute.arch.map_dsmem_ptr(dst, peer), src, cute.arch.map_dsmem_ptr(mbar, peer), nbytes)


@cute.jit
def remote_arrive(mbar: cute.Pointer, peer: Int32):
    """Arrive (release, cluster scope) on CTA ``peer``'s copy of ``mbar``."""
    cute.arch.mbarrier_arrive(mbar, peer_cta_rank_in_cluster=peer, scope=nvvm.MemScopeKind.CLUSTER)


@cute.jit
def wait_parity(mbar: cute.Pointer, parity: Int32):
    """Block until the phase of ``mbar`` with the given parity has completed."""
    cute.arch.mbarrier_wait(mbar, parity)


@cute.jit
def stage_parity(round_idx: Int32, stages: cutlass.Constexpr[int]):
    """Ring position of a round: ``(round % stages, (round // stages) & 1)``."""
    return round_idx % stages, (round_idx // stages) & 1


@cute.jit
def init_barrier_array(mbar: cute.Pointer, count: cutlass.Constexpr[int], arrivals: cutlass.Constexpr[int]):
    """Initialise ``count`` consecutive mbarriers with ``arrivals`` expected
    arrivals each. Call from one thread; fence with ``mbarrier_init_fence``."""
    for i in cutlass.range_constexpr(count):
        cute.arch.mbarrier_init(mbar + i, arrivals)


@cute.jit
def cluster_sync():
    """Full cluster barrier (``barrier.cluster.arrive.release`` +
    ``barrier.cluster.wait.acquire``), executed by every thread."""
    cute.arch.cluster_arrive()
    cute.arch.cluster_wait()


@cute.jit
def to_words(frag: cute.Tensor) -> cute.Tensor:
    """Register tensor of 32-bit words holding the bits of ``frag`` (whose
    total size must be a multiple of 4 bytes)."""
    nbits = cute.size(frag) * frag.element_type.width
    words = cute.make_rmem_tensor(nbits // 32, Int32)
    words.store(frag.load().bitcast(Int32))
    return words
