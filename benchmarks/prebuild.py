"""Compile, on a machine without a GPU, the kernels that the GPU tests and the
attention and layer benchmarks will ask for, into the disk cache (``$CF_CUTE_CACHE_DIR``).

The cache key (arch, DSL version, package source fingerprint, config, argument
specs) is the same on the GPU machine, so shipping the cache folder there
turns each compile (5-30 s of device time) into a load of a few ms.

    CF_CUTE_CACHE_DIR=.device/cfcache python benchmarks/prebuild.py [--jobs 2] [--context 1024,4096]
        [--only attn,qkv,mlp,mla,dattn] [--dattn-variants c2+s4+t256,...]

With ``--pick DIR`` the entries of the selected kernels, and only those, are also copied
into DIR: keep a full cache elsewhere (``CF_CUTE_CACHE_DIR=~/cfcache``) and ship only what a
device call needs (``--pick .device/cfcache``).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _unfused(batch, heads, kv_heads, hd, H, L, paged, residual, cluster=None, layout="tiled"):
    """The three kernels of attention_block_unfused for these shapes (meta tensors: no memory),
    at the sizes ``unfused_plan`` gives a 132-SM GPU (or ``cluster`` for all three)."""
    import torch
    from cf_cute.attention import UnfusedPlan, unfused_plan
    from cf_cute.decode_attention import decode_attention_config
    from cf_cute.gemv import splitk_gemv_config
    from cf_cute.qkv_rope import qkv_project_config, qkv_rope_config
    plan = (unfused_plan(batch, H, heads, kv_heads, hd) if cluster is None
            else UnfusedPlan(cluster, cluster, cluster))
    m = dict(device="meta", dtype=torch.bfloat16)
    G = heads // kv_heads
    kv = (batch * L // 16 + 5, 16, kv_heads, hd) if paged else (batch, L, kv_heads, hd)
    table = torch.empty(batch, L // 16, dtype=torch.int32, device="meta") if paged else None
    k = torch.empty(*kv, **m)
    front = dict(num_heads=heads, num_kv_heads=kv_heads, rope_style="neox", eps=1e-5, has_residual=residual,
                 layout=layout)
    qkv_args = (torch.empty(batch, H, **m), torch.empty(kv_heads, (G + 2) * hd, H, **m),
                torch.empty(L, hd // 2, dtype=torch.float32, device="meta"), k, table)
    out = [qkv_project_config(*qkv_args, **front) if plan.qkv is None
           else qkv_rope_config(*qkv_args, cluster_size=plan.qkv, **front),
           decode_attention_config(torch.empty(batch, heads, hd, **m), k, k, table, plan.attn),
           splitk_gemv_config(torch.empty(batch, heads * hd, **m), torch.empty(H, heads * hd, **m), plan.wo,
                              plan.wo_block_m, True, layout)]
    return out


def _mlp_configs(batches):
    """MLP blocks of tests/test_mlp_block.py and benchmarks/bench_layer.py, planned as
    cf_cute.mlp plans them without a GPU (132 // C clusters of C resident); a GPU whose
    residency differs compiles the difference there."""
    import torch
    from cf_cute import mlp
    from cf_cute.fused.attention_block import AttentionBlockConfig
    sys.path.insert(0, str(ROOT / "tests"))
    from test_mlp_block import EARLY_PHASE_B_CASES, LAYOUT_CASES, SHAPES
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_layer import LINEAR_VARIANTS, MLP_VARIANTS, variant_tuning

    def plan(B, H, I, dt=torch.bfloat16, residual=False, tuning=None, layout="tiled"):
        packed = mlp.PackedMLP(norm=torch.empty(H, dtype=dt, device="meta"),
                               w_gate_up=torch.empty(2 * I, H, dtype=dt, device="meta"),
                               w_down=torch.empty(H, I, dtype=dt, device="meta"), layout=layout)
        try:
            return [mlp._plan(torch.empty(B, H, dtype=dt, device="meta"), packed, residual, tuning, 0)]
        except ValueError:              # a forced grid that does not fit: the caller skips it too
            return []

    out = [c for H, I in SHAPES for b in (1, 3, 16) for c in plan(b, H, I, residual=b != 3)]
    out += [c for H, I, b in LAYOUT_CASES for lay in ("tiled", "linear") for c in plan(b, H, I, layout=lay)]
    for t in (mlp.MLPTuning(cluster_size=1), mlp.MLPTuning(cluster_size=4, k_parts=2),
              mlp.MLPTuning(k_parts=1, l2_prefetch=True), mlp.MLPTuning(cluster_size=2, num_clusters=40, tail_pieces=0),
              mlp.MLPTuning(pipeline=False), mlp.MLPTuning(early_loads=True),
              mlp.MLPTuning(pipeline=False, early_loads=True),
              mlp.MLPTuning(cluster_size=2, num_clusters=40, tail_pieces=None),
              mlp.MLPTuning(cluster_size=1, num_clusters=120, tail_pieces=None)):
        out += plan(5, 2048, 8192, torch.float16, tuning=t)
    out += plan(4, 2048, 8192)                                     # test_matches_transformers_llama_mlp
    for H, I, b, sx in EARLY_PHASE_B_CASES:                        # test_early_phase_b_gives_the_same_bits
        out += plan(b, H, I, tuning=mlp.MLPTuning(shared_x=sx)) + plan(b, H, I, tuning=mlp.MLPTuning(
            shared_x=sx, early_phase_b=True))
    out += plan(16, 4096, 11008, tuning=mlp.MLPTuning(tail_pieces=None))   # test_deterministic_graph_capturable...
    out += plan(3, 2048, 8192, tuning=mlp.MLPTuning(pdl=True))     # test_chained_launches_overlap_safely
    # benchmarks/bench_layer.py: every MLP variant at Llama-2-7B's shape, the prefetch one at Llama-3-8B's
    for b in batches:
        for H, I, tunings in ((4096, 11008, MLP_VARIANTS.values()), (4096, 14336, [MLP_VARIANTS["prefetch"]])):
            out += plan(b, H, I)
            for t in tunings:
                out += plan(b, H, I, tuning=t)
            for v in LINEAR_VARIANTS:
                out += plan(b, H, I, tuning=variant_tuning(v)[1], layout="linear")
    for b, paged in ((1, False), (2, True)):       # test_decoder_layer_matches_transformers
        out += plan(b, 2048, 8192)
        out.append(AttentionBlockConfig(batch=b, hidden=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                                        max_len=256, max_positions=256, cluster_size=16, paged=paged,
                                        num_pages=b * 256 // 16 + 5 if paged else 0, w_layout="tiled"))
    # tests/test_runner.py's small Llama (hidden 512, 8/2 heads of 64, intermediate 1024, cache 256; its
    # MHA twin, 8/8 heads, at batch 2): one launch at batch 1 and 2, three at batch 10
    for b, kv in ((1, 2), (2, 8), (10, 2)):
        out += plan(b, 512, 1024) + plan(b, 512, 1024, residual=True)
        for residual in (False, True):
            if b <= 2:
                out.append(AttentionBlockConfig(batch=b, hidden=512, num_heads=8, num_kv_heads=kv, head_dim=64,
                                                max_len=256, max_positions=256, cluster_size=16,
                                                has_residual=residual, w_layout="tiled"))
            else:
                out += _unfused(b, 8, kv, 64, 512, 256, False, residual)
    return list(dict.fromkeys(out))


def _qkv_test_configs():
    """tests/test_qkv_rope.py::test_matches_reference (both kernels)."""
    import torch
    from cf_cute.qkv_rope import qkv_project_config, qkv_rope_config
    sys.path.insert(0, str(ROOT / "tests"))
    from test_qkv_rope import MATCH_BATCHES, MATCH_LEN, MATCH_SHAPES, MATCH_VARIANTS, match_cluster
    m = dict(device="meta", dtype=torch.bfloat16)
    out, L = [], MATCH_LEN
    for heads, kv_heads, hd, H in MATCH_SHAPES:
        for batch in MATCH_BATCHES:
            for style, paged, residual in MATCH_VARIANTS:
                kv = (batch * L // 16 + 5, 16, kv_heads, hd) if paged else (batch, L, kv_heads, hd)
                table = torch.empty(batch, L // 16, dtype=torch.int32, device="meta") if paged else None
                args = (torch.empty(batch, H, **m), torch.empty(kv_heads, (heads // kv_heads + 2) * hd, H, **m),
                        torch.empty(L, hd // 2, dtype=torch.float32, device="meta"), torch.empty(*kv, **m), table)
                kw = dict(num_heads=heads, num_kv_heads=kv_heads, rope_style=style, eps=1e-5, has_residual=residual)
                out.append(qkv_rope_config(*args, cluster_size=match_cluster(batch), **kw))
                out.append(qkv_project_config(*args, **kw))
    return out


def _attn_configs(contexts, batches, kv_heads=(32,), variants=None):
    """The attention-block kernels: tests/test_attention_block.py and benchmarks/bench_attention.py
    (Llama shapes with ``kv_heads`` KV heads at the default cluster size; every tuning variant of
    bench_attention.py, or the ``variants`` named; each also with phase stamps, for bench_phases.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_attention_block import FUSED_CASES, LAYOUT_CASES, LAYOUT_UNFUSED_CASE, fused_config
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_attention import VARIANTS as ATTN_VARIANTS
    from cf_cute.attention import FUSED_MAX_BATCH, default_cluster_size
    from cf_cute.fused.attention_block import AttentionBlockConfig
    out = [fused_config(*c) for c in FUSED_CASES if c[5] is not None]
    for path, i in LAYOUT_CASES:            # test_tiled_and_linear_weights_give_the_same_bits
        if path == "fused":
            out.append(fused_config(*FUSED_CASES[i], layout="linear"))
        else:
            heads, kv, hd, H, b, _, paged, res, _ = LAYOUT_UNFUSED_CASE
            out += _unfused(b, heads, kv, hd, H, 1024, paged, res, layout="linear")
    # cluster None: the automatic choice, clusters of 2 on a 132-SM Hopper where clusters of 4 do not fit
    out += [fused_config(*c[:5], 2, *c[6:]) for c in FUSED_CASES if c[5] is None]
    c1 = FUSED_CASES[1]
    out.append(dataclasses.replace(fused_config(*c1[:5], 2, *c1[6:]), num_threads=512))
    out += _unfused(16, 32, 32, 128, 4096, 1024, False, True)            # the case that falls back
    out += _unfused(5, 32, 32, 128, 4096, 1024, True, False, 4)          # test_unfused_matches_reference
    out += _unfused(16, 32, 8, 128, 4096, 1024, True, True)              # test_unfused_planned_matches_reference
    for i in (3, 5):                        # test_gqa_attention_knobs
        out += [fused_config(*FUSED_CASES[i], attn_mma_depth=0), fused_config(*FUSED_CASES[i], attn_tensor_cores=False),
                fused_config(*FUSED_CASES[i], num_threads=256), fused_config(*FUSED_CASES[i], o_proj="grid"),
                fused_config(*FUSED_CASES[i], o_proj="grid", early_phase_b=True)]
    for i in (0, 1, 3, 5, 6):               # test_head_o_proj_matches_reference_and_is_deterministic
        out += [fused_config(*FUSED_CASES[i], o_proj="head"),
                fused_config(*FUSED_CASES[i], o_proj="head", o_early_loads=False),
                fused_config(*FUSED_CASES[i], o_proj="head", early_loads=True),
                fused_config(*FUSED_CASES[i], o_proj="head", o_stage_tiles=2)]
    for kv in kv_heads:                     # benchmarks/bench_attention.py and bench_phases.py, Llama shapes
        c = default_cluster_size(kv, 4096)
        names = list(ATTN_VARIANTS) if variants is None else variants
        # MHA's 512-thread variants run at clusters of 2: the extra shapes below
        tunings = [dataclasses.asdict(ATTN_VARIANTS[n]) for n in names
                   if kv != 32 or ATTN_VARIANTS[n].num_threads in (None, 256)]
        for b in batches:
            for ctx in contexts:
                shapes = [(c, {**t, **p}) for t in [{}] + tunings for p in ({}, dict(phase_timer=True))]
                if kv == 32:
                    shapes += [(2, dict(num_threads=512)), (2, dict(num_threads=512, phase_timer=True)),
                               (4, dict(w_layout="linear"))]
                # batch > 1: the automatic single launch (up to FUSED_MAX_BATCH) with each variant, unstamped
                fused = shapes if b == 1 else [(c, t) for t in [{}] + tunings] if b <= FUSED_MAX_BATCH else []
                for cs, tune in fused:
                    out.append(AttentionBlockConfig(batch=b, hidden=4096, num_heads=32, num_kv_heads=kv,
                                                    head_dim=128, max_len=ctx + 1, max_positions=ctx + 1,
                                                    cluster_size=cs, **{"w_layout": "tiled", **tune}))
                if b == 16 and kv == 32:
                    out.append(AttentionBlockConfig(batch=b, hidden=4096, num_heads=32, num_kv_heads=32,
                                                    head_dim=128, max_len=ctx + 1, max_positions=ctx + 1,
                                                    cluster_size=2, w_layout="tiled"))
                try:                        # --unfused: the three launches
                    out += _unfused(b, 32, kv, 128, 4096, ctx + 1, False, False)
                    if b == 16 and kv == 32:
                        out += _unfused(b, 32, 32, 128, 4096, ctx + 1, False, False, layout="linear")
                except ValueError:          # over the 32-bit index limit: the benchmark skips it too
                    pass
    return out


def _mla_items(contexts, batches):
    """``(KernelCls, cfg, arg_specs)`` of every launch tests/test_mla.py and benchmarks/bench_mla.py compile."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_mla import mla_prebuild_configs
    return mla_prebuild_configs(bench_contexts=tuple(contexts), bench_batches=tuple(batches))


def _decode_attention_configs(contexts, batches, kv_heads=(8,), variants=None):
    """tests/test_decode_attention.py's GPU tests, and benchmarks/bench_decode_attention.py: the
    default kernel and every ``--dattn-variants`` variant (``c2+s4+t256``, ...) for each KV-head
    count, batch and context (32 query heads of 128)."""
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from test_decode_attention import gpu_test_configs
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_decode_attention import variant_kwargs
    from cf_cute.decode_attention import DecodeAttentionTuning, decode_attention_config
    m = dict(device="meta", dtype=torch.bfloat16)
    out = gpu_test_configs()
    for kv in kv_heads:
        for b in batches:
            for ctx in contexts:
                q, k = torch.empty(b, 32, 128, **m), torch.empty(b, ctx, kv, 128, **m)
                for kw in [{}] + [variant_kwargs(v) for v in variants or []]:
                    out.append(decode_attention_config(q, k, k, None, kw.get("cluster_size"),
                                                       kw.get("tuning", DecodeAttentionTuning())))
    return out


# kernel groups for --only: each a function of (contexts, batches)
GROUPS = {"attn": _attn_configs, "qkv": lambda contexts, batches: _qkv_test_configs(),
          "mlp": lambda contexts, batches: _mlp_configs(batches), "mla": _mla_items,
          "dattn": _decode_attention_configs}


def _select(groups, contexts, batches, attn=None, dattn=None) -> list:
    kw = {"attn": attn or {}, "dattn": dattn or {}}
    return list(dict.fromkeys(c for g in GROUPS if g in groups
                              for c in GROUPS[g](contexts, batches, **kw.get(g, {}))))


def _build(cfg):
    """Seconds to build (or load) ``cfg`` into the disk cache (-1: nothing to build), and the
    cache entries it touched."""
    from cf_cute.jit import cache_files
    seen = len(cache_files())
    return _build_one(cfg), cache_files()[seen:]


def _build_one(cfg):
    from cf_cute import decode_attention, gemv, qkv_rope
    from cf_cute.attention import _fused_kernel
    from cf_cute.fused.attention_block import AttentionBlockConfig, AttentionBlock
    from cf_cute.fused.mlp_block import MLPBlockConfig
    t = time.time()
    if isinstance(cfg, tuple):              # (KernelCls, cfg, arg_specs): a launch compiled through jit directly
        from cf_cute.jit import compile_kernel
        compile_kernel(*cfg)
        return time.time() - t
    try:
        cfg.validate()
    except ValueError:                      # e.g. a cache past the 32-bit index limit
        return -1.0
    if isinstance(cfg, MLPBlockConfig):
        from cf_cute.mlp import _kernel
        _kernel(cfg)
    elif isinstance(cfg, AttentionBlockConfig):
        try:
            AttentionBlock(cfg)
        except ValueError:                  # does not fit: nothing to build
            return -1.0
        _fused_kernel(cfg)
    else:
        mod = {"QKVRopeConfig": qkv_rope, "QKVProjectConfig": qkv_rope, "DecodeAttentionConfig": decode_attention,
               "SplitKGemvConfig": gemv}[type(cfg).__name__]
        mod._kernel(cfg)
    return time.time() - t


def pick(files, dest: str) -> None:
    """Cache entries ``<cache dir>/<DSL version>/<digest>.o`` into the directory ``dest``
    (same layout), or into the xz tarball ``dest`` when it ends in ``.tar.xz``."""
    if dest.endswith(".tar.xz"):
        import tarfile
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w:xz") as tar:
            for f in files:
                tar.add(f, arcname=f"{f.parent.name}/{f.name}")
        return
    for f in files:
        d = Path(dest) / f.parent.name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, d / f.name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--context", default="1024,4096,16384,32768")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated kernel groups to build, of {', '.join(GROUPS)} (default: all)")
    ap.add_argument("--kv-heads", default="32", help="attention benchmark shapes: KV heads of 32 query heads")
    ap.add_argument("--variants", default=None,
                    help="attention benchmark: tuning variants to build (comma-separated; default all)")
    ap.add_argument("--dattn-variants", default="",
                    help="decode-attention benchmark (group dattn): variants to build beside the default, "
                         "e.g. c2+s4+t256,c1+s8+t256")
    ap.add_argument("--pick", default=None, metavar="DIR|FILE.tar.xz",
                    help="also copy the selected kernels' cache entries (and only those) into DIR, or into an "
                         "xz tarball (about 10x smaller; unpack with tar xJf FILE -C $CF_CUTE_CACHE_DIR), e.g. "
                         ".device/cfcache.tar.xz: a device call carries 64 MiB, the DSL bundle 54 of them")
    a = ap.parse_args(argv)
    groups = set(a.only.split(","))
    if groups - set(GROUPS):
        ap.error(f"unknown group(s) {sorted(groups - set(GROUPS))}; choose from {', '.join(GROUPS)}")
    kv = [int(k) for k in a.kv_heads.split(",")]
    cfgs = _select(groups, [int(c) for c in a.context.split(",")], [int(b) for b in a.batch.split(",")],
                   attn=dict(kv_heads=kv, variants=None if a.variants is None
                             else [v for v in a.variants.split(",") if v]),
                   dattn=dict(kv_heads=kv, variants=[v for v in a.dattn_variants.split(",") if v]))
    # spawn: on a GPU machine the parent may have touched CUDA, which a forked child cannot re-initialise
    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        picked = set()
        for cfg, (dt, files) in zip(cfgs, ex.map(_build, cfgs)):
            name = f"{cfg[0].__name__} {cfg[1]}" if isinstance(cfg, tuple) else cfg
            print(f"{dt:6.1f} s  {name}", flush=True)
            picked.update(files)
    if a.pick:
        pick(sorted(picked), a.pick)
        packed = f" ({Path(a.pick).stat().st_size / 2**20:.1f} MiB)" if a.pick.endswith(".tar.xz") else ""
        print(f"picked {len(picked)} entries, {sum(f.stat().st_size for f in picked) / 2**20:.1f} MiB, "
              f"into {a.pick}{packed}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
