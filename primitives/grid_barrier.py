"""GridBarrier: a barrier across every CTA of one launch, through global memory.

STATUS: GPU-tested on an H100 (tests/test_grid_barrier.py: every CTA resident, 101
barriers per launch, three launches without resetting the state).

For single-launch kernels whose phases depend on results of all CTAs (the
fused attention block: per-head attention, then the output projection over
all heads). Every CTA of the grid must be resident at once, or the barrier
deadlocks: size the grid with :func:`max_resident_clusters` (host side).

State: ``int32[2]`` in global memory, ``[count, generation]``, zeroed once by
the host (``torch.zeros(2, dtype=torch.int32, device="cuda")``) and reused by
every later launch and every barrier inside a launch: the last CTA to arrive
resets ``count`` to 0 before it publishes the next generation, so nothing
needs re-zeroing between launches or CUDA-graph replays. One state per kernel
that may run concurrently with another using barriers.

Protocol (thread 0 of each CTA, between two CTA-wide barriers)::

    fence.acq_rel.gpu                        this CTA's global writes, ordered by the
                                             CTA barrier, become visible at gpu scope
    g   = ld.relaxed.gpu   state[1]          current generation (cannot move before
                                             every CTA has arrived, and we have not)
    old = atom.add.acq_rel.gpu state[0], 1
    if old == N - 1:  st state[0] = 0; st.release.gpu state[1] = g + 1
    else:             spin until ld.acquire.gpu state[1] != g

Only integer atomics, for synchronisation; results stay atomic-free.

Phase stamps (diagnostics, ``GridBarrier(n, stamps=True)``): the state grows to
``2 + 16 * num_ctas`` words and ``stamp(state, cta, k)`` has thread 0 write
``%globaltimer_lo`` to ``state[2 + 16 * cta + k]`` (k < 15); stamp 0 also writes
the CTA's ``%smid`` to word 15 (``SMID_WORD``), so a reader can see how the
launch was placed (two CTAs on one SM stream at half speed each). Without
stamps it compiles to nothing. ``state_words`` gives the size for the host.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

__all__ = ["GridBarrier", "max_resident_clusters", "pdl_handoff"]


@cute.jit
def pdl_handoff():
    """Programmatic dependent launch between kernels of one stream: wait for the previous
    launch's writes (``griddepcontrol.wait``), then let the next launch start
    (``griddepcontrol.launch_dependents``). In that order, code a kernel runs before its
    hand-off starts only after the launch two back has finished (the previous one could not
    trigger this one before its own wait), so it may read anything except the previous
    launch's outputs and must write nothing: weight prefetches, shared-memory set-up, loads
    of rows no running launch writes. Every launch of a chain must call it (or wait), so
    that one finishing implies all before it finished. Both are no-ops in a launch without
    ``use_pdl``; call it from every thread."""
    cute.arch.griddepcontrol_wait()
    cute.arch.griddepcontrol_launch_dependents()


def max_resident_clusters(cluster_size: int, smem_bytes: int | None = None, num_threads: int = 128,
                          ctas_per_sm: int | None = None) -> int:
    """How many clusters of ``cluster_size`` CTAs the current GPU runs at once
    (needs a GPU). ``smem_bytes=None`` assumes one CTA per SM (any shared
    memory size); otherwise CTAs of ``num_threads`` threads using ``smem_bytes``
    of dynamic shared memory. The probe kernel's registers do not limit it, so pass
    ``ctas_per_sm``, the most CTAs an SM holds by the kernel's own registers (its
    ``min_blocks_per_mp``): the probe then reserves shared memory for no more than that.
    Without it, a 256-thread kernel capped at two CTAs an SM by its registers is
    counted at the eight that its 30 KB of shared memory allow (H200, clusters of 8:
    "256 resident", of which 244 ran at once, and a grid barrier hung).

    On the H100 SXM measured here, one CTA per SM holds only 30 clusters of 4
    (120 CTAs): clusters live inside a GPC and the GPCs have 14 to 18 SMs."""
    try:                                     # the driver calls below need a current context
        import torch
        if torch.cuda.is_available():
            torch.cuda.current_device()
            torch.empty(1, device="cuda")
    except ImportError:
        pass
    from cutlass.utils import HardwareInfo
    hw = HardwareInfo()
    if smem_bytes is None:
        return hw.get_max_active_clusters(cluster_size)
    from cuda.bindings import driver
    if ctas_per_sm is not None:             # reserve the SM's shared memory for at most ctas_per_sm CTAs
        smem_bytes = max(smem_bytes, SM_SMEM_BYTES // ctas_per_sm - CTA_RESERVED_SMEM_BYTES)
    # HardwareInfo's occupancy probe, with this kernel's block size and shared memory
    fn = hw._get_device_function()
    hw._checkCudaErrors(driver.cuFuncSetAttribute(
        fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes))
    hw._checkCudaErrors(driver.cuFuncSetAttribute(
        fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1))
    cfg = driver.CUlaunchConfig()
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = num_threads, 1, 1
    cfg.sharedMemBytes = smem_bytes
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    val = driver.CUlaunchAttributeValue()
    val.clusterDim.x, val.clusterDim.y, val.clusterDim.z = cluster_size, 1, 1
    attr.value = val
    cfg.numAttrs = 1
    cfg.attrs = [attr]
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = cluster_size, 1, 1
    return hw._checkCudaErrors(driver.cuOccupancyMaxActiveClusters(fn, cfg))


SM_SMEM_BYTES = 228 * 1024          # shared memory of a Hopper SM (the carveout at 100%)
CTA_RESERVED_SMEM_BYTES = 1024      # reserved per resident CTA by the system


class GridBarrier:
    STATE_WORDS = 2       # [count, generation]
    STAMP_WORDS = 16      # per CTA, after the state, with stamps
    SMID_WORD = 15        # of a CTA's stamp words: its %smid (written with stamp 0)

    def __init__(self, num_ctas: int, stamps: bool = False):
        if not isinstance(num_ctas, int) or num_ctas <= 0:
            raise ValueError(f"num_ctas must be a positive integer, got {num_ctas!r}")
        self.num_ctas = num_ctas
        self.stamps = stamps

    @staticmethod
    def state_words(num_ctas: int, stamps: bool = False) -> int:
        """int32 words of the state tensor (zero it once)."""
        return GridBarrier.STATE_WORDS + (GridBarrier.STAMP_WORDS * num_ctas if stamps else 0)

    @cute.jit
    def stamp(self, mState: cute.Tensor, cta: Int32, k: cutlass.Constexpr[int]):
        """Phase stamp k of CTA ``cta`` (thread 0), when built with ``stamps``."""
        if const_expr(self.stamps):
            assert 0 <= k < self.SMID_WORD, f"stamp index {k} out of range"
            if cute.arch.thread_idx()[0] == 0:
                mState[self.STATE_WORDS + cta * self.STAMP_WORDS + k] = cute.arch.globaltimer_lo()
                if const_expr(k == 0):
                    mState[self.STATE_WORDS + cta * self.STAMP_WORDS + self.SMID_WORD] = Int32(cute.arch.smid())

    def sync_then_trigger(self, mState: cute.Tensor, cta: Int32, k: int):
        """:meth:`sync`, then ``griddepcontrol.launch_dependents`` (a programmatic dependent of
        this launch may start its prologue: the phase after the barrier is this launch's last),
        then :meth:`stamp` k. Traced inline (a Python method, usable as a ``front``)."""
        self.sync(mState)
        cute.arch.griddepcontrol_launch_dependents()
        self.stamp(mState, cta, k)

    @cute.jit
    def sync(self, mState: cute.Tensor):
        """All threads of every CTA call this; returns once every CTA arrived,
        with their prior global-memory writes visible."""
        cute.arch.barrier()
        if cute.arch.thread_idx()[0] == 0:
            count = mState.iterator
            gen_ptr = mState.iterator + 1
            cute.arch.fence_acq_rel_gpu()
            g = cute.arch.load(gen_ptr, Int32, sem="relaxed", scope="gpu")
            old = cute.arch.atomic_add(count, Int32(1), sem="acq_rel", scope="gpu")
            if old == Int32(self.num_ctas - 1):
                cute.arch.store(count, Int32(0), sem="relaxed", scope="gpu")
                cute.arch.store(gen_ptr, g + Int32(1), sem="release", scope="gpu")
            else:
                cur = cute.arch.load(gen_ptr, Int32, sem="acquire", scope="gpu")
                while cur == g:
                    cur = cute.arch.load(gen_ptr, Int32, sem="acquire", scope="gpu")
        cute.arch.barrier()
