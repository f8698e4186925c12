"""One Llama decoder layer at decode time from torch: the fused attention block
then the fused MLP block, two launches, the residual stream passed between them
in the activation dtype.

    layer = DecoderLayerWeights(attn=pack_attention(...), mlp=pack_mlp(...))
    out = decoder_layer(hidden, layer, k_cache, v_cache, positions, cos, sin)

``out = h1 + mlp(rmsnorm(h1))``, ``h1 = h + o_proj(attention(rmsnorm(h)))``,
``h = hidden (+ residual)``: ``out`` is the next layer's ``hidden`` (no separate
residual tensor: both blocks add it in their epilogue). Each launch needs its
grid resident on its own (an attention grid and an MLP grid never overlap: the
second launch starts after the first ends, on the same stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cf_cute.attention import AttentionTuning, PackedAttention, attention_block
from cf_cute.mlp import MLPTuning, PackedMLP, mlp_block, planned_config

__all__ = ["DecoderLayerWeights", "decoder_layer"]


@dataclass
class DecoderLayerWeights:
    attn: PackedAttention
    mlp: PackedMLP


def decoder_layer(hidden: torch.Tensor, layer: DecoderLayerWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                  residual: torch.Tensor | None = None, page_table: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, mid: torch.Tensor | None = None,
                  attn_tuning: AttentionTuning | None = None, mlp_tuning: MLPTuning | None = None) -> torch.Tensor:
    """Attention block (one launch; it appends k, v at ``positions``) then MLP block
    (one launch). ``mid`` receives the residual stream between the two (allocated
    when None). Returns ``out [B, hidden]``."""
    planned_config(hidden, layer.mlp, tuning=mlp_tuning)     # MLP operands checked before anything is written
    h1 = attention_block(hidden, layer.attn, k_cache, v_cache, positions, cos, sin, residual=residual,
                         page_table=page_table, out=mid, tuning=attn_tuning)
    return mlp_block(h1, layer.mlp, out=out, tuning=mlp_tuning)
