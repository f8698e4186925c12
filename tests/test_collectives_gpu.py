"""ClusterReduce / ClusterGather on the GPU: exact results on integer-valued
data after 100+ rounds in one launch, every CTA's result checked, bitwise
determinism, and the global-memory baseline computing the same thing."""

import pytest
import torch
from conftest import finish_or_exit

from cf_cute.collective_kernels import GatherHarnessConfig, GlobalExchangeConfig, ReduceHarnessConfig
from cf_cute.collectives import (
    expected_gather, expected_reduce, gather_rounds, global_exchange_rounds, reduce_rounds,
)

pytestmark = pytest.mark.gpu
ROUNDS = 130


def _int_data(rows, cols, dtype=torch.float32):
    return torch.randint(-8, 9, (rows, cols), device="cuda").to(dtype)


def _assert_exact(out, ref):
    out = out.double().cpu()
    nan_ref = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan_ref), "written / untouched positions differ from the plan"
    assert torch.equal(out[~nan_ref], ref[~nan_ref]), \
        f"max abs err {(out[~nan_ref] - ref[~nan_ref]).abs().max().item()}"


@pytest.mark.parametrize("cluster", list(range(1, 17)))
def test_all_reduce_every_cluster_size(cluster):
    cfg = ReduceHarnessConfig(num_elems=64, cluster_size=cluster)
    x = _int_data(cfg.grid, cfg.num_elems)
    _assert_exact(reduce_rounds(x, cfg, ROUNDS), expected_reduce(x, cfg, ROUNDS))


@pytest.mark.parametrize("cluster", [2, 4, 8, 16])
@pytest.mark.parametrize("n", [1, 3, 4, 256, 1024, 4096])
@pytest.mark.parametrize("alg", ["direct", "split"])
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("transport", ["st_async", "bulk"])
def test_all_reduce_sizes_ops_algorithms(cluster, n, alg, op, transport):
    if alg == "direct" and cluster * n * 4 * 2 > 200 * 1024:
        pytest.skip("direct receive ring does not fit in shared memory")
    if alg == "split" and n % cluster:
        pytest.skip("split needs num_elems divisible by the cluster size")
    msg = 4 * n if alg == "direct" else 4 * n // cluster
    if transport == "bulk" and msg % 16:
        pytest.skip("bulk copies move 16-byte multiples")
    cfg = ReduceHarnessConfig(num_elems=n, cluster_size=cluster, op=op, algorithm=alg, transport=transport)
    x = _int_data(cfg.grid, n)
    _assert_exact(reduce_rounds(x, cfg, ROUNDS), expected_reduce(x, cfg, ROUNDS))


@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n", [64, 512, 4096])
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("transport", ["st_async", "bulk"])
def test_reduce_scatter(cluster, n, op, transport):
    if transport == "bulk" and (n // cluster) % 4:
        pytest.skip("bulk copies move 16-byte multiples")
    cfg = ReduceHarnessConfig(num_elems=n, cluster_size=cluster, op=op, scatter=True, transport=transport)
    x = _int_data(cfg.grid, n)
    _assert_exact(reduce_rounds(x, cfg, ROUNDS), expected_reduce(x, cfg, ROUNDS))


@pytest.mark.parametrize("cluster", [2, 4])
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("transport", ["st_async", "bulk"])
def test_reduce_scatter_with_a_late_warp(cluster, stages, transport):
    """Warp 0 of rank 0 (threads that keep their own slice and send nothing) comes to
    every round ~50 µs late, after the peers finished the round: it must neither hang
    nor read a wrong round (it did hang before the owner-side fix, see cluster_reduce)."""
    cfg = ReduceHarnessConfig(num_elems=512, cluster_size=cluster, scatter=True, stages=stages,
                              transport=transport, skew_cycles=100_000)
    x = _int_data(cfg.grid, cfg.num_elems)
    out = finish_or_exit(lambda: reduce_rounds(x, cfg, 12), 30, f"reduce-scatter, late warp, {cfg}")
    _assert_exact(out, expected_reduce(x, cfg, 12))


@pytest.mark.parametrize("stages", [1, 4])
def test_all_reduce_other_stage_counts(stages):
    cfg = ReduceHarnessConfig(num_elems=256, cluster_size=8, stages=stages)
    x = _int_data(cfg.grid, 256)
    _assert_exact(reduce_rounds(x, cfg, ROUNDS), expected_reduce(x, cfg, ROUNDS))


@pytest.mark.parametrize("alg", ["direct", "split"])
@pytest.mark.parametrize("transport", ["st_async", "bulk"])
def test_all_reduce_bitwise_deterministic_and_identical_in_every_cta(alg, transport):
    cfg = ReduceHarnessConfig(num_elems=1024, cluster_size=8, algorithm=alg, num_clusters=4,
                              transport=transport)
    x = torch.randn(cfg.grid, 1024, device="cuda") * 1e3     # non-integer: rounding order matters
    runs = [reduce_rounds(x, cfg, 37) for _ in range(5)]
    for r in runs[1:]:
        assert torch.equal(r.view(torch.int32), runs[0].view(torch.int32))
    per_cluster = runs[0].view(cfg.num_clusters, cfg.cluster_size, -1)
    assert torch.equal(per_cluster.view(torch.int32), per_cluster[:, :1].expand_as(per_cluster).view(torch.int32))
    # and it is the sum (to fp32 rounding)
    ref = expected_reduce(x, cfg, 37)
    torch.testing.assert_close(runs[0].double().cpu(), ref, rtol=1e-5, atol=1e-2)


def test_global_exchange_baseline_matches_dsmem():
    cfg = ReduceHarnessConfig(num_elems=256, cluster_size=4)
    gcfg = GlobalExchangeConfig(num_elems=256, cluster_size=4)
    x = _int_data(cfg.grid, 256)
    _assert_exact(global_exchange_rounds(x, gcfg, ROUNDS), expected_reduce(x, cfg, ROUNDS))


@pytest.mark.parametrize("cluster", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("dtype,elems", [("float32", 1), ("bfloat16", 2), ("bfloat16", 512),
                                         ("int32", 100), ("float32", 4096)])
@pytest.mark.parametrize("from_registers", [False, True])
@pytest.mark.parametrize("transport", ["st_async", "bulk"])
def test_gather(cluster, dtype, elems, from_registers, transport):
    if cluster == 16 and elems == 4096:
        elems = 3072
    cfg = GatherHarnessConfig(tile_elems=elems, cluster_size=cluster, dtype=dtype,
                              from_registers=from_registers, transport=transport)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int32": torch.int32}[dtype]
    x = _int_data(cfg.grid, elems, tdt)
    out = gather_rounds(x, cfg, ROUNDS)
    torch.testing.assert_close(out.double().cpu(), expected_gather(x, cfg, ROUNDS), rtol=0, atol=0)


def test_gather_deterministic():
    cfg = GatherHarnessConfig(tile_elems=1024, cluster_size=8, dtype="float32")
    x = torch.randn(cfg.grid, 1024, device="cuda")
    a, b = gather_rounds(x, cfg, 17), gather_rounds(x, cfg, 17)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
