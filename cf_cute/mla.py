"""DeepSeek-V2 MLA decode attention (issue 6): weight packing for the absorbed
form, input checks, and the unfused torch step that the fused kernel is measured
against.

STATUS: ``mla_decode_torch`` is tested on the CPU against the fp32 references of
:mod:`cf_cute.reference_mla` (which match transformers' DeepseekV2Attention).
``mla_decode`` (the fused path, four or five launches, below) compiles for sm_90a, its
input checks are CPU-tested, and it is GPU-tested on an H200 (tests/test_mla.py
``-m gpu``, session 6: batch 1-16, contiguous and paged, fp16/bf16, context up to
32768; 2.4-3.4x the torch CUDA-graph step, benchmarks/RESULTS.md).

Fused path (``mla_decode``), four launches on the current stream (five with
``MLATuning(fuse_out=False)`` or where the shape does not allow 4 + 5 as one), no host sync::

    1 MLAFront     (fused/mla_front.py)      y = rmsnorm(h) @ w_front.T          [B, rows]   (+ h)
    2 MLAAbsorb    (fused/mla_absorb.py)     qf = [W_UK q_nope | rope(q_pe)]     [B, heads, rank + rope]
                                             latent norm + rope(k_pe), cache append
    3 MLAStagedAttention (fused/mla_attention_staged.py; the direct MLAAttention of
                   fused/mla_attention.py with ``MLATuning(staged=False)``)
                                             per (request, split): fp32 partial (o, m, l); the
                                             staged kernel bulk-copies cache rows into a ring of
                                             shared-memory stages ahead of the math
    4 MLAOut       (fused/mla_out.py)        merge the splits (split order), o = W_UV o_lat
    5 SplitKGemv   (fused/splitk_gemv.py)    out = h + o @ wo.T
    4+5 MLAOutProj (fused/mla_out_proj.py)   both of the above in one launch, a grid barrier
                                             between them (the default, ``MLAPlanKey.fused_out``)

Each launch is a programmatic dependent of the one before (``MLATuning.pdl``): it may
start while the previous one finishes, and before its first read of the previous launch's
output or its first write it hands off (``cf_cute.primitives.pdl_handoff``: wait for the
previous launch, then let the next start); every launch hands off, so the whole chain stays
ordered. Before the hand-off MLAFront issues its first weight loads
(``front_early_loads``), the staged attention copies cache rows older than the appended
one, MLAOut and the wo GEMV (MLAOutProj) ask L2 for their weights. The append (launch 2)
precedes every cache read (launch 3): no race. Limits (ValueError
before any launch): bf16/fp16 only, 1..16 heads (one MMA N side in the attention), a
paged cache's page_size a multiple of 16, rank a multiple of 128, hidden of 128.
Rounding differs from the torch step where the kernel keeps fp32 (unnormalised p is
rounded to the dtype for the tensor-core P V; h + o @ wo.T adds a dtype-rounded h when a
residual is given). Scratch: one workspace per (plan, device), reused by every call.

Packed layout (``pack_mla``; every GEMV weight has its outputs on rows and its
reduction dimension contiguous, the layout of the tensor-core GEMV core)::

    w_front [heads * (nope + rope) + rank + rope, hidden]   q_proj rows, then kv_a rows: the whole
                                                            front of the block is one weight stream
    w_uk    [heads, rank, nope]    W_UK[h].T: q_lat[h] = W_UK[h].T @ q_nope[h]   (absorbed into q)
    w_uv    [heads, v, rank]       W_UV[h]:   o[h]     = W_UV[h] @ o_lat[h]      (absorbed into o)
    wo      [hidden, heads * v]    o_proj as given

    layout="tiled" (pack_mla's default): the same shapes, each stored in the GEMV core's
    tiled order (cf_cute.tiles; w_uk and w_uv as their [heads * rows, K] matrices)

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

import dataclasses
import functools
from dataclasses import dataclass

import torch

from cf_cute.reference import apply_rope
from cf_cute.reference_mla import MLAShape, MLAWeights
from cf_cute.tiles import stored_weight, untile_weight
from cf_cute.validate import check_operands, check_tensor, dtype_name, host_index_checked

__all__ = ["PackedMLA", "pack_mla", "linear_mla", "check_mla_operands", "mla_decode_torch", "mla_decode", "MLATuning",
           "MLAPlanKey", "mla_plan_key", "mla_kernels", "mla_splits"]


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
    layout: str = "linear"    # memory order of w_front, w_uk, w_uv, wo: "linear" or "tiled" (cf_cute.tiles)


def pack_mla(w: MLAWeights, shape: MLAShape, *, scale: float, eps: float = 1e-6,
             layout: str = "tiled") -> PackedMLA:
    """One-time repacking of nn.Linear-layout weights (module docstring); dtype and
    device are kept. ``layout="tiled"`` (default) also puts the four GEMV weights in the
    GEMV core's tiled order (:mod:`cf_cute.tiles`; the same results bit for bit)."""
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
    mats = dict(w_front=torch.cat([w.wq, w.wkv_a]).contiguous(),
                w_uk=wkv_b[:, : S.qk_nope_head_dim].transpose(1, 2).contiguous(),
                w_uv=wkv_b[:, S.qk_nope_head_dim:].contiguous(), wo=w.wo.contiguous())
    mats = {k: stored_weight(v, layout) for k, v in mats.items()}
    return PackedMLA(norm=w.norm.contiguous(), kv_norm=w.kv_norm.contiguous(), shape=S, scale=scale, eps=eps,
                     layout=layout, **mats)


