"""Every collective configuration compiles for sm_90a without a GPU, and the
PTX holds the cluster instructions the design relies on."""

import re

import pytest

from cf_cute.collective_kernels import (
    GatherHarnessConfig, GatherHarnessKernel, GlobalExchangeConfig, GlobalExchangeKernel,
    ReduceHarnessConfig, ReduceHarnessKernel,
)
from cf_cute.jit import ScalarSpec, TensorSpec, compile_for_inspection

CLUSTER_INSNS = ("mapa.shared::cluster", "mbarrier.try_wait.parity", "barrier.cluster.arrive",
                 "barrier.cluster.wait", "mbarrier.arrive.expect_tx")
ST_ASYNC = "st.async.shared::cluster.mbarrier::complete_tx::bytes"
BULK = "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes"
FENCE_ASYNC = "fence.proxy.async.shared::cta"


def _check_transport(ptx, transport):
    if transport == "bulk":
        assert BULK in ptx and FENCE_ASYNC in ptx
    else:
        assert ST_ASYNC in ptx


ATOMIC = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", re.M)


def _reduce_ptx(cfg):
    k = ReduceHarnessKernel(cfg)
    c = compile_for_inspection(ReduceHarnessKernel, cfg, [
        TensorSpec("float32", (cfg.grid, cfg.num_elems)),
        TensorSpec("float32", (cfg.grid, k.out_cols)), ScalarSpec()])
    return c.__ptx__, k.red.plan


def _gather_ptx(cfg):
    c = compile_for_inspection(GatherHarnessKernel, cfg, [
        TensorSpec(cfg.dtype, (cfg.grid, cfg.tile_elems)),
        TensorSpec("float32", (cfg.grid, cfg.cluster_size, cfg.tile_elems)), ScalarSpec()])
    return c.__ptx__


@pytest.mark.parametrize("cluster", list(range(1, 17)))
def test_all_reduce_compiles_every_cluster_size(cluster):
    ptx, plan = _reduce_ptx(ReduceHarnessConfig(num_elems=64, cluster_size=cluster))
    if cluster == 1:
        assert "st.async" not in ptx
    else:
        for insn in CLUSTER_INSNS:
            assert insn in ptx, insn
        _check_transport(ptx, plan.transport)
        assert "mbarrier.arrive.release.cluster" in ptx  # remote release of the empty barrier
        assert not ATOMIC.search(ptx)                     # no atomics anywhere


@pytest.mark.parametrize("cluster", [2, 4, 8, 16])
@pytest.mark.parametrize("n,alg,scatter", [(1, "auto", False), (4, "auto", False), (256, "direct", False),
                                           (256, "split", False), (4096, "split", False),
                                           (1024, "auto", True), (4096, "auto", True)])
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("transport", ["auto", "st_async"])
def test_reduce_variants_compile(cluster, n, alg, scatter, op, transport):
    ptx, plan = _reduce_ptx(ReduceHarnessConfig(num_elems=n, cluster_size=cluster, op=op, algorithm=alg,
                                                scatter=scatter, transport=transport))
    for insn in CLUSTER_INSNS:
        assert insn in ptx, insn
    _check_transport(ptx, plan.transport)
    if plan.transport == "st_async" and n >= 16:
        assert ST_ASYNC + ".v4" in ptx


@pytest.mark.parametrize("stages", [1, 2])
def test_late_warp_harness_compiles(stages):
    """The harness of test_collectives_gpu's late-warp test: a clock64 spin before each round."""
    ptx, plan = _reduce_ptx(ReduceHarnessConfig(num_elems=512, cluster_size=2, scatter=True, stages=stages,
                                                skew_cycles=100_000))
    assert "%clock64" in ptx and ST_ASYNC + ".v4" in ptx and plan.algorithm == "split"


@pytest.mark.parametrize("cluster", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("dtype,elems", [("float32", 1), ("bfloat16", 2), ("bfloat16", 512),
                                         ("float32", 4096), ("int32", 100)])
def test_gather_compiles(cluster, dtype, elems):
    if cluster == 16 and elems == 4096:
        elems = 3072     # 16 tiles of 16 KB exceed shared memory (test_plan); 12 KB is the largest
    cfg = GatherHarnessConfig(tile_elems=elems, cluster_size=cluster, dtype=dtype,
                              from_registers=(elems == 512))
    ptx = _gather_ptx(cfg)
    transport = GatherHarnessKernel(cfg).gat.plan.transport
    if cluster > 1:
        for insn in CLUSTER_INSNS:
            assert insn in ptx, insn
        _check_transport(ptx, transport)


def test_global_exchange_baseline_compiles():
    cfg = GlobalExchangeConfig(num_elems=256, cluster_size=4)
    k = GlobalExchangeKernel(cfg)
    c = compile_for_inspection(GlobalExchangeKernel, cfg, [
        TensorSpec("float32", (cfg.grid, 256)), TensorSpec("float32", (cfg.grid, k.out_cols)),
        TensorSpec("float32", (2 * 2 * 4, 256)), ScalarSpec()])
    assert "barrier.cluster.arrive" in c.__ptx__ and "st.async" not in c.__ptx__
    assert "st.global.v4" in c.__ptx__ and "ld.global.v4" in c.__ptx__


@pytest.mark.parametrize("sync", [False, True])
def test_launch_probe_compiles(sync):
    """benchmarks/bench_launch.py's empty launch: cluster barriers only when asked for."""
    from cf_cute.collective_kernels import LaunchProbeConfig, LaunchProbeKernel
    from cf_cute.jit import TensorSpec, compile_for_inspection
    cfg = LaunchProbeConfig(num_ctas=128, cluster_size=4, cluster_sync=sync)
    ptx = compile_for_inspection(LaunchProbeKernel, cfg, [TensorSpec("int32", (128,), align=4)]).__ptx__
    assert ("barrier.cluster.arrive" in ptx) is sync and "st.global" in ptx
    with pytest.raises(ValueError, match="divisible"):
        LaunchProbeKernel(LaunchProbeConfig(num_ctas=130, cluster_size=4))
