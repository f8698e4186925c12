"""The attention half of a Llama decoder layer at decode time, from torch.

STATUS: composed of three cluster kernels (compiled for sm_90a, not yet run
on a GPU): ``qkv_rope`` -> ``decode_attention`` -> ``splitk_gemv`` with the
residual fused. Issue 3 asks for one launch; this composition is the
correctness baseline the single-launch kernel must match, with the same
signature.

    packed = pack_attention(weights, num_heads=32, num_kv_heads=8)      # once
    out = attention_block(hidden, packed, k_cache, v_cache, positions, cos, sin,
                          residual=None, page_table=None)

``out = h + o_proj(attention(rmsnorm(h)))`` with ``h = hidden (+ residual)``:
the next block's input. The new k/v land in the caches at ``positions``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cf_cute.decode_attention import decode_attention
from cf_cute.gemv import splitk_gemv
from cf_cute.qkv_rope import pack_qkv, qkv_rope
from cf_cute.reference import AttentionWeights

__all__ = ["PackedAttention", "pack_attention", "attention_block"]


@dataclass
class PackedAttention:
    norm: torch.Tensor        # [H]
    w_qkv: torch.Tensor       # [kv_heads, (G+2)*hd, H]  (pack_qkv)
    wo: torch.Tensor          # [H, heads*hd]
    num_heads: int
    num_kv_heads: int
    eps: float = 1e-5
    rope_style: str = "neox"


def pack_attention(weights: AttentionWeights, *, num_heads: int, num_kv_heads: int, eps: float = 1e-5,
                   rope_style: str = "neox") -> PackedAttention:
    """One-time packing of nn.Linear-layout weights (same dtype and device as given)."""
    return PackedAttention(norm=weights.norm.contiguous(),
                           w_qkv=pack_qkv(weights.wq, weights.wk, weights.wv, num_heads, num_kv_heads),
                           wo=weights.wo.contiguous(), num_heads=num_heads, num_kv_heads=num_kv_heads,
                           eps=eps, rope_style=rope_style)


def attention_block(hidden: torch.Tensor, packed: PackedAttention, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                    residual: torch.Tensor | None = None, page_table: torch.Tensor | None = None,
                    cluster_size: int = 4) -> torch.Tensor:
    q, h = qkv_rope(hidden, packed.norm, packed.w_qkv, cos, sin, positions, k_cache, v_cache,
                    num_heads=packed.num_heads, num_kv_heads=packed.num_kv_heads, residual=residual,
                    page_table=page_table, cluster_size=cluster_size, rope_style=packed.rope_style,
                    eps=packed.eps)
    lengths = positions + 1                       # stays on the device it is on: no sync
    if page_table is not None and page_table.device != hidden.device:
        page_table = page_table.to(hidden.device, non_blocking=True)
    o = decode_attention(q, k_cache, v_cache, lengths, page_table=page_table, cluster_size=cluster_size)
    return splitk_gemv(o.view(o.shape[0], -1), packed.wo, residual=h, cluster_size=cluster_size)
