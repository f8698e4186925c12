"""fp32 references of DeepSeek-V2 multi-head latent attention (MLA) at decode
time, the ground truth of issue 6's fused kernel.

Shapes (DeepSeek-V2-Lite: hidden 2048, 16 heads, kv_lora_rank 512, qk_nope 128,
qk_rope 64, v 128, no q compression)::

    h        = hidden (+ residual)                            [B, hidden]
    x        = rmsnorm(h) * norm                               (rounded to the activation dtype)
    q        = x @ wq.T               -> [B, heads, nope + rope] -> q_nope, q_pe
    ckv      = x @ wkv_a.T            -> [B, rank + rope]        -> c, k_pe
    c        = rmsnorm(c) * kv_norm   (the latent; eps as the layer norm's)
    q_pe, k_pe rotated by RoPE on interleaved pairs (DeepSeek's complex rotation) with the
             YaRN-scaled table of :func:`mla_rope_tables`
    cache[b, pos] = [c, k_pe]         (latent cache [.., rank + rope], cache dtype)

*Unabsorbed* (:func:`mla_attention_block`): every cached latent goes through
``wkv_b [heads * (nope + v), rank]`` to per-head keys ``[k_nope, k_pe]`` and
values, then ordinary attention with ``scale`` and ``o_proj``: what
transformers' DeepseekV2Attention computes.

*Absorbed* (:func:`mla_attention_block_absorbed`, the kernel's form): with
``W_UK[h] = wkv_b[h, :nope, :]`` and ``W_UV[h] = wkv_b[h, nope:, :]``::

    score[h, t] = (q_nope[h] @ W_UK[h]) . c_t + q_pe[h] . k_pe_t        (times scale)
    o[h]        = (sum_t p[h, t] c_t) @ W_UV[h].T

so the cache is read once per token for all heads (MQA over a 576-wide latent)
and never expanded. Both return ``h + o_proj(o)`` in fp32 and write the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cf_cute.reference import apply_rope, rms_norm

__all__ = ["MLAShape", "MLAWeights", "yarn_mscale", "mla_rope_tables", "mla_softmax_scale", "LatentCache",
           "PagedLatentCache", "mla_attention_block", "mla_attention_block_absorbed"]


@dataclass(frozen=True)
class MLAShape:
    hidden: int = 2048
    num_heads: int = 16
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached token: the normalised latent, then the rotated k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass
class MLAWeights:
    """DeepSeek-V2 attention weights in nn.Linear layout ([out, in])."""

    norm: torch.Tensor       # [hidden] (input_layernorm)
    wq: torch.Tensor         # [heads * (nope + rope), hidden]        (q_proj)
    wkv_a: torch.Tensor      # [rank + rope, hidden]                   (kv_a_proj_with_mqa)
    kv_norm: torch.Tensor    # [rank]                                  (kv_a_layernorm)
    wkv_b: torch.Tensor      # [heads * (nope + v), rank]              (kv_b_proj)
    wo: torch.Tensor         # [hidden, heads * v]                     (o_proj)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_rope_tables(max_positions: int, rope_dim: int, theta: float = 10000.0, yarn: dict | None = None):
    """``(cos, sin)``, each ``[max_positions, rope_dim // 2]`` fp32, for pair i of the
    interleaved rope dims. ``yarn`` (DeepSeek's ``rope_scaling``: factor,
    original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim)
    blends interpolated and extrapolated frequencies over a linear ramp and scales
    cos/sin by ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``, as
    DeepSeek's reference code does. Computed in fp64."""
    i = torch.arange(0, rope_dim, 2, dtype=torch.float64)
    inv = 1.0 / (theta ** (i / rope_dim))
    attn = 1.0
    if yarn:
        factor = float(yarn["factor"])
        orig = yarn["original_max_position_embeddings"]
        fast, slow = yarn.get("beta_fast", 32) or 32, yarn.get("beta_slow", 1) or 1

        def corr(rot):
            return rope_dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

        low, high = max(math.floor(corr(fast)), 0), min(math.ceil(corr(slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extra = 1 - ramp                        # 1: keep the original frequency
        inv = inv / factor * (1 - extra) + inv * extra
        m, m_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
        attn = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    ang = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv[None, :]
    return (ang.cos() * attn).float(), (ang.sin() * attn).float()


def mla_softmax_scale(shape: MLAShape, yarn: dict | None = None) -> float:
    """``1 / sqrt(nope + rope)``, times ``mscale(factor, mscale_all_dim)^2`` under YaRN."""
    s = shape.qk_head_dim ** -0.5
    if yarn and yarn.get("mscale_all_dim"):
        s *= yarn_mscale(float(yarn["factor"]), yarn["mscale_all_dim"]) ** 2
    return s


class LatentCache:
    """Contiguous latent cache ``[B, max_len, rank + rope]``."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def write(self, b: int, pos: int, row: torch.Tensor) -> None:
        self.data[b, pos] = row.to(self.data.dtype)

    def read(self, b: int, n: int) -> torch.Tensor:
        return self.data[b, :n].float()


class PagedLatentCache(LatentCache):
    """Paged latent cache ``[pages, page_size, rank + rope]`` with ``table [B, max_pages]``."""

    def __init__(self, data: torch.Tensor, table: torch.Tensor):
        super().__init__(data)
        self.table = table.long()

    def write(self, b: int, pos: int, row: torch.Tensor) -> None:
        P = self.data.shape[1]
        self.data[self.table[b, pos // P], pos % P] = row.to(self.data.dtype)

    def read(self, b: int, n: int) -> torch.Tensor:
        P = self.data.shape[1]
        pages = self.table[b, : -(-n // P)]
        return self.data[pages].reshape(-1, self.data.shape[-1])[:n].float()


def _front(hidden, w: MLAWeights, shape: MLAShape, cache, positions, cos, sin, eps, residual):
    """Norm, projections, latent norm, RoPE, cache append. Returns (h, q_nope, q_pe)."""
    B = hidden.shape[0]
    S = shape
    h = hidden.float() + (residual.float() if residual is not None else 0.0)
    x = rms_norm(h, w.norm, eps)
    if hidden.dtype != torch.float32:
        x = x.to(hidden.dtype).float()
    q = (x @ w.wq.float().T).view(B, S.num_heads, S.qk_head_dim)
    q_nope, q_pe = q[..., : S.qk_nope_head_dim], q[..., S.qk_nope_head_dim:]
    ckv = x @ w.wkv_a.float().T
    c = rms_norm(ckv[:, : S.kv_lora_rank], w.kv_norm, eps)
    pos = positions.long().cpu()
    cs, sn = cos[pos].to(q.device), sin[pos].to(q.device)
    q_pe = apply_rope(q_pe, cs, sn, "gptj")
    k_pe = apply_rope(ckv[:, None, S.kv_lora_rank:], cs, sn, "gptj")[:, 0]
    for b in range(B):
        cache.write(b, int(pos[b]), torch.cat([c[b], k_pe[b]]))
    return h, q_nope, q_pe, pos


def mla_attention_block(hidden: torch.Tensor, w: MLAWeights, shape: MLAShape, cache: LatentCache,
                        positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, scale: float,
                        eps: float = 1e-6, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The unabsorbed formulation (module docstring); fp32 ``[B, hidden]``."""
    S = shape
    h, q_nope, q_pe, pos = _front(hidden, w, S, cache, positions, cos, sin, eps, residual)
    wkv_b = w.wkv_b.float().view(S.num_heads, S.qk_nope_head_dim + S.v_head_dim, S.kv_lora_rank)
    outs = []
    for b in range(h.shape[0]):
        lat = cache.read(b, int(pos[b]) + 1)                          # [T, rank + rope]
        c, k_pe = lat[:, : S.kv_lora_rank], lat[:, S.kv_lora_rank:]
        kv = torch.einsum("tr,hdr->htd", c, wkv_b)                    # [heads, T, nope + v]
        k = torch.cat([kv[..., : S.qk_nope_head_dim], k_pe[None].expand(S.num_heads, -1, -1)], -1)
        v = kv[..., S.qk_nope_head_dim:]
        q = torch.cat([q_nope[b], q_pe[b]], -1)                       # [heads, nope + rope]
        p = (torch.einsum("hd,htd->ht", q, k) * scale).softmax(-1)
        outs.append(torch.einsum("ht,htd->hd", p, v).reshape(-1))
    attn = torch.stack(outs)
    if hidden.dtype != torch.float32:
        attn = attn.to(hidden.dtype).float()
    return h + attn @ w.wo.float().T


def mla_attention_block_absorbed(hidden: torch.Tensor, w: MLAWeights, shape: MLAShape, cache: LatentCache,
                                 positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, scale: float,
                                 eps: float = 1e-6, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The weight-absorbed formulation the fused kernel implements; equal to
    :func:`mla_attention_block` up to fp32 rounding."""
    S = shape
    h, q_nope, q_pe, pos = _front(hidden, w, S, cache, positions, cos, sin, eps, residual)
    wkv_b = w.wkv_b.float().view(S.num_heads, S.qk_nope_head_dim + S.v_head_dim, S.kv_lora_rank)
    w_uk, w_uv = wkv_b[:, : S.qk_nope_head_dim], wkv_b[:, S.qk_nope_head_dim:]
    q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)               # [B, heads, rank]
    outs = []
    for b in range(h.shape[0]):
        lat = cache.read(b, int(pos[b]) + 1)
        c, k_pe = lat[:, : S.kv_lora_rank], lat[:, S.kv_lora_rank:]
        scores = (q_lat[b] @ c.T + q_pe[b] @ k_pe.T) * scale           # [heads, T]
        o_lat = scores.softmax(-1) @ c                                 # [heads, rank]
        outs.append(torch.einsum("hr,hvr->hv", o_lat, w_uv).reshape(-1))
    attn = torch.stack(outs)
    if hidden.dtype != torch.float32:
        attn = attn.to(hidden.dtype).float()
    return h + attn @ w.wo.float().T
