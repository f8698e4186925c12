"""In-kernel cost per round of ClusterReduce and ClusterGather against the
same exchange through global memory (the ClusterFusion paper's comparison).

Each kernel runs R rounds in one launch; the cost per round is
(t(R_hi) - t(R_lo)) / (R_hi - R_lo), so launch cost and set-up drop out.

    python benchmarks/bench_primitives.py [--clusters 2,4,8,16] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys

import torch

from cf_cute.collective_kernels import GatherHarnessConfig, GlobalExchangeConfig, ReduceHarnessConfig
from cf_cute.collectives import gather_kernel, global_exchange_kernel, reduce_kernel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import markdown_table, stamp, time_ms  # noqa: E402

R_LO, R_HI = 16, 528
NUM_CLUSTERS = 4


def per_round_us(launch) -> float:
    lo = time_ms(lambda: launch(R_LO))
    hi = time_ms(lambda: launch(R_HI))
    return (hi - lo) * 1e3 / (R_HI - R_LO)


def reduce_cost(n: int, c: int, alg: str, transport: str = "auto") -> float | None:
    try:
        cfg = ReduceHarnessConfig(num_elems=n, cluster_size=c, algorithm=alg, num_clusters=NUM_CLUSTERS,
                                  transport=transport)
        fn, k = reduce_kernel(cfg)
    except ValueError:
        return None
    x = torch.randint(-8, 9, (cfg.grid, n), device="cuda").float()
    out = torch.empty(cfg.grid, k.out_cols, device="cuda")
    return per_round_us(lambda r: fn(x, out, r))


def global_cost(n: int, c: int) -> float:
    cfg = GlobalExchangeConfig(num_elems=n, cluster_size=c, num_clusters=NUM_CLUSTERS)
    fn, k = global_exchange_kernel(cfg)
    x = torch.randint(-8, 9, (cfg.grid, n), device="cuda").float()
    out = torch.empty(cfg.grid, k.out_cols, device="cuda")
    scratch = torch.empty(NUM_CLUSTERS * 2 * c, n, device="cuda")
    return per_round_us(lambda r: fn(x, out, scratch, r))


def gather_cost(n: int, c: int, transport: str = "auto") -> float | None:
    try:
        cfg = GatherHarnessConfig(tile_elems=n, cluster_size=c, dtype="float32", check=False,
                                  num_clusters=NUM_CLUSTERS, transport=transport)
        fn = gather_kernel(cfg)
    except ValueError:
        return None
    x = torch.randint(-8, 9, (cfg.grid, n), device="cuda").float()
    out = torch.zeros(cfg.grid, c, n, device="cuda")
    return per_round_us(lambda r: fn(x, out, r))


def fmt(v):
    return "-" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", default="2,4,8,16")
    ap.add_argument("--sizes", default="1,4,16,64,256,1024,4096", help="fp32 values per CTA")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    a = ap.parse_args(argv)
    clusters = [int(v) for v in a.clusters.split(",")]
    sizes = [int(v) for v in a.sizes.split(",")]
    rows = []
    for c in clusters:
        for n in sizes:
            ds = reduce_cost(n, c, "direct", "st_async")
            db = reduce_cost(n, c, "direct", "bulk")
            ss = reduce_cost(n, c, "split", "st_async")
            sb = reduce_cost(n, c, "split", "bulk")
            auto = reduce_cost(n, c, "auto")
            g = global_cost(n, c)
            gs = gather_cost(n, c, "st_async")
            gb = gather_cost(n, c, "bulk")
            rows.append([c, 4 * n, fmt(ds), fmt(db), fmt(ss), fmt(sb), fmt(auto), fmt(g),
                         f"{g / auto:.2f}x", fmt(gs), fmt(gb)])
            print(" | ".join(str(v) for v in rows[-1]), flush=True)
    header = ["cluster", "B/CTA", "direct st.async", "direct bulk", "split st.async", "split bulk",
              "all-reduce auto", "global exchange", "global/auto", "gather st.async", "gather bulk"]
    text = (f"Primitives, µs per round, {NUM_CLUSTERS} clusters, 128 threads/CTA "
            f"({stamp()}):\n\n" + markdown_table(header, rows))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
