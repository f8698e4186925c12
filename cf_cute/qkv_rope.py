"""Torch-facing fused (residual add) + RMSNorm + QKV + RoPE + KV append.

STATUS: GPU-tested on an H100.

    w_qkv = pack_qkv(wq, wk, wv, num_heads, num_kv_heads)      # once, at load time
    q, h = qkv_rope(hidden, norm_w, w_qkv, cos, sin, positions, k_cache, v_cache,
                    residual=None, page_table=None, num_heads=32, num_kv_heads=8)

``q [B, heads, hd]`` (roped), ``h`` the residual stream ``hidden + residual``
(``hidden`` itself when no residual is given); the new k (roped) and v are
written into the caches at ``positions``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from cf_cute.decode_attention import sm_count
from cf_cute.fused.qkv_project import QKVProject, QKVProjectConfig
from cf_cute.fused.qkv_rope import QKVRope, QKVRopeConfig
from cf_cute.jit import TensorSpec, compile_kernel
from cf_cute.validate import check_operands, check_tensor, dtype_name, host_index_checked, kv_cache_layout

__all__ = ["pack_qkv", "qkv_rope", "qkv_rope_config", "qkv_project", "qkv_project_config", "project_grid",
           "arg_specs"]


def pack_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, num_heads: int,
             num_kv_heads: int) -> torch.Tensor:
    """nn.Linear q/k/v weights ``[heads*hd, H]``, ``[kv_heads*hd, H]`` x2 ->
    ``[kv_heads, (G+2)*hd, H]``: for KV head g, rows of query heads
    ``g*G .. g*G+G-1``, then k_g, then v_g (G = heads / kv_heads)."""
    hd = wq.shape[0] // num_heads
    H = wq.shape[1]
    G = num_heads // num_kv_heads
    q = wq.view(num_kv_heads, G * hd, H)
    return torch.cat([q, wk.view(num_kv_heads, hd, H), wv.view(num_kv_heads, hd, H)], dim=1).contiguous()


def qkv_rope_config(hidden, w_qkv, cos, k_cache, page_table, *, num_heads: int, num_kv_heads: int,
                    cluster_size: int, rope_style: str, eps: float, has_residual: bool,
                    layout: str = "linear") -> QKVRopeConfig:
    """``layout``: ``w_qkv``'s memory order, nn.Linear rows (``"linear"``) or the tiled
    order of the flattened ``[kv_heads * rows, H]`` matrix (``"tiled"``, :func:`cf_cute.tiles.tile_weight`)."""
    check_tensor("hidden", hidden, dtype=(torch.bfloat16, torch.float16), shape=(None, None), cuda=False)
    B, H = hidden.shape
    G = num_heads // max(num_kv_heads, 1)
    check_tensor("w_qkv", w_qkv, dtype=hidden.dtype, shape=(num_kv_heads, None, H), cuda=False)
    if w_qkv.shape[1] % (G + 2):
        raise ValueError(f"w_qkv must be [kv_heads, (G+2)*head_dim, H] with G = {G} (see pack_qkv), "
                         f"got {list(w_qkv.shape)}")
    hd = w_qkv.shape[1] // (G + 2)
    check_tensor("cos", cos, dtype=torch.float32, shape=(None, hd // 2), cuda=False, align=4)
    check_tensor("k_cache", k_cache, dtype=hidden.dtype, shape=(None, None, num_kv_heads, hd), cuda=False)
    common = dict(batch=B, hidden=H, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=hd,
                  max_positions=cos.shape[0], cluster_size=cluster_size, rope_style=rope_style, eps=eps,
                  has_residual=has_residual, dtype=dtype_name(hidden.dtype), w_layout=layout)
    cfg = QKVRopeConfig(**kv_cache_layout(k_cache, page_table, B), **common)
    cfg.validate()
    if w_qkv.shape[1] != cfg.rows:
        raise ValueError(f"w_qkv must be [kv_heads, (G+2)*head_dim, H] = [{num_kv_heads}, {cfg.rows}, {H}] "
                         f"(see pack_qkv), got {list(w_qkv.shape)}")
    return cfg


def project_grid(units: int, hidden: int, sm_count: int = 132, num_warps: int = 8) -> tuple:
    """``(cluster_size, k_parts, num_clusters)`` of :class:`QKVProject`: clusters of 2
    (1 when the hidden size does not split), the K parts that give the busiest warp the
    fewest MMA steps with at most one cluster per two SMs, then the fewest clusters that
    keep that count (the rest would only compute skipped units)."""
    best = None
    for c in (2, 1):
        for kp in (2, 4):
            if hidden % (c * kp * 32) or num_warps % (2 * kp):
                continue
            up = num_warps // (2 * kp)
            j = -(-units // max(1, sm_count // c))
            j = -(-j // up) * up
            steps = (j // up) * (hidden // (c * kp * 32))
            if best is None or steps < best[0]:
                best = (steps, c, kp, -(-units // j))
        if best is not None:
            return best[1:]
    raise ValueError(f"hidden = {hidden} must be a multiple of 64")


def qkv_project_config(hidden, w_qkv, cos, k_cache, page_table, *, num_heads: int, num_kv_heads: int,
                       rope_style: str, eps: float, has_residual: bool, sm_count: int = 132,
                       pipeline: bool | None = None, early_loads: bool | None = None,
                       layout: str = "linear") -> QKVProjectConfig:
    """:class:`QKVProjectConfig` for these operands (the same checks as :func:`qkv_rope_config`),
    its grid from :func:`project_grid`. ``pipeline=None``: one load pipeline across a
    warp's tiles up to batch 8, as the MLP block (H200, Llama-2-7B shape: batch 1 35.9
    vs 43.2 µs, batch 16 66.4 vs 55.8). ``early_loads=None``: the first W loads before the
    norm front above batch 8 (batch 16 43.9 vs 55.4 µs, batch 1 37.2 vs 36.6)."""
    base = qkv_rope_config(hidden, w_qkv, cos, k_cache, page_table, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, cluster_size=1, rope_style=rope_style, eps=eps,
                           has_residual=has_residual, layout=layout)
    fields = dataclasses.asdict(base)
    fields.pop("smem_budget")
    c, kp, nc = project_grid(num_kv_heads * base.rows // 32, base.hidden, sm_count)
    fields.update(cluster_size=c, k_parts=kp, num_clusters=nc,
                  pipeline=base.batch <= 8 if pipeline is None else pipeline,
                  early_loads=base.batch > 8 if early_loads is None else early_loads)
    cfg = QKVProjectConfig(**fields)
    cfg.validate()
    return cfg


def arg_specs(cfg: QKVRopeConfig | QKVProjectConfig) -> list:
    """Fake-tensor specs of (hidden, residual, norm_w, w_qkv, cos, sin, positions, k_cache, v_cache,
    page_table, q, h); :class:`QKVProject` sees w_qkv as ``[kv_heads * rows, H]``."""
    dt, B, H = cfg.dtype, cfg.batch, cfg.hidden
    kv, table = cfg.kv_shape, cfg.table_shape
    rope = (cfg.max_positions, cfg.head_dim // 2)
    return [TensorSpec(dt, (B, H)), TensorSpec(dt, (B, H)), TensorSpec(dt, (H,)),
            TensorSpec(dt, (cfg.num_kv_heads * cfg.rows, H) if isinstance(cfg, QKVProjectConfig)
                       else (cfg.num_kv_heads, cfg.rows, H)),
            TensorSpec("float32", rope, align=4),
            TensorSpec("float32", rope, align=4), TensorSpec("int32", (B,), align=4),
            TensorSpec(dt, kv), TensorSpec(dt, kv), TensorSpec("int32", table, align=4),
            TensorSpec(dt, (B, cfg.num_heads, cfg.head_dim)), TensorSpec(dt, (B, H))]


@functools.lru_cache(maxsize=None)
def _kernel(cfg: QKVRopeConfig | QKVProjectConfig):
    cls = QKVProject if isinstance(cfg, QKVProjectConfig) else QKVRope
    return compile_kernel(cls, cfg, arg_specs(cfg))


def qkv_rope(hidden, norm_w, w_qkv, cos, sin, positions, k_cache, v_cache, *, num_heads: int,
             num_kv_heads: int, residual=None, page_table=None, cluster_size: int = 4,
             rope_style: str = "neox", eps: float = 1e-5, layout: str = "linear"):
    """One cluster of ``cluster_size`` CTAs per KV head (:mod:`cf_cute.fused.qkv_rope`)."""
    cfg = qkv_rope_config(hidden, w_qkv, cos, k_cache, page_table, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, cluster_size=cluster_size, rope_style=rope_style,
                          eps=eps, has_residual=residual is not None, layout=layout)
    return _launch(cfg, hidden, norm_w, w_qkv, cos, sin, positions, k_cache, v_cache, residual, page_table)


def qkv_project(hidden, norm_w, w_qkv, cos, sin, positions, k_cache, v_cache, *, num_heads: int,
                num_kv_heads: int, residual=None, page_table=None, rope_style: str = "neox", eps: float = 1e-5,
                layout: str = "linear"):
    """The same result as :func:`qkv_rope` from the grid-wide kernel
    (:mod:`cf_cute.fused.qkv_project`: every head's rows spread over all SMs), the
    faster one at large batches."""
    cfg = qkv_project_config(hidden, w_qkv, cos, k_cache, page_table, num_heads=num_heads,
                             num_kv_heads=num_kv_heads, rope_style=rope_style, eps=eps,
                             has_residual=residual is not None, sm_count=sm_count(hidden.device), layout=layout)
    return _launch(cfg, hidden, norm_w, w_qkv.view(-1, w_qkv.shape[-1]), cos, sin, positions, k_cache, v_cache,
                   residual, page_table)


def _launch(cfg, hidden, norm_w, w_qkv, cos, sin, positions, k_cache, v_cache, residual, page_table):
    """Checks every operand (nothing is written before they pass), then launches."""
    B, H = hidden.shape
    check_tensor("norm_w", norm_w, dtype=hidden.dtype, shape=(H,), cuda=False)
    check_tensor("sin", sin, dtype=torch.float32, shape=tuple(cos.shape), cuda=False, align=4)
    check_tensor("v_cache", v_cache, dtype=hidden.dtype, shape=tuple(k_cache.shape), cuda=False)
    check_tensor("positions", positions, dtype=torch.int32, shape=(B,), cuda=False, align=4)
    if residual is not None:
        check_tensor("residual", residual, dtype=hidden.dtype, shape=(B, H), cuda=False)
    positions = host_index_checked(positions, 0, min(cfg.max_len, cfg.max_positions) - 1, "positions",
                                   hidden.device, f" (cache capacity {cfg.max_len}, RoPE table {cfg.max_positions})")
    if page_table is None:
        page_table = torch.zeros(1, 1, dtype=torch.int32, device=hidden.device)
    else:
        page_table = host_index_checked(page_table, 0, cfg.num_pages - 1, "page_table entries", hidden.device)
    q = torch.empty(B, cfg.num_heads, cfg.head_dim, dtype=hidden.dtype, device=hidden.device)
    h = torch.empty_like(hidden) if residual is not None else hidden
    res = residual if residual is not None else hidden
    check_operands(("hidden", "residual", "norm_w", "w_qkv", "k_cache", "v_cache", "q", "h", "cos", "sin",
                    "positions", "page_table"),
                   hidden, res, norm_w, w_qkv, k_cache, v_cache, q, h, cos, sin, positions, page_table,
                   align=(16,) * 8 + (4,) * 4)
    _kernel(cfg)(hidden, res, norm_w, w_qkv, cos, sin, positions, k_cache, v_cache, page_table, q, h)
    return q, h
