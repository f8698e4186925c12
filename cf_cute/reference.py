"""fp32 torch references for the fused decode kernels (CPU or GPU).

These define what the kernels compute; tests compare the kernels with them
and check them against transformers' Llama modules.

Conventions (Llama-family decode step, batch of B single-token requests):

* ``positions[b]`` is the slot where request b's new token goes: its context
  before the step is ``positions[b]`` tokens, after the step
  ``positions[b] + 1``; RoPE uses ``positions[b]``.
* RoPE tables ``cos, sin``: ``[max_positions, head_dim // 2]`` fp32, one
  entry per frequency (``rope_tables`` builds them, Llama-3 scaling included).
  ``rope_style`` "neox" rotates halves (HF Llama), "gptj" rotates pairs.
* KV caches: contiguous ``[B, max_len, kv_heads, head_dim]`` or paged
  ``[num_pages, page_size, kv_heads, head_dim]`` with a page table
  ``[B, max_pages]`` (token t of request b at page ``table[b, t // page]``,
  row ``t % page``), the vLLM / FlashInfer layout.
* Residual stream: ``h = hidden (+ residual)``, the block returns
  ``h + o_proj(attention(rmsnorm(h)))``, the next block's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "rms_norm",
    "rope_tables",
    "apply_rope",
    "ContiguousKV",
    "PagedKV",
    "AttentionWeights",
    "decode_attention",
    "attention_block",
    "MLPWeights",
    "mlp_block",
    "decoder_layer",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rope_tables(max_positions: int, head_dim: int, theta: float = 10000.0,
                rope_scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[max_positions, head_dim // 2]`` fp32. ``rope_scaling``
    may be a Llama-3 dict (``rope_type`` "llama3": factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind != "llama3":
            raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
        factor = rope_scaling["factor"]
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_len = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    freqs = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return freqs.cos().float(), freqs.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox") -> torch.Tensor:
    """Rotate ``x [..., heads, head_dim]`` with ``cos, sin [..., head_dim // 2]``
    (broadcast over heads)."""
    x = x.float()
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if style == "neox":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    if style == "gptj":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    raise ValueError(f"rope_style must be 'neox' or 'gptj', got {style!r}")


@dataclass
class ContiguousKV:
    k: torch.Tensor          # [B, max_len, kv_heads, head_dim]
    v: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def write(self, b: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[b, pos] = k.to(self.k.dtype)
        self.v[b, pos] = v.to(self.v.dtype)

    def read(self, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[b, :length], self.v[b, :length]


@dataclass
class PagedKV:
    k: torch.Tensor          # [num_pages, page_size, kv_heads, head_dim]
    v: torch.Tensor
    page_table: torch.Tensor  # [B, max_pages] int32

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.page_table.shape[1] * self.page_size

    def write(self, b: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        page = int(self.page_table[b, pos // self.page_size])
        self.k[page, pos % self.page_size] = k.to(self.k.dtype)
        self.v[page, pos % self.page_size] = v.to(self.v.dtype)

    def read(self, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        pages = self.page_table[b, : (length + self.page_size - 1) // self.page_size].long()
        k = self.k[pages].flatten(0, 1)[:length]
        v = self.v[pages].flatten(0, 1)[:length]
        return k, v


@dataclass
class AttentionWeights:
    """nn.Linear layout ([out, in]) as in a Llama checkpoint."""

    norm: torch.Tensor       # [hidden]
    wq: torch.Tensor         # [heads * head_dim, hidden]
    wk: torch.Tensor         # [kv_heads * head_dim, hidden]
    wv: torch.Tensor         # [kv_heads * head_dim, hidden]
    wo: torch.Tensor         # [hidden, heads * head_dim]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One request: ``q [heads, hd]``, ``k, v [len, kv_heads, hd]`` -> ``[heads, hd]``
    (GQA: query head h reads kv head ``h // (heads / kv_heads)``), fp32 softmax."""
    heads, kv_heads = q.shape[0], k.shape[1]
    group = heads // kv_heads
    kf = k.float().repeat_interleave(group, dim=1)       # [len, heads, hd]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.float(), kf) * scale
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("hl,lhd->hd", p, vf)


def attention_block(hidden: torch.Tensor, weights: AttentionWeights, cache, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, *, num_heads: int, num_kv_heads: int,
                    eps: float = 1e-5, rope_style: str = "neox",
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of the fused attention block. Writes the new k, v into
    ``cache`` (in the cache dtype, as the kernel does) and returns the new
    residual stream ``h + o_proj(attn)`` in fp32, ``[B, hidden]``."""
    B, H = hidden.shape
    hd = weights.wq.shape[0] // num_heads
    h = hidden.float() + (residual.float() if residual is not None else 0.0)
    x = rms_norm(h, weights.norm, eps)
    if hidden.dtype != torch.float32:
        x = x.to(hidden.dtype).float()          # the kernels feed the GEMV with the activation dtype
    q = (x @ weights.wq.float().T).view(B, num_heads, hd)
    k = (x @ weights.wk.float().T).view(B, num_kv_heads, hd)
    v = (x @ weights.wv.float().T).view(B, num_kv_heads, hd)
    pos = positions.long().cpu()
    c, s = cos[pos].to(q.device), sin[pos].to(q.device)
    q = apply_rope(q, c, s, rope_style)
    k = apply_rope(k, c, s, rope_style)
    outs = []
    for b in range(B):
        p = int(pos[b])
        cache.write(b, p, k[b], v[b])
        kc, vc = cache.read(b, p + 1)
        outs.append(decode_attention(q[b], kc, vc, 1.0 / math.sqrt(hd)))
    attn = torch.stack(outs).reshape(B, num_heads * hd)
    if hidden.dtype != torch.float32:
        attn = attn.to(hidden.dtype).float()
    return h + attn @ weights.wo.float().T


@dataclass
class MLPWeights:
    """Llama MLP weights in nn.Linear layout ([out, in])."""

    norm: torch.Tensor       # [hidden] (post_attention_layernorm)
    w_gate: torch.Tensor     # [intermediate, hidden]
    w_up: torch.Tensor       # [intermediate, hidden]
    w_down: torch.Tensor     # [hidden, intermediate]


def mlp_block(hidden: torch.Tensor, weights: MLPWeights, *, eps: float = 1e-5,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of the fused MLP block: ``h + down(silu(gate(x)) * up(x))`` with
    ``x = rmsnorm(h)``, ``h = hidden (+ residual)``; fp32 result ``[B, hidden]``.
    Like the attention block, the kernels feed each GEMV with activations rounded
    to the activation dtype (x, and the SiLU product)."""
    h = hidden.float() + (residual.float() if residual is not None else 0.0)
    x = rms_norm(h, weights.norm, eps)
    if hidden.dtype != torch.float32:
        x = x.to(hidden.dtype).float()
    g = x @ weights.w_gate.float().T
    u = x @ weights.w_up.float().T
    a = torch.nn.functional.silu(g) * u
    if hidden.dtype != torch.float32:
        a = a.to(hidden.dtype).float()
    return h + a @ weights.w_down.float().T


def decoder_layer(hidden: torch.Tensor, attn_weights: AttentionWeights, mlp_weights: MLPWeights, cache,
                  positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, num_heads: int,
                  num_kv_heads: int, eps: float = 1e-5, rope_style: str = "neox",
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of one decoder layer: the attention block, then the MLP block on
    its output rounded to the activation dtype (the residual stream between the
    two launches). Returns the new residual stream, fp32 ``[B, hidden]``."""
    h1 = attention_block(hidden, attn_weights, cache, positions, cos, sin, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, eps=eps, rope_style=rope_style, residual=residual)
    return mlp_block(h1.to(hidden.dtype), mlp_weights, eps=eps)
