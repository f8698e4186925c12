"""Cluster collectives over Hopper distributed shared memory, as CuTe DSL
building blocks to call inside your own ``@cute.kernel``.

* :class:`ClusterReduce` -- all-reduce / reduce-scatter of fp32 fragments.
* :class:`ClusterGather` -- all-gather of one typed tile per CTA.
* :func:`cluster_sync`   -- full cluster barrier (after barrier init, before exit).
* :class:`GridBarrier`   -- barrier across all (co-resident) CTAs of a launch.
* :func:`last_arrival`   -- which CTA of a group arrives last (cross-cluster split reductions);
  :func:`warp_last_arrival` the same for warps.

Installed as ``cf_cute.primitives``. Each module's docstring draws its
shared-memory layout and states its barrier contract.
"""

from ._dsmem import cluster_sync
from .cluster_gather import ClusterGather, ClusterGatherPlan
from .arrival import last_arrival, warp_last_arrival
from .grid_barrier import GridBarrier, max_resident_clusters, pdl_handoff
from .cluster_reduce import REDUCE_OPS, ClusterReduce, ClusterReducePlan, ReduceOp
from .plan import MAX_CLUSTER_SIZE, SMEM_LIMIT_BYTES, FragmentPlan, check_grid

__all__ = [
    "ClusterReduce",
    "ClusterReducePlan",
    "ClusterGather",
    "ClusterGatherPlan",
    "ReduceOp",
    "REDUCE_OPS",
    "FragmentPlan",
    "cluster_sync",
    "GridBarrier",
    "max_resident_clusters",
    "pdl_handoff",
    "last_arrival",
    "warp_last_arrival",
    "check_grid",
    "MAX_CLUSTER_SIZE",
    "SMEM_LIMIT_BYTES",
]
