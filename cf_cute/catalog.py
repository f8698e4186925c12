"""The catalog of shipped kernel configurations: what ``python -m cf_cute
compile-all`` builds for sm_90a (on any machine, GPU or not) and checks.

Each entry is (kernel class, frozen config, argument specs), the exact triple
``cf_cute.jit.compile_kernel`` takes, so the catalog compiles exactly what the
torch-facing functions launch.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

from cf_cute.collective_kernels import (
    GatherHarnessConfig,
    GatherHarnessKernel,
    GlobalExchangeConfig,
    GlobalExchangeKernel,
    GridBarrierHarnessConfig,
    GridBarrierHarnessKernel,
    ReduceHarnessConfig,
    ReduceHarnessKernel,
)
from cf_cute.fused.attention_block import AttentionBlock, AttentionBlockConfig
from cf_cute.fused.decode_attention import DecodeAttention, DecodeAttentionConfig
from cf_cute.fused.mlp_block import MLPBlock, MLPBlockConfig
from cf_cute.fused.qkv_rope import QKVRope, QKVRopeConfig
from cf_cute.fused.splitk_gemv import SplitKGemv, SplitKGemvConfig
from cf_cute.jit import ScalarSpec, TensorSpec

__all__ = ["Entry", "entries", "REQUIRED_PTX"]

# instructions the cluster design relies on, per kind of kernel
REQUIRED_PTX = {
    "st_async": ("mapa.shared::cluster", "st.async.shared::cluster.mbarrier::complete_tx::bytes",
                 "mbarrier.try_wait.parity", "barrier.cluster.arrive", "mbarrier.arrive.release.cluster"),
    "bulk": ("mapa.shared::cluster", "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes",
             "fence.proxy.async.shared::cta", "mbarrier.try_wait.parity", "barrier.cluster.arrive"),
    "global": ("barrier.cluster.arrive", "barrier.cluster.wait"),
    "grid": ("atom.global.acq_rel.add", "fence.acq_rel.gpu", "ld.acquire.gpu.global", "st.release.gpu.global"),
}


class Entry(NamedTuple):
    name: str
    kernel_cls: type
    cfg: object
    args: list
    ptx_kind: str | None      # key of REQUIRED_PTX, None when nothing cluster-specific is expected


def _reduce(cfg: ReduceHarnessConfig) -> Entry:
    k = ReduceHarnessKernel(cfg)
    kind = None if cfg.cluster_size == 1 else k.red.plan.transport
    return Entry(f"reduce {cfg.op} n={cfg.num_elems} C={cfg.cluster_size} "
                 f"{k.red.plan.algorithm}/{k.red.plan.transport}"
                 f"{' scatter' if cfg.scatter else ''}", ReduceHarnessKernel, cfg,
                 [TensorSpec("float32", (cfg.grid, cfg.num_elems)),
                  TensorSpec("float32", (cfg.grid, k.out_cols)), ScalarSpec()], kind)


def _gather(cfg: GatherHarnessConfig) -> Entry:
    k = GatherHarnessKernel(cfg)
    kind = None if cfg.cluster_size == 1 else k.gat.plan.transport
    return Entry(f"gather {cfg.tile_elems}x{cfg.dtype} C={cfg.cluster_size} {k.gat.plan.transport}",
                 GatherHarnessKernel, cfg,
                 [TensorSpec(cfg.dtype, (cfg.grid, cfg.tile_elems)),
                  TensorSpec("float32", (cfg.grid, cfg.cluster_size, cfg.tile_elems)), ScalarSpec()], kind)


def _gemv(cfg: SplitKGemvConfig) -> Entry:
    from cf_cute.gemv import arg_specs
    return Entry(f"splitk_gemv {cfg.m}x{cfg.k} b={cfg.batch} C={cfg.cluster_size} {cfg.dtype}"
                 f"{' +residual' if cfg.residual else ''}{' tiled' if cfg.w_layout == 'tiled' else ''}",
                 SplitKGemv, cfg, arg_specs(cfg),
                 "st_async" if cfg.cluster_size > 1 else None)


def _attn_entry(kind: str, kernel_cls: type, cfg, arg_specs, ptx_kind: str | None) -> Entry:
    hidden = f" H={cfg.hidden}" if hasattr(cfg, "hidden") else ""
    return Entry(f"{kind} b={cfg.batch} {cfg.num_heads}/{cfg.num_kv_heads}x{cfg.head_dim}{hidden} "
                 f"C={cfg.cluster_size}{f' S={cfg.splits}' if getattr(cfg, 'splits', 1) > 1 else ''}"
                 f"{' paged' if cfg.paged else ''}", kernel_cls, cfg, arg_specs(cfg), ptx_kind)


def _attention(cfg: DecodeAttentionConfig) -> Entry:
    from cf_cute.decode_attention import arg_specs
    return _attn_entry("decode_attention", DecodeAttention, cfg, arg_specs, None)


def _qkv(cfg: QKVRopeConfig) -> Entry:
    from cf_cute.qkv_rope import arg_specs
    return _attn_entry("qkv_rope", QKVRope, cfg, arg_specs, "st_async" if cfg.cluster_size > 1 else None)


def _block(cfg: AttentionBlockConfig) -> Entry:
    from cf_cute.attention import arg_specs
    return _attn_entry("attention_block", AttentionBlock, cfg, arg_specs, "st_async")


def _mlp(cfg: MLPBlockConfig) -> Entry:
    from cf_cute.mlp import arg_specs
    return Entry(f"mlp_block b={cfg.batch} H={cfg.hidden} I={cfg.intermediate} {cfg.num_clusters}xC={cfg.cluster_size}",
                 MLPBlock, cfg, arg_specs(cfg), "st_async" if cfg.cluster_size > 1 else "grid")


def _qkv_project(batch: int, heads: int, kv_heads: int) -> Entry:
    import torch
    from cf_cute.fused.qkv_project import QKVProject
    from cf_cute.qkv_rope import arg_specs, qkv_project_config
    m = dict(device="meta", dtype=torch.bfloat16)
    cfg = qkv_project_config(torch.empty(batch, 4096, **m), torch.empty(kv_heads, (heads // kv_heads + 2) * 128, 4096, **m),
                             torch.empty(4096, 64, dtype=torch.float32, device="meta"),
                             torch.empty(batch, 4096, kv_heads, 128, **m), None, num_heads=heads,
                             num_kv_heads=kv_heads, rope_style="neox", eps=1e-5, has_residual=True, layout="tiled")
    return _attn_entry(f"qkv_project {cfg.num_clusters}x", QKVProject, cfg, arg_specs, "st_async")


def _mla(batch: int) -> Iterator[Entry]:
    """The launches of the fused MLA step (four by default), DeepSeek-V2-Lite, latent cache of 4096."""
    from cf_cute.mla import MLAPlanKey, mla_kernels
    from cf_cute.reference_mla import MLAShape, mla_softmax_scale
    S = MLAShape()
    key = MLAPlanKey(batch=batch, dtype="bfloat16", shape=S, eps=1e-6, scale=mla_softmax_scale(S), has_residual=True,
                     cache_shape=(batch, 4096, S.latent_dim), max_pages=0, max_positions=4096, layout="tiled")
    for cls, cfg, args in mla_kernels(key):
        c = getattr(cfg, "cluster_size", 1)
        yield Entry(f"mla {cls.__name__} b={batch} C={c}", cls, cfg, args, "st_async" if c > 1 else None)


def entries() -> Iterator[Entry]:
    """Every shipped configuration. The blocks, the grid-wide QKV kernel and the MLA step take
    their weights in the tiled order (what pack_attention / pack_mlp / pack_mla produce); the
    generic split-K GEMV is listed in both orders."""
    from cf_cute.attention import default_cluster_size
    from cf_cute.models import BUILTIN_CONFIGS
    # the fused attention block for each distinct attention shape of the built-in Llama configs, cache 4096
    shapes = dict.fromkeys((m.num_heads, m.num_kv_heads, m.head_dim, m.hidden) for m in BUILTIN_CONFIGS.values())
    for heads, kv_heads, hd, hidden in shapes:
        for batch in (1, 16):
            c = default_cluster_size(kv_heads, hidden)
            yield _block(AttentionBlockConfig(batch=batch, hidden=hidden, num_heads=heads, num_kv_heads=kv_heads,
                                              head_dim=hd, max_len=4096, max_positions=4096, cluster_size=c,
                                              has_residual=True, w_layout="tiled"))
    # the fused MLP block for each distinct MLP shape, on the grid a 132-SM Hopper gets
    # (66 clusters of 2: cf_cute.mlp.grid_plan with the measured residency)
    for hidden, inter in dict.fromkeys((m.hidden, m.intermediate) for m in BUILTIN_CONFIGS.values()):
        for batch in (1, 16):
            yield _mlp(MLPBlockConfig(batch=batch, hidden=hidden, intermediate=inter, num_clusters=66,
                                      cluster_size=2, has_residual=batch == 1, w_layout="tiled"))
    for c in range(1, 17):
        yield _reduce(ReduceHarnessConfig(num_elems=256, cluster_size=c))
    for c in (2, 4, 8, 16):
        for n in (1, 4, 1024, 4096):
            yield _reduce(ReduceHarnessConfig(num_elems=n, cluster_size=c))
            yield _reduce(ReduceHarnessConfig(num_elems=n, cluster_size=c, op="max"))
        yield _reduce(ReduceHarnessConfig(num_elems=4096, cluster_size=c, scatter=True))
        yield _reduce(ReduceHarnessConfig(num_elems=4096, cluster_size=c, algorithm="split", transport="bulk"))
        cfg = GlobalExchangeConfig(num_elems=1024, cluster_size=c)
        yield Entry(f"global exchange n=1024 C={c}", GlobalExchangeKernel, cfg,
                    [TensorSpec("float32", (cfg.grid, 1024)),
                     TensorSpec("float32", (cfg.grid, GlobalExchangeKernel(cfg).out_cols)),
                     TensorSpec("float32", (cfg.num_clusters * 2 * c, 1024)), ScalarSpec()], "global")
    for ctas, c in ((132, 1), (128, 4)):
        cfg = GridBarrierHarnessConfig(num_ctas=ctas, cluster_size=c)
        yield Entry(f"grid barrier {ctas} CTAs C={c}", GridBarrierHarnessKernel, cfg,
                    [TensorSpec("int32", (2, ctas), align=4), TensorSpec("int32", (2,), align=4),
                     TensorSpec("int32", (ctas,), align=4), ScalarSpec()], "grid")
    for c in (1, 2, 4, 8, 16):
        for elems, dtype in ((2, "bfloat16"), (512, "bfloat16"), (3072, "float32")):
            yield _gather(GatherHarnessConfig(tile_elems=elems, cluster_size=c, dtype=dtype))
    for c in (2, 4, 8, 16):
        for batch in (1, 8):
            yield _gemv(SplitKGemvConfig(m=4096, k=4096, batch=batch, cluster_size=c))
    yield _gemv(SplitKGemvConfig(m=4096, k=4096, batch=1, cluster_size=4, dtype="float16"))
    yield _gemv(SplitKGemvConfig(m=4096, k=4096, batch=1, cluster_size=4, residual=True))
    for batch in (1, 16):          # the three-launch attention block's output projection
        yield _gemv(SplitKGemvConfig(m=4096, k=4096, batch=batch, cluster_size=8, residual=True, w_layout="tiled"))
    for c in (1, 4, 16):
        for heads, kv_heads in ((32, 32), (32, 8)):
            yield _attention(DecodeAttentionConfig(batch=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=128,
                                                   max_len=4096, cluster_size=c))
        yield _attention(DecodeAttentionConfig(batch=16, num_heads=32, num_kv_heads=8, head_dim=128,
                                               max_len=4096, cluster_size=c, paged=True, num_pages=4096,
                                               num_threads=128))        # GQA on tensor cores: 128 threads
    for heads, kv_heads in ((32, 32), (32, 8)):      # clusters merged through global memory
        yield _attention(DecodeAttentionConfig(batch=4, num_heads=heads, num_kv_heads=kv_heads, head_dim=128,
                                               max_len=4096, cluster_size=2, splits=2, num_threads=256))
    for heads, kv_heads in ((32, 32), (32, 8)):
        yield _qkv_project(16, heads, kv_heads)
    for batch in (1, 16):
        yield from _mla(batch)
    for c, batch in ((4, 1), (4, 16), (16, 1)):
        for heads, kv_heads in ((32, 32), (32, 8)):
            yield _qkv(QKVRopeConfig(batch=batch, hidden=4096, num_heads=heads, num_kv_heads=kv_heads,
                                     head_dim=128, max_len=4096, max_positions=4096, cluster_size=c,
                                     has_residual=True))
