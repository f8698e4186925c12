"""GridBarrier: every CTA of a launch waits for every other, launch after launch."""

import pytest
import torch

from cf_cute.collective_kernels import GridBarrierHarnessConfig, GridBarrierHarnessKernel
from cf_cute.jit import ScalarSpec, TensorSpec, compile_for_inspection, compile_kernel
from cf_cute.primitives import GridBarrier


def _specs(cfg):
    return [TensorSpec("int32", (2, cfg.num_ctas), align=4), TensorSpec("int32", (2,), align=4),
            TensorSpec("int32", (cfg.num_ctas,), align=4), ScalarSpec()]


@pytest.mark.parametrize("ctas,cluster", [(1, 1), (132, 1), (128, 4)])
def test_compiles_with_gpu_scope_atomics(ctas, cluster):
    cfg = GridBarrierHarnessConfig(num_ctas=ctas, cluster_size=cluster)
    ptx = compile_for_inspection(GridBarrierHarnessKernel, cfg, _specs(cfg)).__ptx__
    assert "atom.global.acq_rel.add" in ptx and "fence.acq_rel.gpu" in ptx   # atom's scope defaults to gpu
    assert "ld.acquire.gpu.global" in ptx and "st.release.gpu.global" in ptx


def test_bad_size():
    with pytest.raises(ValueError, match="num_ctas"):
        GridBarrier(0)


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 4])
def test_barrier_orders_every_round(cluster):
    from cf_cute.primitives import max_resident_clusters
    n = max_resident_clusters(cluster) * cluster
    cfg = GridBarrierHarnessConfig(num_ctas=n, cluster_size=cluster)
    fn = compile_kernel(GridBarrierHarnessKernel, cfg, _specs(cfg))
    state = torch.zeros(2, dtype=torch.int32, device="cuda")
    slots = torch.zeros(2, n, dtype=torch.int32, device="cuda")
    for launch in range(3):                      # the state needs no reset between launches
        out = torch.full((n,), -1, dtype=torch.int32, device="cuda")
        rounds = 101
        fn(slots, state, out, rounds)
        expect = sum(7 * n * (n - 1) // 2 + n * r for r in range(rounds))
        assert torch.all(out == expect), (launch, out.min().item(), out.max().item(), expect)
        assert state[0].item() == 0
