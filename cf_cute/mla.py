"""DeepSeek-V2 MLA decode attention (issue 6): weight packing for the absorbed
form, input checks, and the unfused torch step that the fused kernel is measured
against.

STATUS: host side only. ``mla_decode_torch`` is tested on the CPU against the fp32
references of :mod:`cf_cute.reference_mla` (which match transformers'
DeepseekV2Attention); the fused kernel is not written yet.

Packed layout (``pack_mla``; every GEMV weight has its outputs on rows and its
reduction dimension contiguous, the layout of the tensor-core GEMV core)::

    w_front [heads * (nope + rope) + rank + rope, hidden]   q_proj rows, then kv_a rows: the whole
                                                            front of the block is one weight stream
    w_uk    [heads, rank, nope]    W_UK[h].T: q_lat[h] = W_UK[h].T @ q_nope[h]   (absorbed into q)
    w_uv    [heads, v, rank]       W_UV[h]:   o[h]     = W_UV[h] @ o_lat[h]      (absorbed into o)
    wo      [hidden, heads * v]    o_proj as given

    latent cache: contiguous [B, max_len, rank + rope] or paged [pages, page_size, rank + rope]
                  with page_table [B, max_pages] (int32), a token's row = [normalised c, rotated k_pe]

One decode step (``mla_decode_torch``; the kernel computes the same)::

    h = hidden (+ residual);  x = rmsnorm(h) * norm                  (activation dtype)
    [q | ckv] = x @ w_front.T;  q -> [heads, nope + rope],  ckv -> [c | k_pe]
    c = rmsnorm(c) * kv_norm;  q_pe, k_pe rotated (interleaved pairs, YaRN table)
    cache[b, position[b]] = [c, k_pe]
    score[h, t] = (q_lat[h] . c_t + q_pe[h] . k_pe_t) * scale,  t <= position[b]   (fp32 softmax)
    o = W_UV @ (softmax(score) @ c);  out = h + o @ wo.T
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cf_cute.reference import apply_rope
from cf_cute.reference_mla import MLAShape, MLAWeights
from cf_cute.validate import check_tensor, host_index_checked

__all__ = ["PackedMLA", "pack_mla", "check_mla_operands", "mla_decode_torch"]


@dataclass
class PackedMLA:
    norm: torch.Tensor        # [hidden]
    w_front: torch.Tensor     # [heads * (nope + rope) + rank + rope, hidden]
    kv_norm: torch.Tensor     # [rank]
    w_uk: torch.Tensor        # [heads, rank, nope]
    w_uv: torch.Tensor        # [heads, v, rank]
    wo: torch.Tensor          # [hidden, heads * v]
    shape: MLAShape
    scale: float              # softmax scale (mla_softmax_scale: YaRN's mscale included)
    eps: float = 1e-6


def pack_mla(w: MLAWeights, shape: MLAShape, *, scale: float, eps: float = 1e-6) -> PackedMLA:
    """One-time repacking of nn.Linear-layout weights (module docstring); dtype and
    device are kept."""
    S = shape
    nq = S.num_heads * S.qk_head_dim
    check_tensor("wq", w.wq, shape=(nq, S.hidden), cuda=False)
    dt = w.wq.dtype
    check_tensor("wkv_a", w.wkv_a, dtype=dt, shape=(S.latent_dim, S.hidden), cuda=False)
    check_tensor("wkv_b", w.wkv_b, dtype=dt, shape=(S.num_heads * (S.qk_nope_head_dim + S.v_head_dim),
                                                    S.kv_lora_rank), cuda=False)
    check_tensor("wo", w.wo, dtype=dt, shape=(S.hidden, S.num_heads * S.v_head_dim), cuda=False)
    check_tensor("norm", w.norm, dtype=dt, shape=(S.hidden,), cuda=False)
    check_tensor("kv_norm", w.kv_norm, dtype=dt, shape=(S.kv_lora_rank,), cuda=False)
    wkv_b = w.wkv_b.view(S.num_heads, S.qk_nope_head_dim + S.v_head_dim, S.kv_lora_rank)
    return PackedMLA(norm=w.norm.contiguous(), w_front=torch.cat([w.wq, w.wkv_a]).contiguous(),
                     kv_norm=w.kv_norm.contiguous(),
                     w_uk=wkv_b[:, : S.qk_nope_head_dim].transpose(1, 2).contiguous(),
                     w_uv=wkv_b[:, S.qk_nope_head_dim:].contiguous(), wo=w.wo.contiguous(),
                     shape=S, scale=scale, eps=eps)


def check_mla_operands(hidden: torch.Tensor, packed: PackedMLA, cache: torch.Tensor, positions: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, *, residual: torch.Tensor | None = None,
                       page_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every check that can fail, before anything is written. Returns ``positions``
    and ``page_table`` on the activations' device (CPU index tensors are range-checked
    first; device ones would need a host sync, see ``validate.host_index_checked``)."""
    S = packed.shape
    check_tensor("hidden", hidden, dtype=(torch.bfloat16, torch.float16, torch.float32), shape=(None, S.hidden),
                 cuda=False)
    B, dt, dev = hidden.shape[0], hidden.dtype, hidden.device
    if not 1 <= B <= 16:
        raise ValueError(f"batch must be 1 to 16, got {B}")
    if residual is not None:
        check_tensor("residual", residual, dtype=dt, shape=(B, S.hidden), cuda=False)
    for name, t, shp in (("norm", packed.norm, (S.hidden,)),
                         ("w_front", packed.w_front, (S.num_heads * S.qk_head_dim + S.latent_dim, S.hidden)),
                         ("kv_norm", packed.kv_norm, (S.kv_lora_rank,)),
                         ("w_uk", packed.w_uk, (S.num_heads, S.kv_lora_rank, S.qk_nope_head_dim)),
                         ("w_uv", packed.w_uv, (S.num_heads, S.v_head_dim, S.kv_lora_rank)),
                         ("wo", packed.wo, (S.hidden, S.num_heads * S.v_head_dim))):
        check_tensor(name, t, dtype=dt, shape=shp, cuda=False)
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, the activations on {dev}")
    check_tensor("cache", cache, dtype=dt, shape=(None, None, S.latent_dim), cuda=False)
    if cache.device != dev:
        raise ValueError(f"cache is on {cache.device}, the activations on {dev}")
    check_tensor("cos", cos, dtype=torch.float32, shape=(None, S.qk_rope_head_dim // 2), cuda=False, align=4)
    check_tensor("sin", sin, dtype=torch.float32, shape=tuple(cos.shape), cuda=False, align=4)
    check_tensor("positions", positions, dtype=torch.int32, shape=(B,), cuda=False, align=4)
    if page_table is None:
        if cache.shape[0] != B:
            raise ValueError(f"a contiguous cache must be [B={B}, max_len, {S.latent_dim}], got {tuple(cache.shape)}")
        capacity = cache.shape[1]
    else:
        check_tensor("page_table", page_table, dtype=torch.int32, shape=(B, None), cuda=False, align=4)
        capacity = page_table.shape[1] * cache.shape[1]
        page_table = host_index_checked(page_table, 0, cache.shape[0] - 1, "page_table", dev,
                                        f" ({cache.shape[0]} pages)")
    cap = min(capacity, cos.shape[0])
    positions = host_index_checked(positions, 0, cap - 1, "positions", dev,
                                   f" (cache capacity {capacity}, RoPE table {cos.shape[0]})")
    return positions, page_table


def mla_decode_torch(hidden: torch.Tensor, packed: PackedMLA, cache: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, *, residual: torch.Tensor | None = None,
                     page_table: torch.Tensor | None = None) -> torch.Tensor:
    """One MLA decode step in plain torch (module docstring), batched, with fixed
    shapes and no host synchronisation (capturable in a CUDA graph when the index
    tensors live on the GPU): appends each request's latent row at its position and
    returns ``h + o_proj(o)`` in the activation dtype. Matmuls in the activation
    dtype, norms and softmax in fp32 (what an unfused serving stack does)."""
    positions, page_table = check_mla_operands(hidden, packed, cache, positions, cos, sin, residual=residual,
                                               page_table=page_table)
    S = packed.shape
    B, dt = hidden.shape[0], hidden.dtype
    rank, nope = S.kv_lora_rank, S.qk_nope_head_dim
    h = hidden.float() + (residual.float() if residual is not None else 0.0)
    x = torch.nn.functional.rms_norm(h, (S.hidden,), packed.norm.float(), packed.eps).to(dt)
    y = x @ packed.w_front.T
    q = y[:, : S.num_heads * S.qk_head_dim].view(B, S.num_heads, S.qk_head_dim)
    ckv = y[:, S.num_heads * S.qk_head_dim:]
    c = torch.nn.functional.rms_norm(ckv[:, :rank].float(), (rank,), packed.kv_norm.float(), packed.eps)
    pos = positions.long()
    cs, sn = cos[pos], sin[pos]
    q_pe = apply_rope(q[..., nope:], cs, sn, "gptj")                      # [B, heads, rope] fp32
    k_pe = apply_rope(ckv[:, None, rank:], cs, sn, "gptj")[:, 0]          # [B, rope]
    row = torch.cat([c, k_pe], -1).to(cache.dtype)
    if page_table is None:
        cache[torch.arange(B, device=cache.device), pos] = row
        lat = cache                                                        # [B, L, rank + rope]
    else:
        P = cache.shape[1]
        cache[page_table.long().gather(1, (pos // P)[:, None])[:, 0], pos % P] = row
        lat = cache[page_table.long()].flatten(1, 2)                     # [B, pages * P, rank + rope]
    q_lat = torch.einsum("bhd,hrd->bhr", q[..., :nope], packed.w_uk)      # [B, heads, rank]
    qf = torch.cat([q_lat, q_pe.to(dt)], -1)                             # [B, heads, rank + rope]
    scores = torch.einsum("bhk,btk->bht", qf, lat).float() * packed.scale
    t = torch.arange(lat.shape[1], device=lat.device)
    scores = scores.masked_fill(t[None, None, :] > pos[:, None, None], float("-inf"))
    p = scores.softmax(-1).to(dt)
    o_lat = torch.einsum("bht,btr->bhr", p, lat[..., :rank])              # [B, heads, rank]
    o = torch.einsum("bhr,hvr->bhv", o_lat, packed.w_uv).reshape(B, -1)
    return (h + (o @ packed.wo.T).float()).to(dt)
