"""The fp32 MLA references (issue 6) agree with transformers' DeepseekV2Attention,
and the weight-absorbed form with the unabsorbed one (CPU)."""

import math

import pytest
import torch

from cf_cute.reference import rms_norm
from cf_cute.reference_mla import (LatentCache, MLAShape, MLAWeights, PagedLatentCache, mla_attention_block,
                                   mla_attention_block_absorbed, mla_rope_tables, mla_softmax_scale)

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DynamicCache  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (  # noqa: E402
    DeepseekV2Attention, DeepseekV2RotaryEmbedding)

SHAPE = MLAShape(hidden=256, num_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
            mscale=0.707, mscale_all_dim=0.707)


def _config(yarn=YARN):
    S = SHAPE
    cfg = DeepseekV2Config(hidden_size=S.hidden, num_attention_heads=S.num_heads, num_key_value_heads=S.num_heads,
                           kv_lora_rank=S.kv_lora_rank, q_lora_rank=None, qk_nope_head_dim=S.qk_nope_head_dim,
                           qk_rope_head_dim=S.qk_rope_head_dim, v_head_dim=S.v_head_dim, rope_scaling=yarn,
                           max_position_embeddings=2560, rope_theta=10000.0, rms_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    return cfg


def _weights():
    S, H = SHAPE, SHAPE.hidden
    r = S.kv_lora_rank
    return MLAWeights(norm=1 + 0.1 * torch.randn(H), wq=torch.randn(S.num_heads * S.qk_head_dim, H) / math.sqrt(H),
                      wkv_a=torch.randn(S.latent_dim, H) / math.sqrt(H), kv_norm=1 + 0.1 * torch.randn(r),
                      wkv_b=torch.randn(S.num_heads * (S.qk_nope_head_dim + S.v_head_dim), r) / math.sqrt(r),
                      wo=torch.randn(H, S.num_heads * S.v_head_dim) / math.sqrt(S.num_heads * S.v_head_dim))


@pytest.mark.parametrize("yarn", [YARN, None])
def test_rope_tables_match_transformers(yarn):
    cfg = _config(yarn)
    rot = DeepseekV2RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 7, 100, 2000]])
    fc = rot(torch.zeros(1), pos)[0]
    cos, sin = mla_rope_tables(2560, SHAPE.qk_rope_head_dim, 10000.0, yarn)
    # transformers forms position * inv_freq in fp32 (ours in fp64)
    torch.testing.assert_close(cos[pos[0]], fc.real.float(), rtol=0, atol=3e-4)
    torch.testing.assert_close(sin[pos[0]], fc.imag.float(), rtol=0, atol=3e-4)


@pytest.mark.parametrize("paged", [False, True])
def test_unabsorbed_matches_deepseek_v2_attention(paged):
    S = SHAPE
    cfg = _config()
    w = _weights()
    B, L = 3, 48
    positions = torch.tensor([0, 21, L - 1])                     # context 1, odd, full
    hidden, residual = torch.randn(B, S.hidden), torch.randn(B, S.hidden)
    ctx = torch.randn(B, L, S.latent_dim)                        # cached [latent, rotated k_pe]
    if paged:
        P = 16
        table = torch.randperm(B * L // P).view(B, L // P)
        data = torch.empty(B * L // P, P, S.latent_dim)
        data[table] = ctx.view(B, L // P, P, S.latent_dim)
        cache = PagedLatentCache(data, table)
    else:
        cache = LatentCache(ctx.clone())
    cos, sin = mla_rope_tables(2560, S.qk_rope_head_dim, 10000.0, YARN)
    scale = mla_softmax_scale(S, YARN)
    out = mla_attention_block(hidden, w, S, cache, positions, cos, sin, scale=scale, residual=residual)

    attn = DeepseekV2Attention(cfg, layer_idx=0).eval()
    assert attn.scaling == pytest.approx(scale)
    import inspect                     # the cache keyword was renamed between transformers 5.17 and 5.24
    cache_kw = "cache" if "cache" in inspect.signature(attn.forward).parameters else "past_key_values"
    with torch.no_grad():
        attn.q_proj.weight.copy_(w.wq)
        attn.kv_a_proj_with_mqa.weight.copy_(w.wkv_a)
        attn.kv_a_layernorm.weight.copy_(w.kv_norm)
        attn.kv_b_proj.weight.copy_(w.wkv_b)
        attn.o_proj.weight.copy_(w.wo)
        rot = DeepseekV2RotaryEmbedding(cfg)
        for b in range(B):
            p = int(positions[b])
            hf_cache = DynamicCache()
            if p:
                hf_cache.update(ctx[b, :p, : S.kv_lora_rank][None, None], ctx[b, :p, S.kv_lora_rank:][None, None], 0)
            h = (hidden[b] + residual[b])[None, None]
            x = rms_norm(h, w.norm, 1e-6)
            o, _ = attn(x, attention_mask=None, **{cache_kw: hf_cache},
                        position_embeddings=rot(x, torch.tensor([[p]])))
            torch.testing.assert_close(out[b], (h + o)[0, 0], rtol=2e-4, atol=2e-4)
            # the new [latent, k_pe] landed in the slot the kernel must write
            row = cache.read(b, p + 1)[p]
            lat = hf_cache.layers[0]
            torch.testing.assert_close(row[: S.kv_lora_rank], lat.keys[0, 0, p], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(row[S.kv_lora_rank:], lat.values[0, 0, p], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_equals_unabsorbed(dtype):
    S = MLAShape()                                               # DeepSeek-V2-Lite's own shape
    g = torch.Generator().manual_seed(0)
    H, r = S.hidden, S.kv_lora_rank
    w = MLAWeights(norm=1 + 0.1 * torch.randn(H, generator=g),
                   wq=torch.randn(S.num_heads * S.qk_head_dim, H, generator=g) / math.sqrt(H),
                   wkv_a=torch.randn(S.latent_dim, H, generator=g) / math.sqrt(H),
                   kv_norm=1 + 0.1 * torch.randn(r, generator=g),
                   wkv_b=torch.randn(S.num_heads * 256, r, generator=g) / math.sqrt(r),
                   wo=torch.randn(H, S.num_heads * S.v_head_dim, generator=g) / math.sqrt(2048))
    B, L = 2, 40
    positions = torch.tensor([5, L - 1])
    hidden = torch.randn(B, H, generator=g).to(dtype)
    ctx = torch.randn(B, L, S.latent_dim, generator=g)
    cos, sin = mla_rope_tables(4096, S.qk_rope_head_dim, 10000.0, YARN)
    kw = dict(scale=mla_softmax_scale(S, YARN))
    c1, c2 = LatentCache(ctx.clone()), LatentCache(ctx.clone())
    a = mla_attention_block(hidden, w, S, c1, positions, cos, sin, **kw)
    b = mla_attention_block_absorbed(hidden, w, S, c2, positions, cos, sin, **kw)
    torch.testing.assert_close(c1.data, c2.data, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
