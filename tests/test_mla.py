"""MLA host side (issue 6): packing for the absorbed form, input checks, and the
torch decode step that the fused kernel will be benchmarked against, checked
against the fp32 references of cf_cute.reference_mla (which match transformers)."""

import math

import pytest
import torch

from cf_cute.mla import check_mla_operands, mla_decode_torch, pack_mla
from cf_cute.reference_mla import (LatentCache, MLAShape, MLAWeights, PagedLatentCache, mla_attention_block,
                                   mla_attention_block_absorbed, mla_rope_tables, mla_softmax_scale)

SHAPE = MLAShape(hidden=256, num_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
            mscale=0.707, mscale_all_dim=0.707)


def _weights(S: MLAShape, dtype=torch.float32, device="cpu") -> MLAWeights:
    H, r = S.hidden, S.kv_lora_rank
    w = MLAWeights(norm=1 + 0.1 * torch.randn(H), wq=torch.randn(S.num_heads * S.qk_head_dim, H) / math.sqrt(H),
                   wkv_a=torch.randn(S.latent_dim, H) / math.sqrt(H), kv_norm=1 + 0.1 * torch.randn(r),
                   wkv_b=torch.randn(S.num_heads * (S.qk_nope_head_dim + S.v_head_dim), r) / math.sqrt(r),
                   wo=torch.randn(H, S.num_heads * S.v_head_dim) / math.sqrt(S.num_heads * S.v_head_dim))
    return MLAWeights(*(t.to(device, dtype) for t in (w.norm, w.wq, w.wkv_a, w.kv_norm, w.wkv_b, w.wo)))


