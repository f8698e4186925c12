"""The LM head of a decode step, ``logits = x @ W.T`` (W ``[vocab, hidden]``), as torch
(cuBLAS, W in nn.Linear order) and as ``cf_cute.gemv.splitk_gemv`` (W tiled,
``cf_cute.tiles``) at several cluster sizes: the largest single GEMV of a step
(Llama-3 vocabularies: 0.5-1 GB), so what matters is the fraction of the read
bandwidth it streams at.

    python benchmarks/bench_lm_head.py [--shapes 128256x2048,32000x4096] [--batch 1,16] [--clusters 1,2,4]

Two weight copies rotate (each is far larger than L2), every call of a row in one CUDA
graph, CUDA events, median; the floor is W's bytes over the read bandwidth measured in
the same run.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import graph_us, markdown_table, read_bandwidth_gbs, stamp  # noqa: E402

from cf_cute.gemv import splitk_gemv  # noqa: E402
from cf_cute.models import BUILTIN_CONFIGS  # noqa: E402
from cf_cute.tiles import tile_weight  # noqa: E402

# vocab x hidden of the built-in models, each shape once
SHAPES = sorted({(c.vocab, c.hidden) for c in BUILTIN_CONFIGS.values()}, key=lambda s: (-s[0], s[1]))


def run(vocab: int, hidden: int, B: int, clusters, bw: float) -> list:
    ws = [torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) / hidden ** 0.5 for _ in range(2)]
    tiled = [tile_weight(w) for w in ws]
    x = torch.randn(B, hidden, device="cuda", dtype=torch.bfloat16)
    ref = (x.float() @ ws[0].float().T)
    t = {"torch": graph_us([lambda w=w: x @ w.T for w in ws], reps=10)}
    for c in clusters:
        y = splitk_gemv(x, tiled[0], cluster_size=c, layout="tiled")
        assert (y.float() - ref).norm() / ref.norm() < 1e-2, f"splitk_gemv C={c} does not match"
        t[f"cf_cute C={c}"] = graph_us([lambda w=w, c=c: splitk_gemv(x, w, cluster_size=c, layout="tiled")
                                        for w in tiled], reps=10)
    floor = vocab * hidden * 2 / (bw * 1e3)
    rows = []
    for name, us in t.items():
        rows.append([f"{vocab} x {hidden}", B, name, f"{floor:.1f}", f"{us:.1f}", f"{100 * floor / us:.0f}%"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    del ws, tiled
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{v}x{h}" for v, h in SHAPES),
                    help="vocab x hidden, comma-separated")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--clusters", default="1,2,4")
    a = ap.parse_args(argv)
    bw = read_bandwidth_gbs()
    clusters = [int(c) for c in a.clusters.split(",") if c]
    rows = [r for s in a.shapes.split(",") for B in map(int, a.batch.split(","))
            for r in run(*map(int, s.split("x")), B, clusters, bw)]
    print(f"\nLM head GEMV, bf16, read bandwidth {bw:.0f} GB/s ({stamp()}):\n")
    print(markdown_table(["vocab x hidden", "batch", "kernel", "floor µs", "µs", "% of floor"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