def linear_mla(packed: PackedMLA) -> PackedMLA:
    """``packed`` with its GEMV weights in nn.Linear order (copies when tiled): what the
    torch step :func:`mla_decode_torch` computes with."""
    if packed.layout == "linear":
        return packed
    return dataclasses.replace(packed, layout="linear", **{k: untile_weight(getattr(packed, k))
                                                           for k in ("w_front", "w_uk", "w_uv", "wo")})


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
    packed = linear_mla(packed)       # tiled weights: copies (benchmarks pass a linear pack)
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


# ---------------------------------------------------------------------------------------------
# The fused path

def mla_splits(batch: int, capacity: int, sm_count: int = 132, waves: int = 2) -> int:
    """CTAs per request of the latent attention: about ``waves`` CTAs per SM over the
    batch, but no CTA with fewer than 64 cache slots to read (batch 1 at 4K: 65 splits
    51.4 µs, 132 54.0). The direct kernel fits two CTAs an SM (H200, bf16, step time with
    splits of one wave / two / three: batch 16 at 32K 586 / 512 / 566 µs, batch 1 at 32K
    78.7 / 73.3 / 93.3 µs); so does the staged kernel with a 2-stage ring
    (``MLAPlanKey.stages``)."""
    return max(1, min(waves * sm_count // batch, -(-capacity // 64)))


@dataclass(frozen=True)
class MLATuning:
    """Knobs of the fused path that do not change its result beyond rounding."""
    pv_tensor_cores: bool = True      # the attention's P V on tensor cores (False: fp32 CUDA-core loop)
    splits: int | None = None         # attention CTAs per request (None: ``mla_splits``)
    staged: bool = True               # the attention's cache rows staged in shared memory by bulk copies
    stage_tokens: int = 32            # staged: tokens a step
    stages: int = 0                   # staged: ring stages (0: ``MLAPlanKey.stages``)
    waves: int = 2                    # attention CTAs per SM the split count aims at
    front_early_loads: bool = True    # MLAFront: first weight loads issued before the norm front
    pdl: bool = True                  # every launch a programmatic dependent of the one before (H200:
                                      # batch 1 3-9% faster, batch 16 level)
    fuse_out: bool = True             # MLAOut and the wo GEMV as one launch (MLAOutProj: a grid barrier
                                      # between them) where the shape allows (``MLAPlanKey.fused_out``)
    out_early_loads: bool = True      # fused: wo's first weight loads issued before the grid barrier


@dataclass(frozen=True)
class MLAPlanKey:
    """Everything static about one ``mla_decode`` call (the compiled kernels' key)."""
    batch: int
    dtype: str
    shape: MLAShape
    eps: float
    scale: float
    has_residual: bool
    cache_shape: tuple            # contiguous [B, max_len, latent] or paged [pages, page_size, latent]
    max_pages: int                # paged: page_table.shape[1]; 0 when contiguous
    max_positions: int            # rows of the cos/sin tables
    tuning: MLATuning = MLATuning()
    sm_count: int = 132           # SMs of the device (the split plan)
    layout: str = "linear"        # memory order of the GEMV weights (PackedMLA.layout)

    @property
    def paged(self) -> bool:
        return self.max_pages > 0

    @property
    def max_len(self) -> int:
        return self.max_pages * self.cache_shape[1] if self.paged else self.cache_shape[1]

    @property
    def splits(self) -> int:
        if self.tuning.splits is not None:
            return self.tuning.splits
        splits = mla_splits(self.batch, self.max_len, self.sm_count, waves=self.tuning.waves)
        # staged: at most one wave a request (the merge grows with the splits: batch 1 at 32K,
        # 132 splits 51.9 µs, 264 59.6); the direct kernel keeps its measured two waves
        return min(splits, self.sm_count) if self.tuning.staged else splits

    @property
    def fused_out(self) -> bool:
        """MLAOut and the wo GEMV fused (MLAOutProj): one cluster does a head, then a block
        of ``hidden / num_heads`` wo rows, so that needs a multiple of 16 (and at most
        ``MAX_CLUSTERS`` heads: every CTA resident for the grid barrier)."""
        from cf_cute.fused.mla_out_proj import MAX_CLUSTERS
        S = self.shape
        return (self.tuning.fuse_out and S.hidden % S.num_heads == 0 and (S.hidden // S.num_heads) % 16 == 0
                and S.num_heads <= MAX_CLUSTERS)

    @property
    def stages(self) -> int:
        """Ring stages of the staged attention: a deep ring (as many as fit) when the grid
        is one CTA an SM, two when it is two (so that two CTAs fit an SM: at batch 16 and
        32K 209 µs against 271 for one CTA with five stages, H200)."""
        if self.tuning.stages:
            return self.tuning.stages
        return 0 if self.batch * self.splits <= self.sm_count else 2


def mla_plan_key(hidden: torch.Tensor, packed: PackedMLA, cache: torch.Tensor, cos: torch.Tensor, *,
                 residual: bool, page_table: torch.Tensor | None, tuning: MLATuning | None = None) -> MLAPlanKey:
    from cf_cute.decode_attention import sm_count as device_sms
    return MLAPlanKey(batch=hidden.shape[0], dtype=dtype_name(hidden.dtype), shape=packed.shape,
                      eps=float(packed.eps), scale=float(packed.scale), has_residual=residual,
                      cache_shape=tuple(cache.shape), max_pages=0 if page_table is None else page_table.shape[1],
                      max_positions=cos.shape[0], tuning=tuning or MLATuning(), sm_count=device_sms(hidden.device),
                      layout=packed.layout)


@functools.lru_cache(maxsize=None)
def mla_kernels(key: MLAPlanKey) -> list:
    """``[(KernelCls, cfg, arg_specs)]`` of the launches (five, or four with
    ``key.fused_out``), in launch order; every config validated (a ValueError names what
    is unsupported)."""
    from cf_cute.fused.mla_absorb import MLAAbsorb, MLAAbsorbConfig
    from cf_cute.fused.mla_attention import MLAAttention, MLAAttentionConfig
    from cf_cute.fused.mla_attention_staged import MLAStagedAttention, MLAStagedAttentionConfig
    from cf_cute.fused.mla_front import MLAFront, MLAFrontConfig
    from cf_cute.fused.mla_out import MLAOut, MLAOutConfig
    from cf_cute.fused.mla_out_proj import MLAOutProj, MLAOutProjConfig
    from cf_cute.fused.splitk_gemv import SplitKGemv, SplitKGemvConfig
    from cf_cute.gemv import arg_specs as gemv_specs
    from cf_cute.jit import TensorSpec

    if key.dtype not in ("bfloat16", "float16"):
        raise TypeError(f"the fused MLA path takes bfloat16 or float16 activations, got {key.dtype}")
    S, B, dt, Sp = key.shape, key.batch, key.dtype, key.splits
    H, heads, rank, nope, rope, v = (S.hidden, S.num_heads, S.kv_lora_rank, S.qk_nope_head_dim,
                                     S.qk_rope_head_dim, S.v_head_dim)
    rows, lat = heads * S.qk_head_dim + S.latent_dim, S.latent_dim
    if rope != 2 * (rope // 2):
        raise ValueError(f"qk_rope_head_dim must be even, got {rope}")
    if key.cache_shape[0] * key.cache_shape[1] * lat >= 2**31:
        raise ValueError(f"a latent cache of {key.cache_shape} elements needs 64-bit offsets (not supported)")
    paged = key.paged
    num_pages = key.cache_shape[0] if paged else 0
    page_size = key.cache_shape[1] if paged else 16
    table = TensorSpec("int32", (B, key.max_pages if paged else 1), align=4)
    pos = TensorSpec("int32", (B,), align=4)
    cs = TensorSpec("float32", (key.max_positions, rope // 2), align=4)
    cache = TensorSpec(dt, key.cache_shape)
    cache_rows = TensorSpec(dt, (key.cache_shape[0] * key.cache_shape[1], lat))
    part_o = TensorSpec("float32", (B, Sp, heads, rank))
    part_ml = TensorSpec("float32", (B, Sp, 2, heads))

    lay = key.layout
    front = MLAFrontConfig(batch=B, hidden=H, rows=rows, eps=key.eps, has_residual=key.has_residual, dtype=dt,
                           w_layout=lay, early_loads=key.tuning.front_early_loads, pdl=key.tuning.pdl)
    absorb = MLAAbsorbConfig(batch=B, num_heads=heads, kv_lora_rank=rank, qk_nope_head_dim=nope,
                             qk_rope_head_dim=rope, max_len=key.max_len, max_positions=key.max_positions,
                             eps=key.eps, paged=paged, page_size=page_size, num_pages=num_pages, dtype=dt,
                             w_layout=lay, pdl=key.tuning.pdl)
    t = key.tuning
    attn_args = dict(batch=B, num_heads=heads, kv_lora_rank=rank, qk_rope_head_dim=rope, max_len=key.max_len,
                     splits=Sp, scale=key.scale, paged=paged, page_size=page_size, num_pages=num_pages, dtype=dt,
                     tensor_core_pv=t.pv_tensor_cores, pdl=t.pdl)
    if t.staged:
        attn_cls, attn = MLAStagedAttention, MLAStagedAttentionConfig(**attn_args, stage_tokens=t.stage_tokens,
                                                                      stages=key.stages)
    else:
        attn_cls, attn = MLAAttention, MLAAttentionConfig(**attn_args)
    out = MLAOutConfig(batch=B, num_heads=heads, kv_lora_rank=rank, v_head_dim=v, splits=Sp, dtype=dt, w_layout=lay,
                       pdl=t.pdl)
    for cfg in (front, absorb, attn):
        cfg.validate()
    MLAFront(front)                    # the collectives' layouts (a ValueError here, not at compile time)
    specs = [
        (MLAFront, front, [TensorSpec(dt, (B, H)), TensorSpec(dt, (B, H)), TensorSpec(dt, (H,)),
                           TensorSpec(dt, (rows, H)), TensorSpec(dt, (B, rows)), TensorSpec(dt, (B, H))]),
        (MLAAbsorb, absorb, [TensorSpec(dt, (B, rows)), TensorSpec(dt, (heads * rank, nope)),
                             TensorSpec(dt, (rank,)), cs, cs, pos, table, cache, TensorSpec(dt, (B, heads, lat))]),
        (attn_cls, attn, [TensorSpec(dt, (B, heads, lat)), cache_rows, table, pos, part_o, part_ml]),
    ]
    out_specs = [part_o, part_ml, TensorSpec(dt, (heads * v, rank)), TensorSpec(dt, (B, heads * v))]
    if key.fused_out:
        # one cluster a head, then a block of hidden / heads wo rows (odd batches above 8: the
        # reduce fragment is padded, SplitKGemv.frag_batch)
        wo = SplitKGemvConfig(m=H, k=heads * v, batch=B, cluster_size=4, block_m=H // heads, dtype=dt,
                              residual=True, w_layout=lay, pdl=t.pdl)
        fused = MLAOutProjConfig(out=out, wo=wo, early_loads=t.out_early_loads and wo.tile_a_warp)
        MLAOutProj(fused)                          # validates, and the collectives' layouts
        return specs + [(MLAOutProj, fused, out_specs + gemv_specs(wo)[1:] + [TensorSpec("int32", (2,), align=4)])]
    # 128-row blocks (8 tiles: every warp busy) unless B x 128 partial sums do not lay over the
    # threads of the cluster reduce (odd batches above 8): then 64-row blocks
    block_m = 128 if B <= 8 or B % 2 == 0 else 64
    wo = SplitKGemvConfig(m=H, k=heads * v, batch=B, cluster_size=4, block_m=block_m, dtype=dt, residual=True,
                          w_layout=lay, pdl=t.pdl)
    MLAOut(out), SplitKGemv(wo)                    # validate, and the collectives' layouts
    return specs + [(MLAOut, out, out_specs), (SplitKGemv, wo, gemv_specs(wo))]


class _Workspace:
    """Scratch of one (plan, device): written and read only inside one ``mla_decode``
    call, in stream order, so consecutive calls (and graph replays) may share it."""

    def __init__(self, key: MLAPlanKey, device):
        S, B = key.shape, key.batch
        dt = getattr(torch, key.dtype)
        rows = S.num_heads * S.qk_head_dim + S.latent_dim
        self.y = torch.empty(B, rows, dtype=dt, device=device)
        self.h = torch.empty(B, S.hidden, dtype=dt, device=device)
        self.qf = torch.empty(B, S.num_heads, S.latent_dim, dtype=dt, device=device)
        self.part_o = torch.empty(B, key.splits, S.num_heads, S.kv_lora_rank, dtype=torch.float32, device=device)
        self.part_ml = torch.empty(B, key.splits, 2, S.num_heads, dtype=torch.float32, device=device)
        self.o = torch.empty(B, S.num_heads * S.v_head_dim, dtype=dt, device=device)
        self.no_table = torch.zeros(B, 1, dtype=torch.int32, device=device)
        self.grid_barrier = torch.zeros(2, dtype=torch.int32, device=device)   # MLAOutProj's (self-resetting)


_workspaces: dict = {}


@functools.lru_cache(maxsize=None)
def _compiled_kernels(key: MLAPlanKey) -> list:
    from cf_cute.jit import compile_kernel
    return [compile_kernel(cls, cfg, specs) for cls, cfg, specs in mla_kernels(key)]


def mla_decode(hidden: torch.Tensor, packed: PackedMLA, cache: torch.Tensor, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, *, residual: torch.Tensor | None = None,
               page_table: torch.Tensor | None = None, out: torch.Tensor | None = None,
               tuning: MLATuning | None = None) -> torch.Tensor:
    """The fused MLA decode step (module docstring): the same result as
    :func:`mla_decode_torch` (bf16/fp16, batch 1..16, contiguous or paged latent cache),
    the new latent rows appended at ``positions``. Every check runs before the first
    launch; launches go on the current stream with no host synchronisation (CUDA-graph
    capturable when the index tensors live on the GPU). Deterministic."""
    positions, page_table = check_mla_operands(hidden, packed, cache, positions, cos, sin, residual=residual,
                                               page_table=page_table)
    key = mla_plan_key(hidden, packed, cache, cos, residual=residual is not None, page_table=page_table,
                       tuning=tuning)
    mla_kernels(key)                               # what the kernels do not support raises here
    B, dt, dev = hidden.shape[0], hidden.dtype, hidden.device
    S = packed.shape
    if out is None:
        out = torch.empty(B, S.hidden, dtype=dt, device=dev)
    else:
        check_tensor("out", out, dtype=dt, shape=(B, S.hidden), cuda=False)
    tensors = [hidden, packed.norm, packed.w_front, packed.kv_norm, packed.w_uk, packed.w_uv, packed.wo, cache, out]
    names = ("hidden", "norm", "w_front", "kv_norm", "w_uk", "w_uv", "wo", "cache", "out")
    if residual is not None:
        tensors.append(residual)
        names += ("residual",)
    check_operands(names, *tensors)
    check_operands(("hidden", "cos", "sin", "positions") + (("page_table",) if page_table is not None else ()),
                   hidden, cos, sin, positions, *(() if page_table is None else (page_table,)), align=4)
    fns = _compiled_kernels(key)
    ws = _workspaces.get((key, dev))
    if ws is None:
        ws = _workspaces.setdefault((key, dev), _Workspace(key, dev))
    table = ws.no_table if page_table is None else page_table
    h = ws.h if residual is not None else hidden
    f_front, f_absorb, f_attn = fns[:3]
    f_front(hidden, residual if residual is not None else hidden, packed.norm, packed.w_front, ws.y, ws.h)
    f_absorb(ws.y, packed.w_uk.view(-1, S.qk_nope_head_dim), packed.kv_norm, cos, sin, positions, table, cache,
             ws.qf)
    f_attn(ws.qf, cache.view(-1, S.latent_dim), table, positions, ws.part_o, ws.part_ml)
    w_uv = packed.w_uv.view(-1, S.kv_lora_rank)
    if key.fused_out:
        fns[3](ws.part_o, ws.part_ml, w_uv, ws.o, packed.wo, h, out, ws.grid_barrier)
    else:
        fns[3](ws.part_o, ws.part_ml, w_uv, ws.o)
        fns[4](ws.o, packed.wo, h, out)
    return out
