"""The attention half of a Llama decoder layer at decode time, from torch.

    packed = pack_attention(weights, num_heads=32, num_kv_heads=8)      # once
    out = attention_block(hidden, packed, k_cache, v_cache, positions, cos, sin,
                          residual=None, page_table=None)

``out = h + o_proj(attention(rmsnorm(h)))`` with ``h = hidden (+ residual)``:
the next block's input. The new k/v land in the caches at ``positions``.
``attention_block`` is one launch of ``cf_cute.fused.attention_block``
(phase A per KV-head cluster, then phase B the output
projection); ``attention_block_unfused`` is the same computation as three
launches (``qkv_rope`` -> ``decode_attention`` -> ``splitk_gemv``), kept as a
baseline.

The single launch's output projection runs over the whole grid (``o_proj="grid"``: every
CTA must be resident at once, checked against the GPU on first use) once attn is complete:
after a grid barrier (MHA) or, per warp, once the KV heads of its K slice are counted
written (``grid_sync="flags"``, GQA); or per KV-head cluster with partials combined by
arrival counters (``o_proj="head"``, GQA up to hidden 2048, no residency needed). It needs
a small workspace per (shape, device): the attention output ``[B, heads*hd]``, the
residual stream, and the barrier state (with ``"flags"`` a counter a KV head, with
``"head"`` the arrival counters and the fp32 partials). Calls
that share a workspace must not run concurrently on different streams; pass
``workspace=AttentionWorkspace(...)`` of your own for that.
``torch.ops.cf_cute.attention_block`` is the fused call as a custom op (it
mutates the caches; fake implementation included) for torch.compile; its last
argument is the weights' memory order (``PackedAttention.layout``).

``pack_attention`` stores both weights in the GEMV core's tiled order by default
(:mod:`cf_cute.tiles`); ``layout="linear"`` keeps nn.Linear order, which every
kernel reads too, bit for bit the same results.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from cf_cute.decode_attention import decode_attention, sm_count
from cf_cute.decode_attention import default_cluster_size as default_attention_cluster
from cf_cute.fused.attention_block import AttentionBlock, AttentionBlockConfig
from cf_cute.fused.decode_attention import takes_tensor_cores
from cf_cute.gemv import splitk_gemv
from cf_cute.jit import TensorSpec, compile_kernel
from cf_cute.primitives import GridBarrier
from cf_cute.qkv_rope import pack_qkv, qkv_project, qkv_rope
from cf_cute.reference import AttentionWeights
from cf_cute.tiles import stored_weight, untile_weight
from cf_cute.validate import check_operands, check_tensor, dtype_name, host_index_checked, kv_cache_layout

__all__ = ["PackedAttention", "pack_attention", "linear_attention", "attention_block", "attention_block_unfused",
           "attention_block_config", "default_cluster_size", "FUSED_MAX_BATCH", "single_launch_pays",
           "AttentionWorkspace",
           "AttentionTuning", "UnfusedPlan", "unfused_plan", "arg_specs"]


# Above this batch the automatic choice is the three-launch path: the single launch attends to
# its requests one after another inside each CTA, on one cluster per KV head. H200, Llama-2-7B and
# Llama-3-8B shapes, 1K / 4K / 16K (benchmarks/RESULTS.md, session 12): the single launch is
# faster at batch 2 (MHA 56.8 / 82.1 / 186.2 µs against 64.3 / 92.0 / 202.1; GQA 51.1 / 60.8 /
# 99.0 against 57.1 / 63.4 / 98.1), three launches from batch 3 on (GQA 56.0 / 67.7 / 113.4 against
# 60.8 / 72.8 / 116.3; batch 8 60.2 / 94.1 / 229.3 against 93.0 / 130.2 / 277.9). An explicit
# cluster_size still forces the single launch. GQA: see single_launch_pays.
FUSED_MAX_BATCH = 2


def single_launch_pays(batch: int, hidden: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether :func:`attention_block`'s automatic choice is the single launch: MHA up to
    ``FUSED_MAX_BATCH``; GQA (tensor-core attention) while the weights are small enough for the
    launch latencies to dominate, ``hidden * (batch + 1) <= 6144``, and at batch 1 up to hidden
    4096 (the measured shapes). Since session 13 the three-launch path's decode attention splits
    each (request, KV head) over several clusters and wins elsewhere. H200, µs at 1K / 16K, one
    launch against three (session 13): Llama-3.2-1B shape (hidden 2048) batch 1 23.0 / 35.9
    against 29.9 / 39.6, batch 2 27.4 / 51.3 against 31.9 / 49.4; Llama-3.2-3B (3072) batch 1
    34.8 / 54.0 against 38.1 / 53.9, batch 2 42.8 / 79.3 against 40.4 / 68.7; Llama-3-8B (4096)
    batch 2 52.7 / 89.0 against 45.8 / 74.0. Llama-3-8B at batch 1 with the output projection per
    KV-head cluster and the QKV pipeline (session 16): 41.7 / 45.7 / 60.1 at 1K / 4K / 16K
    against 43.0 / 47.8 / 58.9 (session 15, before the pipeline: 42.0 / 46.4 / 60.7 against
    43.2 / 48.5 / 59.0): one launch, 3-4% faster up to 4K, 2% slower at 16K."""
    if batch > FUSED_MAX_BATCH:
        return False
    if not takes_tensor_cores(num_heads, num_kv_heads):
        return True
    return hidden * (batch + 1) <= 6144 or (batch == 1 and hidden <= 4096)

