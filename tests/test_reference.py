"""The fp32 references agree with transformers' Llama modules (CPU)."""

import math

import pytest
import torch

from cf_cute.reference import (
    AttentionWeights, ContiguousKV, MLPWeights, PagedKV, apply_rope, attention_block, mlp_block, rms_norm,
    rope_tables,
)

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb,
)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def _config(hidden=256, heads=4, kv_heads=2, head_dim=64, scaling=None, theta=500000.0):
    kw = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
              intermediate_size=4 * hidden, max_position_embeddings=16384, rms_norm_eps=1e-5,
              attention_bias=False)
    if scaling is None:
        kw["rope_theta"] = theta
    else:
        kw["rope_parameters"] = dict(scaling, rope_theta=theta)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_rope_tables_match_transformers(scaling):
    cfg = _config(scaling=scaling)
    rot = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 17, 1000, 4095]])
    cos_hf, sin_hf = rot(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = rope_tables(4096, 64, 500000.0, scaling)
    # transformers forms position * inv_freq in fp32 (ours in fp64): at position p the angle
    # differs by up to about p * 2^-24 rad
    torch.testing.assert_close(cos[pos[0]], cos_hf[0, :, :32], rtol=0, atol=5e-4)
    torch.testing.assert_close(sin[pos[0]], sin_hf[0, :, 32:], rtol=0, atol=5e-4)
    torch.testing.assert_close(cos[pos[0, :3]], cos_hf[0, :3, :32], rtol=0, atol=2e-6)


def test_neox_rope_matches_transformers_and_gptj_is_complex_rotation():
    cos, sin = rope_tables(64, 64)
    pos = torch.randint(0, 64, (3,))
    x = torch.randn(3, 4, 64)
    c2, s2 = torch.cat([cos[pos]] * 2, -1), torch.cat([sin[pos]] * 2, -1)
    ref, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], c2[None], s2[None])
    torch.testing.assert_close(apply_rope(x, cos[pos], sin[pos], "neox"), ref[0].transpose(0, 1))
    z = torch.view_as_complex(x.view(3, 4, 32, 2))
    rot = torch.polar(torch.ones(3, 32), torch.atan2(sin[pos], cos[pos]))[:, None, :]
    torch.testing.assert_close(apply_rope(x, cos[pos], sin[pos], "gptj"),
                               torch.view_as_real(z * rot).flatten(-2), rtol=1e-5, atol=1e-5)


def _weights(cfg):
    H, nq, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    s = 1 / math.sqrt(H)
    return AttentionWeights(norm=1 + 0.1 * torch.randn(H), wq=torch.randn(nq * hd, H) * s,
                            wk=torch.randn(nkv * hd, H) * s, wv=torch.randn(nkv * hd, H) * s,
                            wo=torch.randn(H, nq * hd) / math.sqrt(nq * hd))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 64), (4, 1, 128)])
@pytest.mark.parametrize("paged", [False, True])
def test_attention_block_matches_llama_attention(heads, kv_heads, head_dim, paged):
    cfg = _config(hidden=256, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    B, L = 3, 80
    w = _weights(cfg)
    positions = torch.tensor([0, 37, 79])                 # context 1, odd, full
    hidden, residual = torch.randn(B, cfg.hidden_size), torch.randn(B, cfg.hidden_size)
    k_ctx = torch.randn(B, L, kv_heads, head_dim)         # already-rotated keys, as a cache holds them
    v_ctx = torch.randn(B, L, kv_heads, head_dim)
    if paged:
        page = 16
        perm = torch.randperm(B * L // page)
        table = perm.view(B, L // page).int()
        kp = torch.empty(B * L // page, page, kv_heads, head_dim)
        vp = torch.empty_like(kp)
        kp[table.long()] = k_ctx.view(B, L // page, page, kv_heads, head_dim)
        vp[table.long()] = v_ctx.view(B, L // page, page, kv_heads, head_dim)
        cache = PagedKV(kp, vp, table)
    else:
        cache = ContiguousKV(k_ctx.clone(), v_ctx.clone())
    cos, sin = rope_tables(L, head_dim, cfg.rope_parameters["rope_theta"])
    out = attention_block(hidden, w, cache, positions, cos, sin, num_heads=heads, num_kv_heads=kv_heads,
                          residual=residual)

    attn = LlamaAttention(cfg, layer_idx=0).eval()
    norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(w.norm)
        for name in ("q", "k", "v", "o"):
            getattr(attn, f"{name}_proj").weight.copy_(getattr(w, f"w{name}"))
        rot = LlamaRotaryEmbedding(cfg)
        for b in range(B):
            p = int(positions[b])
            hf_cache = DynamicCache()
            if p:
                hf_cache.update(k_ctx[b, :p].transpose(0, 1)[None], v_ctx[b, :p].transpose(0, 1)[None], 0)
            h = (hidden[b] + residual[b])[None, None]
            pe = rot(h, torch.tensor([[p]]))
            o, _ = attn(norm(h), position_embeddings=pe, attention_mask=None, cache=hf_cache)
            torch.testing.assert_close(out[b], (h + o)[0, 0], rtol=2e-4, atol=2e-4)
            # the new key/value landed in the cache slot the kernel must write
            kb, vb = cache.read(b, p + 1)
            torch.testing.assert_close(kb[p], hf_cache.layers[0].keys[0, :, p], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vb[p], hf_cache.layers[0].values[0, :, p], rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_transformers():
    n = LlamaRMSNorm(96, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.randn(96))
    x = torch.randn(5, 96)
    torch.testing.assert_close(rms_norm(x, n.weight, 1e-6), n(x).detach())


@pytest.mark.parametrize("hidden,inter", [(256, 688), (192, 512)])
def test_mlp_block_matches_llama_mlp(hidden, inter):
    cfg = _config(hidden=hidden, heads=4, kv_heads=4, head_dim=hidden // 4)
    cfg.intermediate_size = inter
    mlp = LlamaMLP(cfg).eval()
    norm = LlamaRMSNorm(hidden, eps=cfg.rms_norm_eps)
    w = MLPWeights(norm=1 + 0.1 * torch.randn(hidden), w_gate=torch.randn(inter, hidden) / math.sqrt(hidden),
                   w_up=torch.randn(inter, hidden) / math.sqrt(hidden),
                   w_down=torch.randn(hidden, inter) / math.sqrt(inter))
    with torch.no_grad():
        norm.weight.copy_(w.norm)
        mlp.gate_proj.weight.copy_(w.w_gate)
        mlp.up_proj.weight.copy_(w.w_up)
        mlp.down_proj.weight.copy_(w.w_down)
        hidden_in, residual = torch.randn(3, hidden), torch.randn(3, hidden)
        h = hidden_in + residual
        expect = h + mlp(norm(h))
    torch.testing.assert_close(mlp_block(hidden_in, w, residual=residual), expect, rtol=1e-5, atol=1e-5)
    # bf16 activations: the reference rounds what the kernels round, and stays close to fp32
    got = mlp_block(hidden_in.bfloat16(), w, residual=residual.bfloat16())
    assert (got - expect).norm() / expect.norm() < 2e-2
