"""The split-K reduction shared by the grid-wide paired GEMVs (the MLP block's phase A,
:mod:`fused.qkv_project`).

Both split each unit of two 16-row tiles over the K parts of the warps of a CTA and
over the CTAs of a cluster; the partials sit in shared memory as
``sAcc[k_part, j * per_unit + b * 32 + e]`` (unit slot j, request b, e in 0..31) where
rows e and e + 1 are a *pair* (gate and up; two RoPE partners). After the reduction
one thread owns each pair and finishes it (SiLU(gate) * up; RoPE and stores)::

    round k:  frag[v] = sum over K parts of sAcc[:, k * n_r + p0 + v]   (fixed order)
              res = ClusterReduce.reduce_scatter(frag)                   (rank order)
              owner(pos, res[v], res[v + 1]) for its even v, pos = k * n_r + tidx * V + v

Deterministic: fixed-order sums, no atomics. Barrier contract: that of
``ClusterReduce.reduce_scatter`` (the caller retires it with a cluster barrier).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from cf_cute.primitives import ClusterReduce
from cf_cute.primitives.plan import SMEM_LIMIT_BYTES

__all__ = ["PairedGrid", "paired_reduce", "reduce_pairs"]


class PairedGrid:
    """Grid properties of a paired split-K config (a frozen dataclass with the fields
    ``num_clusters``, ``cluster_size``, ``num_threads``, ``k_parts`` and a ``units``
    property): cluster c owns units c, c + num_clusters, ...; a pass of the CTA's warps
    covers ``units_per_pass`` units (two tiles a unit, ``k_parts`` warps a tile)."""

    @property
    def grid(self) -> int:
        return self.num_clusters * self.cluster_size

    @property
    def num_warps(self) -> int:
        return self.num_threads // 32

    @property
    def units_per_pass(self) -> int:
        return self.num_warps // (2 * self.k_parts)

    @property
    def units_per_cluster(self) -> int:
        """J: units of the busiest cluster, rounded up to whole passes."""
        j = -(-self.units // self.num_clusters)
        return -(-j // self.units_per_pass) * self.units_per_pass


def paired_reduce(units: int, per_unit: int, cluster_size: int, num_threads: int, fixed_smem: int):
    """The reduce-scatter of ``units`` units of ``per_unit`` fp32 partials in the fewest
    rounds that fit next to ``fixed_smem`` bytes of shared memory, with an even number
    of values per owner (whole pairs) and at most 32 (registers). Returns
    ``(ClusterReduce, rounds, units per round)`` or None."""
    for rounds in range(1, units + 1):
        jr = -(-units // rounds)
        try:
            red = ClusterReduce(jr * per_unit, cluster_size, num_threads, op="sum", scatter=True,
                                stages=2 if rounds > 1 else 1, barrier_id=2)
        except ValueError:
            continue
        if red.per_thread % 2 or red.per_thread > 32:
            continue
        if fixed_smem + red.smem_bytes <= SMEM_LIMIT_BYTES:
            return red, rounds, jr
    return None


@cute.jit
def reduce_pairs(red: ClusterReduce, bufs, sAcc: cute.Tensor, rounds: cutlass.Constexpr[int],
                 k_parts: cutlass.Constexpr[int], n_valid: cutlass.Constexpr[int], tidx: Int32, owner):
    """Sum the K parts of ``sAcc``, reduce-scatter them over the cluster in ``rounds``
    rounds and call ``owner(pos, first, second)`` (traced inline) for every pair this
    thread owns; ``n_valid`` is the number of partials per K part (positions past it
    are clamped and come back to no owner that the caller keeps)."""
    V = red.per_thread
    n_r = red.num_elems
    p0 = red.thread_offset(tidx)
    for k in cutlass.range_constexpr(rounds):
        frag = red.make_fragment()
        for v in cutlass.range_constexpr(V):
            pos = cutlass.min(k * n_r + p0 + v, Int32(n_valid - 1))
            tot = Float32(0.0)
            for q in cutlass.range_constexpr(k_parts):
                tot = tot + sAcc[q, pos]
            frag[v] = tot
        res = red.reduce_scatter(bufs, frag, Int32(k))
        if red.owns(tidx):
            for v in cutlass.range_constexpr(0, V, 2):
                owner(k * n_r + tidx * V + v, res[v], res[v + 1])
