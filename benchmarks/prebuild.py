"""Compile, on a machine without a GPU, the kernels that the GPU tests and the
attention benchmark will ask for, into the disk cache (``$CF_CUTE_CACHE_DIR``).

The cache key (arch, DSL version, package source fingerprint, config, argument
specs) is the same on the GPU machine, so shipping the cache folder there
turns each compile (5-30 s of device time) into a load of a few ms.

    CF_CUTE_CACHE_DIR=.device/cfcache python benchmarks/prebuild.py [--jobs 2] [--context 1024,4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _configs(contexts, batches):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_attention_block import FUSED_CASES, fused_config
    from cf_cute.fused.attention_block import AttentionBlockConfig
    out = [fused_config(*c) for c in FUSED_CASES]
    for b in batches:                       # benchmarks/bench_attention.py, Llama-2-7B shape
        for ctx in contexts:
            out.append(AttentionBlockConfig(batch=b, hidden=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                                            max_len=ctx + 1, max_positions=ctx + 1, cluster_size=4))
    return out


def _build(cfg):
    from cf_cute.attention import _fused_kernel
    t = time.time()
    _fused_kernel(cfg)
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
            print(f"{dt:6.1f} s  batch {cfg.batch} heads {cfg.num_heads}/{cfg.num_kv_heads} hidden {cfg.hidden} "
                  f"max_len {cfg.max_len} cluster {cfg.cluster_size}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
