"""Torch-callable harness launches for the cluster collectives (tests, benchmarks).

``reduce_rounds(x, ...)`` runs ``rounds`` all-reduces (or reduce-scatters) in
one launch and returns the per-thread accumulated results; ``gather_rounds``
does the same for ClusterGather; ``global_exchange_rounds`` is the
global-memory baseline. See ``cf_cute.collective_kernels`` for what exactly
is computed, and ``expected_*`` here for the fp64 torch references.
"""

from __future__ import annotations

import torch

from cf_cute.collective_kernels import (
    GatherHarnessConfig,
    GatherHarnessKernel,
    GlobalExchangeConfig,
    GlobalExchangeKernel,
    ReduceHarnessConfig,
    ReduceHarnessKernel,
)
from cf_cute.jit import ScalarSpec, TensorSpec, compile_kernel
from cf_cute.validate import check_tensor

__all__ = [
    "reduce_kernel", "reduce_rounds", "expected_reduce",
    "gather_kernel", "gather_rounds", "expected_gather",
    "global_exchange_kernel", "global_exchange_rounds",
]


def reduce_kernel(cfg: ReduceHarnessConfig):
    k = ReduceHarnessKernel(cfg)
    fn = compile_kernel(ReduceHarnessKernel, cfg, [
        TensorSpec("float32", (cfg.grid, cfg.num_elems)),
        TensorSpec("float32", (cfg.grid, k.out_cols)),
        ScalarSpec("int32"),
    ])
    return fn, k


def reduce_rounds(x: torch.Tensor, cfg: ReduceHarnessConfig, rounds: int, out: torch.Tensor | None = None):
    fn, k = reduce_kernel(cfg)
    check_tensor("x", x, dtype=torch.float32, shape=(cfg.grid, cfg.num_elems))
    if out is None:
        out = torch.full((cfg.grid, k.out_cols), float("nan"), device=x.device)
    fn(x, out, rounds)
    return out


def expected_reduce(x: torch.Tensor, cfg: ReduceHarnessConfig, rounds: int) -> torch.Tensor:
    """fp64 reference in the harness's output layout ``[grid, T*V]``; NaN where
    a thread writes nothing (non-owners of a reduce-scatter)."""
    k = ReduceHarnessKernel(cfg)
    red = k.red
    C, V, A, T = cfg.cluster_size, red.per_thread, red.active, cfg.num_threads
    xd = x.double().cpu().view(cfg.num_clusters, C, cfg.num_elems)
    rank = torch.arange(C, dtype=torch.float64).view(1, C, 1)
    acc = torch.zeros(cfg.num_clusters, cfg.num_elems, dtype=torch.float64)
    for r in range(rounds):
        contrib = xd + (r % 5) * (rank + 1)
        acc += contrib.sum(1) if cfg.op == "sum" else (contrib.amax(1) if cfg.op == "max" else contrib.amin(1))
    out = torch.full((cfg.num_clusters, C, T * V), float("nan"), dtype=torch.float64)
    for t in range(T):
        src = (t % A) * V
        if cfg.scatter:
            if t >= A:
                continue
            ranks = [red.owner_of_thread(t)] if C > 1 else list(range(C))
        else:
            ranks = list(range(C))
        for c in ranks:
            out[:, c, t * V:(t + 1) * V] = acc[:, src:src + V]
    return out.view(cfg.grid, T * V)


def global_exchange_kernel(cfg: GlobalExchangeConfig):
    k = GlobalExchangeKernel(cfg)
    fn = compile_kernel(GlobalExchangeKernel, cfg, [
        TensorSpec("float32", (cfg.grid, cfg.num_elems)),
        TensorSpec("float32", (cfg.grid, k.out_cols)),
        TensorSpec("float32", (cfg.num_clusters * 2 * cfg.cluster_size, cfg.num_elems)),
        ScalarSpec("int32"),
    ])
    return fn, k


def global_exchange_rounds(x: torch.Tensor, cfg: GlobalExchangeConfig, rounds: int, out=None, scratch=None):
    fn, k = global_exchange_kernel(cfg)
    if out is None:
        out = torch.full((cfg.grid, k.out_cols), float("nan"), device=x.device)
    if scratch is None:
        scratch = torch.empty(cfg.num_clusters * 2 * cfg.cluster_size, cfg.num_elems, device=x.device)
    fn(x, out, scratch, rounds)
    return out


_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int32": torch.int32}


def gather_kernel(cfg: GatherHarnessConfig):
    fn = compile_kernel(GatherHarnessKernel, cfg, [
        TensorSpec(cfg.dtype, (cfg.grid, cfg.tile_elems)),
        TensorSpec("float32", (cfg.grid, cfg.cluster_size, cfg.tile_elems)),
        ScalarSpec("int32"),
    ])
    return fn


def gather_rounds(x: torch.Tensor, cfg: GatherHarnessConfig, rounds: int, out=None):
    fn = gather_kernel(cfg)
    check_tensor("x", x, dtype=_TORCH[cfg.dtype], shape=(cfg.grid, cfg.tile_elems))
    if out is None:
        out = torch.zeros(cfg.grid, cfg.cluster_size, cfg.tile_elems, device=x.device)
    fn(x, out, rounds)
    return out


def expected_gather(x: torch.Tensor, cfg: GatherHarnessConfig, rounds: int) -> torch.Tensor:
    C = cfg.cluster_size
    xd = x.double().cpu().view(cfg.num_clusters, 1, C, cfg.tile_elems)
    ref = rounds * xd + rounds * (rounds - 1) / 2
    return ref.expand(cfg.num_clusters, C, C, cfg.tile_elems).reshape(cfg.grid, C, cfg.tile_elems)
