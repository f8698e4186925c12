"""Compile, on a machine without a GPU, the kernels that the GPU tests and the
attention benchmark will ask for, into the disk cache (``$CF_CUTE_CACHE_DIR``).

The cache key (arch, DSL version, package source fingerprint, config, argument
specs) is the same on the GPU machine, so shipping the cache folder there
turns each compile (5-30 s of device time) into a load of a few ms.

    CF_CUTE_CACHE_DIR=.device/cfcache python benchmarks/prebuild.py [--jobs 2] [--context 1024,4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _unfused(batch, heads, kv_heads, hd, H, L, paged, residual, cluster=4):
    """The three kernels of attention_block_unfused for these shapes (meta tensors: no memory)."""
    import torch
    from cf_cute.decode_attention import decode_attention_config
    from cf_cute.gemv import splitk_gemv_config
    from cf_cute.qkv_rope import qkv_rope_config
    m = dict(device="meta", dtype=torch.bfloat16)
    G = heads // kv_heads
    kv = (batch * L // 16 + 5, 16, kv_heads, hd) if paged else (batch, L, kv_heads, hd)
    table = torch.empty(batch, L // 16, dtype=torch.int32, device="meta") if paged else None
    k = torch.empty(*kv, **m)
    out = [qkv_rope_config(torch.empty(batch, H, **m), torch.empty(kv_heads, (G + 2) * hd, H, **m),
                           torch.empty(L, hd // 2, dtype=torch.float32, device="meta"), k, table,
                           num_heads=heads, num_kv_heads=kv_heads, cluster_size=cluster, rope_style="neox",
                           eps=1e-5, has_residual=residual),
           decode_attention_config(torch.empty(batch, heads, hd, **m), k, k, table, cluster),
           splitk_gemv_config(torch.empty(batch, heads * hd, **m), torch.empty(H, heads * hd, **m), cluster,
                              128, True)]
    return out


def _configs(contexts, batches):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_attention_block import FUSED_CASES, fused_config
    from cf_cute.fused.attention_block import AttentionBlockConfig
    out = [fused_config(*c) for c in FUSED_CASES if c[5] is not None]
    c1 = FUSED_CASES[1]
    out.append(dataclasses.replace(fused_config(*c1[:5], 2, *c1[6:]), num_threads=512))
    out += _unfused(16, 32, 32, 128, 4096, 1024, False, True)            # the case that falls back
    out += _unfused(5, 32, 32, 128, 4096, 1024, True, False)             # test_unfused_matches_reference
    for b in batches:                       # benchmarks/bench_attention.py, Llama-2-7B shape
        for ctx in contexts:
            for c, tune in ((4, {}), (4, dict(phase_timer=True)), (2, dict(num_threads=512)),
                            (2, dict(num_threads=512, phase_timer=True))) if b == 1 else ():
                out.append(AttentionBlockConfig(batch=b, hidden=4096, num_heads=32, num_kv_heads=32,
                                                head_dim=128, max_len=ctx + 1, max_positions=ctx + 1,
                                                cluster_size=c, **tune))
            if b == 16:
                out += _unfused(b, 32, 32, 128, 4096, ctx + 1, False, False)
    return out


def _build(cfg):
    from cf_cute import decode_attention, gemv, qkv_rope
    from cf_cute.attention import _fused_kernel
    from cf_cute.fused.attention_block import AttentionBlockConfig, AttentionBlock
    t = time.time()
    if isinstance(cfg, AttentionBlockConfig):
        try:
            AttentionBlock(cfg)
        except ValueError:                  # does not fit: nothing to build
            return -1.0
        _fused_kernel(cfg)
    else:
        mod = {"QKVRopeConfig": qkv_rope, "DecodeAttentionConfig": decode_attention,
               "SplitKGemvConfig": gemv}[type(cfg).__name__]
        mod._kernel(cfg)
    return time.time() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--context", default="1024,4096,16384,32768")
    ap.add_argument("--batch", default="1,16")
    a = ap.parse_args(argv)
    cfgs = _configs([int(c) for c in a.context.split(",")], [int(b) for b in a.batch.split(",")])
    with ProcessPoolExecutor(a.jobs) as ex:
        for cfg, dt in zip(cfgs, ex.map(_build, cfgs)):
            print(f"{dt:6.1f} s  {cfg}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
