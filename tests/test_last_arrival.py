"""last_arrival / warp_last_arrival: the last CTA (warp) of a group, in any placement and any
number of waves, sees every other member's writes and combines them in a fixed order."""

import pytest
import torch

from cf_cute.collective_kernels import LastArrivalHarnessConfig, LastArrivalHarnessKernel
from cf_cute.jit import TensorSpec, compile_for_inspection, compile_kernel


def _specs(cfg):
    G, S, T = cfg.groups, cfg.members, cfg.width
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
    with pytest.raises(ValueError, match="multiple of the 4 warps"):
        LastArrivalHarnessKernel(LastArrivalHarnessConfig(groups=1, members=6, per_warp=True))


def test_warp_arrival_compiles_to_one_lane_atomic():
    cfg = LastArrivalHarnessConfig(groups=4, members=8, per_warp=True)
    ptx = compile_for_inspection(LastArrivalHarnessKernel, cfg, _specs(cfg)).__ptx__
    atoms = [line.strip() for line in ptx.splitlines() if "atom." in line]
    assert len(atoms) == 1 and "atom.global.acq_rel.add.u32" in atoms[0], atoms
    assert "fence.acq_rel.gpu" in ptx and "shfl.sync" in ptx and "bar.warp.sync" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("groups,members,per_warp", [(1, 1, False), (3, 7, False), (8, 400, False),  # 3200 CTAs
                                                     (1, 4, True), (3, 28, True), (8, 1600, True)])   # 3200 CTAs
def test_last_arrival_combines_every_member_in_order(groups, members, per_warp):
    cfg = LastArrivalHarnessConfig(groups=groups, members=members, per_warp=per_warp)
    fn = compile_kernel(LastArrivalHarnessKernel, cfg, _specs(cfg))
    T = cfg.width
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
