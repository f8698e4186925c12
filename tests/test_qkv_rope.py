"""Fused (residual) + RMSNorm + QKV + RoPE + KV append (first half of issue 3)."""

import dataclasses
import math

import pytest
import torch

from conftest import make_kv_cache

from cf_cute.fused.qkv_project import QKVProject
from cf_cute.fused.qkv_rope import QKVRope, QKVRopeConfig
from cf_cute.jit import compile_for_inspection
from cf_cute.qkv_rope import (arg_specs, pack_qkv, project_grid, qkv_project, qkv_project_config, qkv_rope,
                              qkv_rope_config)
from cf_cute.reference import apply_rope, rms_norm, rope_tables


@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("heads,kv_heads,hd", [(32, 32, 128), (32, 8, 128)])
@pytest.mark.parametrize("batch", [1, 16])
def test_compiles(cluster, heads, kv_heads, hd, batch):
    kw = dict(batch=batch, hidden=4096, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
              max_len=2048, max_positions=2048, cluster_size=cluster, has_residual=True)
    # h is re-read from L2, not kept in shared memory: even batch 16 on one CTA fits
    cfg = QKVRopeConfig(**kw)
    ptx = compile_for_inspection(QKVRope, cfg, arg_specs(cfg)).__ptx__
    if cluster > 1:
        assert "st.async.shared::cluster" in ptx and "barrier.cluster" in ptx


@pytest.mark.parametrize("style,paged", [("gptj", False), ("neox", True)])
def test_compiles_variants(style, paged):
    cfg = QKVRopeConfig(batch=3, hidden=2048, num_heads=8, num_kv_heads=2, head_dim=64, max_len=256,
                        max_positions=256, cluster_size=4, rope_style=style, paged=paged, num_pages=64)
    compile_for_inspection(QKVRope, cfg, arg_specs(cfg))


@pytest.mark.parametrize("heads,kv_heads,hd,H,batch,style,paged", [
    (32, 32, 128, 4096, 16, "neox", False), (32, 8, 128, 4096, 16, "neox", True),
    (32, 8, 128, 4096, 1, "gptj", False), (16, 4, 64, 2048, 5, "gptj", True), (8, 2, 64, 512, 3, "neox", False)])