_BLOCK_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AttentionBlockConfig)}


@dataclass(frozen=True)
class AttentionTuning:
    """Knobs of the fused kernel that change speed, never results. The defaults are
    :class:`AttentionBlockConfig`'s (documented there), so the two cannot drift."""
    unroll: int = _BLOCK_DEFAULTS["unroll"]
    attn_unroll: int = _BLOCK_DEFAULTS["attn_unroll"]
    attn_fold_budget: int = _BLOCK_DEFAULTS["attn_fold_budget"]
    attn_tensor_cores: bool = _BLOCK_DEFAULTS["attn_tensor_cores"]
    attn_mma_depth: int | None = _BLOCK_DEFAULTS["attn_mma_depth"]
    l2_prefetch: bool = _BLOCK_DEFAULTS["l2_prefetch"]
    pipeline_tiles: bool | None = _BLOCK_DEFAULTS["pipeline_tiles"]
    early_loads: bool = _BLOCK_DEFAULTS["early_loads"]       # QKV: first W loads under the norm
    early_wo_prefetch: bool = _BLOCK_DEFAULTS["early_wo_prefetch"]
    early_phase_b: bool = _BLOCK_DEFAULTS["early_phase_b"]
    phase_timer: bool = _BLOCK_DEFAULTS["phase_timer"]       # per-CTA stamps in workspace.barrier[2:]
    num_threads: int | None = _BLOCK_DEFAULTS["num_threads"]
    pdl: bool = _BLOCK_DEFAULTS["pdl"]                       # programmatic dependent launch
    o_proj: str | None = _BLOCK_DEFAULTS["o_proj"]           # "grid" or "head"; None: per shape
    grid_sync: str | None = _BLOCK_DEFAULTS["grid_sync"]     # "grid": grid barrier or per-head flags
    o_early_loads: bool = _BLOCK_DEFAULTS["o_early_loads"]
    o_stage_tiles: int = _BLOCK_DEFAULTS["o_stage_tiles"]


@dataclass
class PackedAttention:
    norm: torch.Tensor        # [H]
    w_qkv: torch.Tensor       # [kv_heads, (G+2)*hd, H]  (pack_qkv)
    wo: torch.Tensor          # [H, heads*hd]
    num_heads: int
    num_kv_heads: int
    eps: float = 1e-5
    rope_style: str = "neox"
    layout: str = "linear"    # memory order of w_qkv and wo: "linear" (nn.Linear) or "tiled" (cf_cute.tiles)


def pack_attention(weights: AttentionWeights, *, num_heads: int, num_kv_heads: int, eps: float = 1e-5,
                   rope_style: str = "neox", layout: str = "tiled") -> PackedAttention:
    """One-time packing of nn.Linear-layout weights (same dtype and device as given):
    q/k/v rows grouped per KV head (:func:`cf_cute.qkv_rope.pack_qkv`) and, with
    ``layout="tiled"`` (default), both weights in the GEMV core's tiled order
    (:mod:`cf_cute.tiles`; the same results bit for bit)."""
    w_qkv = stored_weight(pack_qkv(weights.wq, weights.wk, weights.wv, num_heads, num_kv_heads), layout)
    wo = stored_weight(weights.wo.contiguous(), layout)
    return PackedAttention(norm=weights.norm.contiguous(), w_qkv=w_qkv, wo=wo, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, eps=eps, rope_style=rope_style, layout=layout)


