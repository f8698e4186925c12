"""The attention block from torch against the fp32 reference (GPU), and its
input checks (CPU)."""

import math

import pytest
import torch

from conftest import make_kv_cache

from cf_cute.attention import attention_block, pack_attention
from cf_cute.reference import AttentionWeights, ContiguousKV, PagedKV, rope_tables
from cf_cute.reference import attention_block as reference_block


def _weights(H, heads, kv_heads, hd, device, dtype):
    s = 1 / math.sqrt(H)
    return AttentionWeights(norm=(1 + 0.1 * torch.randn(H, device=device)).to(dtype),
                            wq=(torch.randn(heads * hd, H, device=device) * s).to(dtype),
                            wk=(torch.randn(kv_heads * hd, H, device=device) * s).to(dtype),
                            wv=(torch.randn(kv_heads * hd, H, device=device) * s).to(dtype),
                            wo=(torch.randn(H, heads * hd, device=device) / math.sqrt(heads * hd)).to(dtype))


def test_positions_past_the_cache_are_rejected_and_nothing_is_written():
    H, heads, kv, hd, B, L = 1024, 8, 2, 64, 2, 64
    w = pack_attention(_weights(H, heads, kv, hd, "cpu", torch.bfloat16), num_heads=heads, num_kv_heads=kv)
    kc = torch.zeros(B, L, kv, hd, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    cos, sin = rope_tables(L, hd)
    with pytest.raises(ValueError, match="positions must lie"):
        attention_block(torch.randn(B, H, dtype=torch.bfloat16), w, kc, vc,
                        torch.tensor([5, L], dtype=torch.int32), cos, sin)
    assert torch.count_nonzero(kc) == 0 and torch.count_nonzero(vc) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,hd,H", [(32, 32, 128, 4096), (32, 8, 128, 4096), (16, 4, 64, 2048)])
@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("paged,residual", [(False, True), (True, False)])
def test_matches_reference(heads, kv_heads, hd, H, batch, paged, residual):
    dev, dt = "cuda", torch.bfloat16
    L = 1024
    wts = _weights(H, heads, kv_heads, hd, dev, dt)
    packed = pack_attention(wts, num_heads=heads, num_kv_heads=kv_heads)
    hidden = torch.randn(batch, H, device=dev, dtype=dt)
    res = torch.randn(batch, H, device=dev, dtype=dt) if residual else None
    positions = torch.randint(0, L, (batch,), dtype=torch.int32)
    positions[0] = 0                                   # context of one token
    cos, sin = rope_tables(L, hd, 500000.0)
    kc, vc, table = make_kv_cache(batch, L, kv_heads, hd, paged, dev, dt)
    ref_cache = (PagedKV(kc.float().cpu(), vc.float().cpu(), table) if paged
                 else ContiguousKV(kc.float().cpu(), vc.float().cpu()))
    cpu_w = AttentionWeights(*(t.float().cpu() for t in (wts.norm, wts.wq, wts.wk, wts.wv, wts.wo)))
    ref = reference_block(hidden.cpu(), cpu_w, ref_cache, positions, cos, sin, num_heads=heads,
                          num_kv_heads=kv_heads, residual=None if res is None else res.cpu())
    out = attention_block(hidden, packed, kc, vc, positions, cos.to(dev), sin.to(dev), residual=res,
                          page_table=table)
    assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    torch.testing.assert_close(kc.float().cpu(), ref_cache.k, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(vc.float().cpu(), ref_cache.v, rtol=2e-2, atol=2e-2)