def test_project_compiles(heads, kv_heads, hd, H, batch, style, paged):
    m = dict(device="meta", dtype=torch.bfloat16)
    L = 512
    kv = (batch * L // 16 + 5, 16, kv_heads, hd) if paged else (batch, L, kv_heads, hd)
    table = torch.empty(batch, L // 16, dtype=torch.int32, device="meta") if paged else None
    cfg = qkv_project_config(torch.empty(batch, H, **m), torch.empty(kv_heads, (heads // kv_heads + 2) * hd, H, **m),
                             torch.empty(L, hd // 2, dtype=torch.float32, device="meta"), torch.empty(*kv, **m),
                             table, num_heads=heads, num_kv_heads=kv_heads, rope_style=style, eps=1e-5,
                             has_residual=True)
    assert cfg.num_clusters * cfg.cluster_size <= 132
    ptx = compile_for_inspection(QKVProject, cfg, arg_specs(cfg)).__ptx__
    assert "mma.sync.aligned.m16n8k16" in ptx
    if cfg.cluster_size > 1:
        assert "st.async.shared::cluster" in ptx and "barrier.cluster" in ptx


@pytest.mark.parametrize("grid_wide", [False, True])
def test_tiled_weights_compile_to_the_same_loads(grid_wide):
    """The tiled order (cf_cute.tiles) changes addresses only, for both QKV kernels."""
    m = dict(device="meta", dtype=torch.bfloat16)
    counts = {}
    for layout in ("linear", "tiled"):
        args = (torch.empty(1, 4096, **m), torch.empty(8, 6 * 128, 4096, **m),
                torch.empty(512, 64, dtype=torch.float32, device="meta"), torch.empty(1, 512, 8, 128, **m), None)
        kw = dict(num_heads=32, num_kv_heads=8, rope_style="neox", eps=1e-5, has_residual=False, layout=layout)
        cfg = qkv_project_config(*args, **kw) if grid_wide else qkv_rope_config(*args, cluster_size=4, **kw)
        assert cfg.w_layout == layout and not cfg.l2_prefetch
        cfg = dataclasses.replace(cfg, l2_prefetch=True)           # the knob's loads keep their count too
        ptx = compile_for_inspection(QKVProject if grid_wide else QKVRope, cfg, arg_specs(cfg)).__ptx__
        counts[layout] = [ptx.count(s) for s in ("ld.global.v4", "mma.sync", "cp.async.bulk.prefetch.L2")]
    assert counts["tiled"] == counts["linear"] and min(counts["tiled"]) > 0


def test_project_grid_balances_the_units():
    # Llama-2-7B: 384 units over 64 clusters of 2, six each; Llama-3-8B: 192 units, K parts of 4
    assert project_grid(384, 4096) == (2, 2, 64)
    assert project_grid(192, 4096) == (2, 4, 64)
    assert project_grid(24, 3072) == (2, 4, 24)          # fewer units than clusters: the K parts split further
    assert project_grid(24, 3136)[0] == 1                # 3136 = 49 * 64 does not split over 2 CTAs
    with pytest.raises(ValueError):
        project_grid(24, 96)


def test_shared_memory_overflow_is_a_clear_error():
    cfg = QKVRopeConfig(batch=16, hidden=8192, num_heads=64, num_kv_heads=8, head_dim=128, max_len=256,
                        max_positions=256, cluster_size=1)
    with pytest.raises(ValueError, match="shared memory"):
        QKVRope(cfg)


def test_bad_shapes_and_positions_raise():
    B, H, hd = 2, 1024, 64
    wq, wk, wv = torch.randn(8 * hd, H), torch.randn(2 * hd, H), torch.randn(2 * hd, H)
    w = pack_qkv(wq, wk, wv, 8, 2).bfloat16()
    assert w.shape == (2, 6 * hd, H)
    assert torch.equal(w[1, :4 * hd], wq[4 * hd:].bfloat16()) and torch.equal(w[1, 5 * hd:], wv[hd:].bfloat16())
    hidden = torch.randn(B, H, dtype=torch.bfloat16)
    cos, sin = rope_tables(64, hd)
    kc = torch.zeros(B, 64, 2, hd, dtype=torch.bfloat16)
    args = dict(num_heads=8, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 63\]"):
        qkv_rope(hidden, torch.ones(H, dtype=torch.bfloat16), w, cos, sin, torch.tensor([3, 64], dtype=torch.int32),
                 kc, kc.clone(), **args)
    with pytest.raises(ValueError, match="w_qkv must be"):
        qkv_rope(hidden, torch.ones(H, dtype=torch.bfloat16), w[:, :-hd].contiguous(), cos, sin,
                 torch.tensor([3, 4], dtype=torch.int32), kc, kc.clone(), **args)
    with pytest.raises(ValueError, match="multiple of cluster_size"):
        qkv_rope(hidden, torch.ones(H, dtype=torch.bfloat16), w, cos, sin, torch.tensor([3, 4], dtype=torch.int32),
                 kc, kc.clone(), cluster_size=3, **args)
    with pytest.raises(ValueError, match="CUDA device"):
        qkv_rope(hidden, torch.ones(H, dtype=torch.bfloat16), w, cos, sin, torch.tensor([3, 4], dtype=torch.int32),
                 kc, kc.clone(), **args)
    assert torch.count_nonzero(kc) == 0                  # nothing written


# the GPU cases of test_matches_reference (benchmarks/prebuild.py compiles exactly these)
MATCH_SHAPES = [(32, 32, 128, 4096), (32, 8, 128, 4096), (16, 4, 64, 2048)]     # heads, kv_heads, hd, H
MATCH_BATCHES = [1, 5, 16]
MATCH_VARIANTS = [("neox", False, True), ("gptj", True, False)]                  # style, paged, residual
MATCH_LEN = 512


def match_cluster(batch: int) -> int:
    """qkv_rope's cluster size in test_matches_reference."""
    return 4 if batch < 16 else 8


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,hd,H", MATCH_SHAPES)
@pytest.mark.parametrize("batch", MATCH_BATCHES)
@pytest.mark.parametrize("style,paged,residual", MATCH_VARIANTS)
@pytest.mark.parametrize("grid_wide", [False, True])
def test_matches_reference(heads, kv_heads, hd, H, batch, style, paged, residual, grid_wide):
    dev, dt = "cuda", torch.bfloat16
    L = MATCH_LEN
    s = 1 / math.sqrt(H)
    wq = torch.randn(heads * hd, H, device=dev) * s
    wk = torch.randn(kv_heads * hd, H, device=dev) * s
    wv = torch.randn(kv_heads * hd, H, device=dev) * s
    w = pack_qkv(wq, wk, wv, heads, kv_heads).to(dt)
    norm_w = (1 + 0.1 * torch.randn(H, device=dev)).to(dt)
    hidden = torch.randn(batch, H, device=dev, dtype=dt)
    res = torch.randn(batch, H, device=dev, dtype=dt) if residual else None
    positions = torch.randint(0, L, (batch,), dtype=torch.int32)
    cos, sin = rope_tables(L, hd, 500000.0)
    kc, vc, table = make_kv_cache(batch, L, kv_heads, hd, paged, dev, dt)
    k0, v0 = kc.clone(), vc.clone()
    args = (hidden, norm_w, w, cos.to(dev), sin.to(dev), positions, kc, vc)
    kw = dict(num_heads=heads, num_kv_heads=kv_heads, residual=res, page_table=table, rope_style=style)
    if grid_wide:
        q, h = qkv_project(*args, **kw)
    else:
        q, h = qkv_rope(*args, cluster_size=match_cluster(batch), **kw)
    # reference
    hf = hidden.float() + (res.float() if residual else 0)
    x = rms_norm(hf, norm_w, 1e-5).to(dt).float()
    pos = positions.long()
    qr = apply_rope((x @ wq.to(dt).float().T).view(batch, heads, hd), cos[pos].to(dev), sin[pos].to(dev), style)
    kr = apply_rope((x @ wk.to(dt).float().T).view(batch, kv_heads, hd), cos[pos].to(dev), sin[pos].to(dev), style)
    vr = (x @ wv.to(dt).float().T).view(batch, kv_heads, hd)
    assert (q.float() - qr).norm() / qr.norm() < 1e-2
    if residual:
        torch.testing.assert_close(h.float(), hf, rtol=1e-2, atol=1e-2)
    for b in range(batch):
        p = int(pos[b])
        if paged:
            page, row = int(table[b, p // 16]), p % 16
            kb, vb = kc[page, row].clone(), vc[page, row].clone()
            kc[page, row], vc[page, row] = k0[page, row], v0[page, row]
        else:
            kb, vb = kc[b, p].clone(), vc[b, p].clone()
            kc[b, p], vc[b, p] = k0[b, p], v0[b, p]
        assert (kb.float() - kr[b]).norm() / kr[b].norm() < 1e-2
        assert (vb.float() - vr[b]).norm() / vr[b].norm() < 1e-2
    assert torch.equal(kc, k0) and torch.equal(vc, v0)      # nothing else in the caches was touched