def _case(S, B, L, paged, dtype=torch.float32, device="cpu", P=16):
    """Random weights, activations and cache contents; positions: context 1, odd, the last slot."""
    w = _weights(S, dtype, device)
    positions = torch.tensor([0, 21, L - 1][:B] + [7] * max(0, B - 3), dtype=torch.int32)
    hidden = torch.randn(B, S.hidden).to(device, dtype)
    residual = torch.randn(B, S.hidden).to(device, dtype)
    ctx = torch.randn(B, L, S.latent_dim).to(device, dtype)
    if paged:
        table = torch.randperm(B * L // P + 3)[: B * L // P].view(B, L // P).to(torch.int32)
        data = torch.randn(B * L // P + 3, P, S.latent_dim).to(device, dtype)
        data[table.long()] = ctx.view(B, L // P, P, S.latent_dim)
    else:
        table, data = None, ctx.clone()
    return w, positions, hidden, residual, data, table


def test_pack_mla_layout():
    S = SHAPE
    w = _weights(S)
    p = pack_mla(w, S, scale=0.1)
    wkv_b = w.wkv_b.view(S.num_heads, S.qk_nope_head_dim + S.v_head_dim, S.kv_lora_rank)
    assert p.w_front.shape == (S.num_heads * S.qk_head_dim + S.latent_dim, S.hidden)
    assert torch.equal(p.w_front[: S.num_heads * S.qk_head_dim], w.wq)
    assert torch.equal(p.w_front[S.num_heads * S.qk_head_dim:], w.wkv_a)
    for h in range(S.num_heads):
        assert torch.equal(p.w_uk[h], wkv_b[h, : S.qk_nope_head_dim].T)
        assert torch.equal(p.w_uv[h], wkv_b[h, S.qk_nope_head_dim:])
    assert all(t.is_contiguous() for t in (p.w_front, p.w_uk, p.w_uv))


@pytest.mark.parametrize("paged", [False, True])
def test_torch_step_matches_references(paged):
    S, B, L = SHAPE, 3, 48
    w, positions, hidden, residual, data, table = _case(S, B, L, paged)
    cos, sin = mla_rope_tables(2560, S.qk_rope_head_dim, 10000.0, YARN)
    scale = mla_softmax_scale(S, YARN)
    ref_cache = PagedLatentCache(data.clone(), table.long()) if paged else LatentCache(data.clone())
    ref = mla_attention_block_absorbed(hidden, w, S, ref_cache, positions, cos, sin, scale=scale,
                                       residual=residual)
    unabsorbed = mla_attention_block(hidden, w, S, PagedLatentCache(data.clone(), table.long()) if paged
                                     else LatentCache(data.clone()), positions, cos, sin, scale=scale,
                                     residual=residual)
    cache = data.clone()
    out = mla_decode_torch(hidden, pack_mla(w, S, scale=scale), cache, positions, cos, sin, residual=residual,
                           page_table=table)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, unabsorbed, rtol=2e-4, atol=2e-4)
    # the appended rows, and nothing else, changed
    torch.testing.assert_close(cache, ref_cache.data, rtol=1e-5, atol=1e-5)
    assert not torch.equal(cache, data)


def test_torch_step_bf16_deepseek_v2_lite_shape():
    S, B, L = MLAShape(), 2, 64                      # DeepSeek-V2-Lite
    w, positions, hidden, residual, data, _ = _case(S, B, L, False, torch.bfloat16)
    cos, sin = mla_rope_tables(4096, S.qk_rope_head_dim, 10000.0, YARN)
    scale = mla_softmax_scale(S, YARN)
    ref = mla_attention_block_absorbed(hidden, w, S, LatentCache(data.clone()), positions, cos, sin, scale=scale,
                                       residual=residual)
    out = mla_decode_torch(hidden, pack_mla(w, S, scale=scale), data, positions, cos, sin, residual=residual)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


def test_bad_inputs_raise_before_anything_is_written():
    S, B, L = SHAPE, 3, 48
    cos, sin = mla_rope_tables(2560, S.qk_rope_head_dim, 10000.0, YARN)
    for paged in (False, True):
        w, positions, hidden, residual, data, table = _case(S, B, L, paged)
        packed = pack_mla(w, S, scale=0.1)
        cache = data.clone()
        bad = [
            (dict(positions=torch.tensor([0, 1, L], dtype=torch.int32)), ValueError, "positions"),
            (dict(positions=torch.tensor([0, -1, 2], dtype=torch.int32)), ValueError, "positions"),
            (dict(positions=positions.long()), TypeError, "positions"),
            (dict(hidden=hidden.half(), residual=residual.half()), TypeError, "norm must be float16"),
            (dict(hidden=hidden[:, :-8]), ValueError, "hidden"),
            (dict(residual=residual[:2]), ValueError, "residual"),
            (dict(cache=cache[..., :-1]), ValueError, "cache"),
            (dict(cos=cos.double()), TypeError, "cos"),
        ]
        if paged:
            bad.append((dict(page_table=torch.full_like(table, data.shape[0])), ValueError, "page_table"))
        else:
            bad.append((dict(cache=cache[:2]), ValueError, "contiguous cache"))
        for change, exc, msg in bad:
            args = dict(hidden=hidden, cache=cache, positions=positions, cos=cos, sin=sin, residual=residual,
                        page_table=table)
            args.update(change)
            with pytest.raises(exc, match=msg):
                mla_decode_torch(args.pop("hidden"), packed, args.pop("cache"), args.pop("positions"),
                                 args.pop("cos"), args.pop("sin"), **args)
            assert torch.equal(cache, data)               # nothing written
    with pytest.raises(ValueError, match="batch"):
        check_mla_operands(torch.zeros(17, S.hidden), packed, torch.zeros(17, L, S.latent_dim),
                           torch.zeros(17, dtype=torch.int32), cos, sin)


@pytest.mark.gpu
def test_torch_step_is_capturable_in_a_cuda_graph():
    from cf_cute.timing import capture_graph
    S, B, L = MLAShape(), 4, 256
    w, positions, hidden, residual, data, _ = _case(S, B, L, False, torch.bfloat16, "cuda")
    cos, sin = (t.cuda() for t in mla_rope_tables(L, S.qk_rope_head_dim, 10000.0, YARN))
    packed = pack_mla(w, S, scale=mla_softmax_scale(S, YARN))
    pos = positions.cuda()
    expect = mla_decode_torch(hidden, packed, data.clone(), pos, cos, sin, residual=residual)
    cache = data.clone()
    g, out = capture_graph(lambda: mla_decode_torch(hidden, packed, cache, pos, cos, sin, residual=residual))
    for _ in range(2):
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)