def linear_attention(packed: PackedAttention) -> PackedAttention:
    """``packed`` with both weights in nn.Linear order (copies when tiled), for torch paths."""
    if packed.layout == "linear":
        return packed
    return dataclasses.replace(packed, w_qkv=untile_weight(packed.w_qkv), wo=untile_weight(packed.wo),
                               layout="linear")


@dataclass(frozen=True)
class UnfusedPlan:
    """Cluster sizes of the three launches of :func:`attention_block_unfused`
    (``qkv=None``: the grid-wide :func:`cf_cute.qkv_rope.qkv_project`)."""
    qkv: int | None
    attn: int
    wo: int
    wo_block_m: int = 128


def unfused_plan(batch: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 sm_count: int = 132) -> UnfusedPlan:
    """Per-kernel cluster sizes, none of which needs a resident grid. Measured alone
    on an H200 (benchmarks/RESULTS.md, session 5; Llama-2-7B / Llama-3-8B shapes,
    batch 1 and 16): the output projection was fastest with clusters of 8 (18 µs
    against 30 with clusters of 4 at batch 16), decode attention as
    :func:`cf_cute.decode_attention.default_cluster_size` picks, the QKV projection
    grid-wide (:func:`cf_cute.qkv_rope.qkv_project`; one cluster per KV head, the best
    of which took 76 µs at batch 16, when head_dim is not a multiple of 32). Smaller
    clusters where a size does not divide the shapes."""
    qkv = None if head_dim % 32 == 0 and hidden % 64 == 0 else next(c for c in (8, 4, 2, 1)
                                                                   if hidden % (32 * c) == 0)
    o_k = num_heads * head_dim
    wo, bm = next(((c, bm) for c in (8, 4, 2, 1) for bm in (128, 64, 32, 16)
                   if o_k % (32 * c) == 0 and hidden % bm == 0), (1, 16))
    attn = default_attention_cluster(batch, num_kv_heads, sm_count,
                                     tensor_cores=takes_tensor_cores(num_heads, num_kv_heads))
    return UnfusedPlan(qkv=qkv, attn=attn, wo=wo, wo_block_m=bm)


