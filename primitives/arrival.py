"""Arrival counters: which CTA of a group of CTAs, in any placement, arrives last.

For split-K and split-KV reductions that span clusters (DSMEM reaches only the
CTAs of one cluster): each of ``expected`` CTAs writes its partial result to
global memory and calls :func:`last_arrival` on the group's counter; exactly one
of them, the last to arrive, gets ``1`` back and combines the partials, in a
fixed order that does not depend on who arrived when (deterministic). Nobody
waits, so unlike :class:`~.grid_barrier.GridBarrier` the CTAs need not be
resident at once.

State: ``int32`` counters in global memory, one a group, zeroed once by the
host. The last arrival resets its counter to 0, so nothing needs re-zeroing
between launches or CUDA-graph replays. A counter must not be shared by two
launches that run concurrently.

Protocol (all threads of the CTA call it; thread 0 acts)::

    bar.sync                                 every thread's partial is written
    fence.acq_rel.gpu                        ... and visible at gpu scope
    old = atom.add.acq_rel.gpu count[i], 1   (acquire: the others' partials are
                                             visible to the last arrival)
    last = old == expected - 1;  if last: st.relaxed.gpu count[i] = 0
    sFlag[0] = last;  bar.sync;  every thread reads sFlag[0]

After it returns 1, every thread of the CTA may read the other CTAs' partials
with ordinary loads (thread 0's acquire is ordered before them by the CTA barrier,
as in :class:`~.grid_barrier.GridBarrier`). Only integer atomics, for
synchronisation; results stay atomic-free. ``sFlag``: one ``Int32`` of shared
memory of the caller's, free between calls.

:func:`warp_last_arrival` is the same protocol for one warp (``bar.warp.sync``
instead of the CTA barrier, lane 0 acts, the verdict broadcast by a shuffle):
for reductions whose groups are warps, e.g. each warp of each cluster owning the
same rows of a split-K product, so that the combining is spread over as many
warps as there are groups instead of one CTA a group.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32

__all__ = ["last_arrival", "warp_last_arrival"]


@cute.jit
def last_arrival(mCount: cute.Tensor, index: Int32, expected: cutlass.Constexpr[int], sFlag: cute.Tensor) -> Int32:
    """Counts this CTA's arrival on ``mCount[index]`` (one of ``expected``); returns
    ``Int32(1)`` in every thread of the last CTA to arrive, ``Int32(0)`` elsewhere."""
    assert expected >= 1, "a group has at least one CTA"
    cute.arch.barrier()
    if cute.arch.thread_idx()[0] == 0:
        sFlag[0] = _arrive(mCount, index, expected)
    cute.arch.barrier()
    return sFlag[0]


@cute.jit
def _arrive(mCount: cute.Tensor, index: Int32, expected: cutlass.Constexpr[int]) -> Int32:
    """One thread's part of the protocol: release-fence, count the arrival on
    ``mCount[index]`` (acq_rel), and if it was the last of ``expected`` reset the counter
    and return 1 (else 0)."""
    ptr = mCount.iterator + index
    cute.arch.fence_acq_rel_gpu()
    old = cute.arch.atomic_add(ptr, Int32(1), sem="acq_rel", scope="gpu")
    last = Int32(0)
    if old == Int32(expected - 1):
        cute.arch.store(ptr, Int32(0), sem="relaxed", scope="gpu")
        last = Int32(1)
    return last


@cute.jit
def warp_last_arrival(mCount: cute.Tensor, index: Int32, expected: cutlass.Constexpr[int]) -> Int32:
    """:func:`last_arrival` for a warp (all 32 lanes call it, converged): counts this
    warp's arrival on ``mCount[index]`` (one of ``expected`` warps, anywhere in the grid);
    returns ``Int32(1)`` in every lane of the last warp to arrive, ``Int32(0)`` elsewhere.
    Every lane's global writes before the call are visible to the last warp's lanes
    after it (the warp barrier orders them before lane 0's release; lane 0's acquire,
    then the warp barrier, before the last warp's loads)."""
    assert expected >= 1, "a group has at least one warp"
    cute.arch.sync_warp()
    last = Int32(0)
    if cute.arch.lane_idx() == 0:
        last = _arrive(mCount, index, expected)
    last = cute.arch.shuffle_sync(last, 0)
    cute.arch.sync_warp()
    return last
