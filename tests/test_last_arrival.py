"""last_arrival: the last CTA of a group, in any placement and any number of waves, sees
every other member's writes and combines them in a fixed order."""

import pytest
import torch

from cf_cute.collective_kernels import LastArrivalHarnessConfig, LastArrivalHarnessKernel
from cf_cute.jit import TensorSpec, compile_for_inspection, compile_kernel


def _specs(cfg):
    G, S, T = cfg.groups, cfg.members, cfg.num_threads
    return [TensorSpec("float32", (G, S, T), align=4), TensorSpec("float32", (G, S, T), align=4),
            TensorSpec("int32", (G,), align=4), TensorSpec("float32", (G, T), align=4),
            TensorSpec("int32", (G,), align=4)]


def test_compiles_to_one_gpu_scope_integer_atomic():
    cfg = LastArrivalHarnessConfig(groups=4, members=3)
    ptx = compile_for_inspection(LastArrivalHarnessKernel, cfg, _specs(cfg)).__ptx__
    atoms = [line.strip() for line in ptx.splitlines() if "atom." in line]
    assert len(atoms) == 1 and "atom.global.acq_rel.add.u32" in atoms[0], atoms   # scope defaults to gpu
    assert "fence.acq_rel.gpu" in ptx


def test_bad_size():
    with pytest.raises(ValueError, match="positive"):
        LastArrivalHarnessKernel(LastArrivalHarnessConfig(groups=1, members=0))


@pytest.mark.gpu
@pytest.mark.parametrize("groups,members", [(1, 1), (3, 7), (8, 400)])   # 3200 CTAs: several waves
def test_last_arrival_combines_every_member_in_order(groups, members):
    cfg = LastArrivalHarnessConfig(groups=groups, members=members)
    fn = compile_kernel(LastArrivalHarnessKernel, cfg, _specs(cfg))
    T = cfg.num_threads
    x = torch.randn(groups, members, T, device="cuda")
    expect = torch.zeros(groups, T)
    for s in range(members):                 # fp32, member order: the same bits as the kernel's sum
        expect = expect + x[:, s].cpu()
    work = torch.zeros_like(x)
    count = torch.zeros(groups, dtype=torch.int32, device="cuda")
    for _ in range(3):                       # the counters reset themselves
        out = torch.full((groups, T), float("nan"), device="cuda")
        last = torch.full((groups,), -1, dtype=torch.int32, device="cuda")
        fn(x, work, count, out, last)
        assert torch.equal(out.cpu(), expect)
        assert ((last >= 0) & (last < members)).all()
        assert (count == 0).all()
