"""The composition example: split-K GEMV finished by a cluster reduce-scatter."""

import pytest
import torch

from cf_cute.fused.splitk_gemv import SplitKGemv, SplitKGemvConfig
from cf_cute.gemv import arg_specs, splitk_gemv
from cf_cute.jit import compile_for_inspection
from cf_cute.tiles import tile_weight


@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["linear", "tiled"])
def test_gemv_compiles(cluster, batch, layout):
    cfg = SplitKGemvConfig(m=256, k=4096, batch=batch, cluster_size=cluster, w_layout=layout)
    c = compile_for_inspection(SplitKGemv, cfg, arg_specs(cfg))
    assert "ld.global.v4" in c.__ptx__ or "ld.global.nc.v4" in c.__ptx__
    if cluster > 1:
        assert "st.async.shared::cluster" in c.__ptx__


def test_gemv_rejects_bad_input_before_launch():
    w = torch.randn(256, 4096, dtype=torch.bfloat16)
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x must be bfloat16"):
        splitk_gemv(x.half(), w)
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 4096\]"):
        splitk_gemv(x[:, :2048], w)
    with pytest.raises(ValueError, match="multiple of cluster_size"):
        splitk_gemv(x[:, :1000].contiguous(), w[:, :1000].contiguous())
    with pytest.raises(ValueError, match="cluster size"):
        splitk_gemv(x, w, cluster_size=32)
    with pytest.raises(ValueError, match="CUDA device"):
        splitk_gemv(x, w)
    with pytest.raises(ValueError, match="contiguous"):
        splitk_gemv(x, torch.randn(4096, 256, dtype=torch.bfloat16).t())


def _ref(x, w):
    return (x.double() @ w.double().T).float()


@pytest.mark.gpu
@pytest.mark.parametrize("cluster,batch", [(1, 1), (4, 5), (8, 16)])
def test_tiled_weight_gives_the_same_bits(cluster, batch):
    w = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(batch, 512, device="cuda", dtype=torch.bfloat16)
    y = splitk_gemv(x, w, residual=r, cluster_size=cluster)
    out = torch.full_like(y, float("nan"))
    splitk_gemv(x, tile_weight(w), residual=r, cluster_size=cluster, out=out, layout="tiled")
    assert torch.isfinite(y).all() and torch.equal(out, y)


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_torch(cluster, batch, dtype):
    m, k = 512, 4096
    w = torch.randn(m, k, device="cuda", dtype=dtype)
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    out = torch.full((batch, m), float("nan"), device="cuda", dtype=dtype)
    y = splitk_gemv(x, w, cluster_size=cluster, out=out)
    ref = _ref(x, w)
    err = (y.float() - ref).norm() / ref.norm()
    assert err < 1e-2, err
    assert torch.equal(splitk_gemv(x, w, cluster_size=cluster), y)      # deterministic
    r = torch.randn(batch, m, device="cuda", dtype=dtype)
    yr = splitk_gemv(x, w, residual=r, cluster_size=cluster)
    ref_r = ref + r.float()
    assert (yr.float() - ref_r).norm() / ref_r.norm() < 1e-2


@pytest.mark.gpu
def test_gemv_side_stream_graph_and_compile():
    m, k = 1024, 4096
    w = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
    ref = splitk_gemv(x, w)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = splitk_gemv(x, w)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(y, ref)
    # CUDA graph capture through the custom op, replay on new inputs
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = torch.ops.cf_cute.splitk_gemv(static_x, w, 4, 64)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, splitk_gemv(x2, w))
    # torch.compile traces the custom op
    f = torch.compile(lambda a: torch.ops.cf_cute.splitk_gemv(a, w, 4, 64) * 2, fullgraph=True)
    assert torch.equal(f(x), ref * 2)
