"""Torch-facing split-KV decode attention (``cf_cute.fused.decode_attention``).

STATUS: GPU-tested on an H100.

``decode_attention(q, k_cache, v_cache, lengths, page_table=None)`` returns
``o [B, heads, head_dim]``: request b attends to its first ``lengths[b]``
cached tokens (contiguous ``[B, max_len, kv_heads, hd]`` caches, or paged
``[num_pages, page_size, kv_heads, hd]`` with ``page_table [B, max_pages]``).
``lengths`` (and ``page_table``) given as CPU tensors are range-checked before
the launch and copied to the device; device tensors are used as they are
(no host synchronisation) and the kernel clamps them to the cache, so a bad
value cannot read outside the cache but gives wrong results.
"""

from __future__ import annotations

import functools

import torch

from cf_cute.fused.decode_attention import DecodeAttention, DecodeAttentionConfig
from cf_cute.jit import TensorSpec, compile_kernel
from cf_cute.validate import check_operands, check_tensor, dtype_name, host_index_checked, kv_cache_layout

__all__ = ["decode_attention", "decode_attention_config", "arg_specs"]

_NAMES = ("q", "k_cache", "v_cache", "page_table", "lengths", "out")


def decode_attention_config(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            page_table: torch.Tensor | None, cluster_size: int) -> DecodeAttentionConfig:
    check_tensor("q", q, dtype=(torch.bfloat16, torch.float16), shape=(None, None, None), cuda=False)
    B, heads, hd = q.shape
    check_tensor("k_cache", k_cache, dtype=q.dtype, shape=(None, None, None, hd), cuda=False)
    check_tensor("v_cache", v_cache, dtype=q.dtype, shape=tuple(k_cache.shape), cuda=False)
    kv_heads = k_cache.shape[2]
    cfg = DecodeAttentionConfig(batch=B, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                                cluster_size=cluster_size, dtype=dtype_name(q.dtype),
                                **kv_cache_layout(k_cache, page_table, B))
    cfg.validate()
    return cfg


def arg_specs(cfg: DecodeAttentionConfig) -> list:
    """Fake-tensor specs of (q, k_cache, v_cache, page_table, lengths, out)."""
    q = (cfg.batch, cfg.num_heads, cfg.head_dim)
    return [TensorSpec(cfg.dtype, q), TensorSpec(cfg.dtype, cfg.kv_shape), TensorSpec(cfg.dtype, cfg.kv_shape),
            TensorSpec("int32", cfg.table_shape, align=4), TensorSpec("int32", (cfg.batch,), align=4),
            TensorSpec(cfg.dtype, q)]


@functools.lru_cache(maxsize=None)
def _kernel(cfg: DecodeAttentionConfig):
    return compile_kernel(DecodeAttention, cfg, arg_specs(cfg))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                     page_table: torch.Tensor | None = None, cluster_size: int = 4,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    cfg = decode_attention_config(q, k_cache, v_cache, page_table, cluster_size)
    check_tensor("lengths", lengths, dtype=torch.int32, shape=(cfg.batch,), cuda=False, align=4)
    lengths = host_index_checked(lengths, 1, cfg.max_len, "lengths", q.device)
    if page_table is None:
        page_table = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    else:
        page_table = host_index_checked(page_table, 0, cfg.num_pages - 1, "page_table entries", q.device)
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, dtype=q.dtype, shape=tuple(q.shape), cuda=False)
    check_operands(_NAMES, q, k_cache, v_cache, page_table, lengths, out, align=(16, 16, 16, 4, 4, 16))
    _kernel(cfg)(q, k_cache, v_cache, page_table, lengths, out)
    return out