def attention_block_unfused(hidden: torch.Tensor, packed: PackedAttention, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            *, residual: torch.Tensor | None = None, page_table: torch.Tensor | None = None,
                            cluster_size: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The same block as three launches (what ``attention_block`` runs where
    :func:`single_launch_pays` says no, or when no single-launch grid is resident at
    once). ``cluster_size=None``: each launch at its own :func:`unfused_plan` size; an
    int forces it on all three."""
    B, H = hidden.shape
    hd = packed.wo.shape[1] // packed.num_heads
    if cluster_size is None:
        plan = unfused_plan(B, H, packed.num_heads, packed.num_kv_heads, hd, sm_count(hidden.device))
    else:
        plan = UnfusedPlan(cluster_size, cluster_size, cluster_size)
    front = dict(num_heads=packed.num_heads, num_kv_heads=packed.num_kv_heads, residual=residual,
                 page_table=page_table, rope_style=packed.rope_style, eps=packed.eps, layout=packed.layout)
    args = (hidden, packed.norm, packed.w_qkv, cos, sin, positions, k_cache, v_cache)
    if plan.qkv is None:
        q, h = qkv_project(*args, **front)
    else:
        q, h = qkv_rope(*args, cluster_size=plan.qkv, **front)
    lengths = positions + 1                       # stays on the device it is on: no sync
    if page_table is not None and page_table.device != hidden.device:
        page_table = page_table.to(hidden.device, non_blocking=True)
    o = decode_attention(q, k_cache, v_cache, lengths, page_table=page_table, cluster_size=plan.attn)
    return splitk_gemv(o.view(o.shape[0], -1), packed.wo, residual=h, cluster_size=plan.wo,
                       block_m=plan.wo_block_m, out=out, layout=packed.layout)


def _cluster_sizes(num_kv_heads: int, hidden: int, sm_count: int = 132) -> list:
    """Power-of-two cluster sizes from 16 down to 2, largest first, with one cluster
    per KV head fitting in one wave of ``sm_count`` SMs and dividing the hidden size."""
    return [c for c in (16, 8, 4, 2) if num_kv_heads * c <= sm_count and hidden % (32 * c) == 0]


def default_cluster_size(num_kv_heads: int, hidden: int, sm_count: int = 132) -> int:
    """The largest of :func:`_cluster_sizes` (1 when none fits)."""
    return next(iter(_cluster_sizes(num_kv_heads, hidden, sm_count)), 1)


def attention_block_config(hidden, packed: PackedAttention, k_cache, cos, page_table, *, cluster_size: int,
                           has_residual: bool, tuning: AttentionTuning | None = None) -> AttentionBlockConfig:
    check_tensor("hidden", hidden, dtype=(torch.bfloat16, torch.float16), shape=(None, None), cuda=False)
    B, H = hidden.shape
    nh, nkv = packed.num_heads, packed.num_kv_heads
    check_tensor("w_qkv", packed.w_qkv, dtype=hidden.dtype, shape=(nkv, None, H), cuda=False)
    G = nh // max(nkv, 1)
    hd = packed.w_qkv.shape[1] // (G + 2)
    check_tensor("wo", packed.wo, dtype=hidden.dtype, shape=(H, nh * hd), cuda=False)
    check_tensor("norm", packed.norm, dtype=hidden.dtype, shape=(H,), cuda=False)
    check_tensor("cos", cos, dtype=torch.float32, shape=(None, hd // 2), cuda=False, align=4)
    check_tensor("k_cache", k_cache, dtype=hidden.dtype, shape=(None, None, nkv, hd), cuda=False)
    common = dict(batch=B, hidden=H, num_heads=nh, num_kv_heads=nkv, head_dim=hd, max_positions=cos.shape[0],
                  cluster_size=cluster_size, rope_style=packed.rope_style, eps=packed.eps,
                  has_residual=has_residual, dtype=dtype_name(hidden.dtype), w_layout=packed.layout,
                  **dataclasses.asdict(tuning or AttentionTuning()))
    cfg = AttentionBlockConfig(**kv_cache_layout(k_cache, page_table, B), **common)
    cfg.validate()
    if packed.w_qkv.shape[1] != (G + 2) * hd:
        raise ValueError(f"w_qkv must be [kv_heads, (G+2)*head_dim, H] (see pack_qkv), got {list(packed.w_qkv.shape)}")
    return cfg


def arg_specs(cfg: AttentionBlockConfig) -> list:
    """Fake-tensor specs of (hidden, residual, norm, w_qkv, wo, cos, sin, positions, k_cache, v_cache,
    page_table, attn, h_out, barrier, out)."""
    dt, B, H = cfg.dtype, cfg.batch, cfg.hidden
    rope = (cfg.max_positions, cfg.head_dim // 2)
    return [TensorSpec(dt, (B, H)), TensorSpec(dt, (B, H)), TensorSpec(dt, (H,)),
            TensorSpec(dt, (cfg.num_kv_heads, (cfg.group + 2) * cfg.head_dim, H)), TensorSpec(dt, (H, cfg.o_k)),
            TensorSpec("float32", rope, align=4), TensorSpec("float32", rope, align=4),
            TensorSpec("int32", (B,), align=4), TensorSpec(dt, cfg.kv_shape), TensorSpec(dt, cfg.kv_shape),
            TensorSpec("int32", cfg.table_shape, align=4), TensorSpec(dt, (B, cfg.o_k)), TensorSpec(dt, (B, H)),
            TensorSpec("int32", (cfg.state_words,), align=cfg.state_align),
            TensorSpec(dt, (B, H))]


@dataclass
class AttentionWorkspace:
    """Scratch of one fused attention launch: attention output, residual
    stream, grid-barrier state (zeroed once; it resets itself)."""
    attn: torch.Tensor
    h: torch.Tensor
    barrier: torch.Tensor

    @classmethod
    def new(cls, cfg: AttentionBlockConfig, device) -> "AttentionWorkspace":
        dt = getattr(torch, cfg.dtype)
        return cls(attn=torch.empty(cfg.batch, cfg.o_k, dtype=dt, device=device),
                   h=torch.empty(cfg.batch, cfg.hidden, dtype=dt, device=device),
                   barrier=torch.zeros(cfg.state_words, dtype=torch.int32, device=device))


@functools.lru_cache(maxsize=None)
def _fused_kernel(cfg: AttentionBlockConfig):
    return compile_kernel(AttentionBlock, cfg, arg_specs(cfg))


@functools.lru_cache(maxsize=None)
def _resident_ctas(cfg: AttentionBlockConfig, device_index: int) -> int:
    """CTAs of this kernel (its shared memory, block size, CTAs per SM) resident at once."""
    from cf_cute.primitives import max_resident_clusters
    k = AttentionBlock(cfg)
    with torch.cuda.device(device_index):
        return max_resident_clusters(cfg.cluster_size, k.smem_bytes, cfg.num_threads, k.ctas_per_sm) * cfg.cluster_size


_workspaces: dict = {}


def _auto_config(hidden, packed, k_cache, cos, page_table, has_residual: bool, dev: int,
                 tuning: AttentionTuning | None) -> AttentionBlockConfig | None:
    """The config at the largest cluster size whose grid is resident at once, or None."""
    for c in _cluster_sizes(packed.num_kv_heads, hidden.shape[-1]):
        try:
            cfg = attention_block_config(hidden, packed, k_cache, cos, page_table, cluster_size=c,
                                         has_residual=has_residual, tuning=tuning)
            if hidden.device.type != "cuda" or not cfg.needs_resident_grid or cfg.grid <= _resident_ctas(cfg, dev):
                return cfg
        except ValueError:               # invalid or over the shared-memory limit at this size
            continue
    return None


_plans: dict = {}


def _planned(hidden, packed: PackedAttention, k_cache, cos, page_table, has_residual: bool,
             cluster_size: int | None, tuning: AttentionTuning | None, dev: int) -> AttentionBlockConfig | None:
    """The single-launch config for these operands, or None for the three-launch path:
    planned and checked on the first call for their shapes, dtypes and options, then
    looked up (eager callers skip rebuilding and validating the config)."""
    key = (hidden.shape, hidden.dtype, hidden.device, packed.w_qkv.shape, packed.w_qkv.dtype, packed.wo.shape,
           packed.wo.dtype, packed.norm.shape, packed.norm.dtype, packed.num_heads, packed.num_kv_heads,
           packed.eps, packed.rope_style, packed.layout, k_cache.shape, k_cache.dtype, cos.shape, cos.dtype,
           None if page_table is None else page_table.shape, has_residual, cluster_size, tuning)
    if key in _plans:
        return _plans[key]
    B = hidden.shape[0]
    if cluster_size is None and (B > FUSED_MAX_BATCH if tuning is not None
                                 else not single_launch_pays(B, hidden.shape[1], packed.num_heads,
                                                             packed.num_kv_heads)):
        cfg = None
    elif cluster_size is None:         # the largest cluster whose grid is resident at once
        cfg = _auto_config(hidden, packed, k_cache, cos, page_table, has_residual, dev, tuning)
    else:
        cfg = attention_block_config(hidden, packed, k_cache, cos, page_table, cluster_size=cluster_size,
                                     has_residual=has_residual, tuning=tuning)
    return _plans.setdefault(key, cfg)


@functools.lru_cache(maxsize=None)
def _no_table(device) -> torch.Tensor:
    """The page-table operand of a contiguous cache (never read)."""
    return torch.zeros(1, 1, dtype=torch.int32, device=device)


def attention_block(hidden: torch.Tensor, packed: PackedAttention, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                    residual: torch.Tensor | None = None, page_table: torch.Tensor | None = None,
                    cluster_size: int | None = None, out: torch.Tensor | None = None,
                    workspace: AttentionWorkspace | None = None,
                    tuning: AttentionTuning | None = None) -> torch.Tensor:
    """One launch: (residual add) + RMSNorm + QKV + RoPE + KV append + decode
    attention + output projection + residual. Returns ``out [B, hidden]``.
    ``cluster_size=None`` is the automatic choice: :func:`attention_block_unfused`
    where :func:`single_launch_pays` says so (GQA above small models; anything above
    ``FUSED_MAX_BATCH``),
    else the largest cluster whose grid (one cluster per KV head) is resident at
    once on this GPU, falling back to the three launches when there is none
    (Llama-2-7B at batch 16: its 128 CTAs of 216 KB do not fit the 120 SMs that hold
    clusters of 4). ``tuning`` (the single launch's knobs) takes the single launch up
    to ``FUSED_MAX_BATCH`` whatever the heads; an explicit ``cluster_size`` at any batch.
    Positions on the CPU are range-checked before the launch; on the GPU they
    are clamped to the cache by the kernel (no host sync)."""
    dev = hidden.device.index if hidden.device.index is not None else 0
    cfg = _planned(hidden, packed, k_cache, cos, page_table, residual is not None, cluster_size, tuning, dev)
    if cfg is None:                    # three launches (single_launch_pays says no, or no resident grid)
        return attention_block_unfused(hidden, packed, k_cache, v_cache, positions, cos, sin,
                                       residual=residual, page_table=page_table, out=out)
    cluster_size = cfg.cluster_size
    B, H = hidden.shape
    check_tensor("sin", sin, dtype=torch.float32, shape=tuple(cos.shape), cuda=False, align=4)
    check_tensor("v_cache", v_cache, dtype=hidden.dtype, shape=tuple(k_cache.shape), cuda=False)
    check_tensor("positions", positions, dtype=torch.int32, shape=(B,), cuda=False, align=4)
    if residual is not None:
        check_tensor("residual", residual, dtype=hidden.dtype, shape=(B, H), cuda=False)
    if out is not None:
        check_tensor("out", out, dtype=hidden.dtype, shape=(B, H), cuda=False)
    cap = min(cfg.max_len, cfg.max_positions)
    positions = host_index_checked(positions, 0, cap - 1, "positions", hidden.device,
                                   f" (cache capacity {cfg.max_len}, RoPE table {cfg.max_positions})")
    if page_table is None:
        page_table = _no_table(hidden.device)
    else:
        page_table = host_index_checked(page_table, 0, cfg.num_pages - 1, "page_table entries", hidden.device)
    if hidden.device.type != "cuda":
        raise ValueError(f"operands must be on a CUDA device, got {hidden.device}")
    if cfg.needs_resident_grid and cfg.grid > _resident_ctas(cfg, dev):
        raise ValueError(f"the fused attention block needs {cfg.grid} CTAs ({cfg.num_kv_heads} clusters of "
                         f"{cluster_size}) resident at once; this GPU holds {_resident_ctas(cfg, dev)}: "
                         f"use a smaller cluster_size")
    if workspace is None:
        key = (cfg, dev)
        workspace = _workspaces.get(key)
        if workspace is None:
            workspace = _workspaces.setdefault(key, AttentionWorkspace.new(cfg, hidden.device))
    elif (workspace.barrier.shape != (cfg.state_words,)
          or workspace.attn.shape != (B, cfg.o_k)
          or workspace.h.shape != (B, H)):
        raise ValueError("workspace does not match these shapes: build it with AttentionWorkspace.new(cfg, device)")
    if out is None:
        out = torch.empty_like(hidden)
    res = residual if residual is not None else hidden
    check_operands(("hidden", "residual", "norm", "w_qkv", "wo", "k_cache", "v_cache", "out", "attn", "h",
                    "cos", "sin", "positions", "page_table", "barrier"),
                   hidden, res, packed.norm, packed.w_qkv, packed.wo, k_cache, v_cache, out, workspace.attn,
                   workspace.h, cos, sin, positions, page_table, workspace.barrier,
                   align=(16,) * 10 + (4,) * 4 + (cfg.state_align,))
    _fused_kernel(cfg)(hidden, res, packed.norm, packed.w_qkv, packed.wo, cos, sin, positions, k_cache, v_cache,
                       page_table, workspace.attn, workspace.h, workspace.barrier, out)
    return out


@torch.library.custom_op("cf_cute::attention_block", mutates_args=("k_cache", "v_cache"))
def _attention_block_op(hidden: torch.Tensor, norm: torch.Tensor, w_qkv: torch.Tensor, wo: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, residual: torch.Tensor | None, page_table: torch.Tensor | None,
                        num_heads: int, num_kv_heads: int, eps: float, rope_style: str,
                        layout: str = "linear") -> torch.Tensor:
    packed = PackedAttention(norm, w_qkv, wo, num_heads, num_kv_heads, eps, rope_style, layout)
    return attention_block(hidden, packed, k_cache, v_cache, positions, cos, sin, residual=residual,
                           page_table=page_table)


@_attention_block_op.register_fake
def _(hidden, norm, w_qkv, wo, k_cache, v_cache, positions, cos, sin, residual, page_table, num_heads,
      num_kv_heads, eps, rope_style, layout="linear"):
    return torch.empty_like(hidden)
