"""MLA decode attention (issue 6), DeepSeek-V2-Lite shape: the bandwidth floor and the
torch baselines (eager and CUDA graph) and the fused cf_cute path (``mla_decode``, five
launches, CUDA graph) of one layer's attention step, in one run, one row per (batch, context).
``--variants`` adds the fused path with other tunings (``VARIANTS``: ``direct`` is the
attention kernel that reads cache rows from global memory, ``MLATuning(staged=False)``),
one column each, for comparison in the same run.

    python benchmarks/bench_mla.py [--context 1024,4096,16384,32768] [--batch 1,16] [--variants direct,...]

Bytes per step: the packed weights (w_front, W_UK, W_UV, wo: about 28 MB in bf16) and
every request's latent cache up to its position ((ctx + 1) x 576 x 2 bytes). Several
weight + cache sets rotate so that L2 (50-60 MB) does not hold them; each set is one
CUDA graph; CUDA events, median.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import markdown_table, read_bandwidth_gbs, stamp, time_ms, capture_graph  # noqa: E402

from cf_cute.mla import MLAPlanKey, MLATuning, mla_decode, mla_decode_torch, pack_mla  # noqa: E402
from cf_cute.reference_mla import MLAShape, MLAWeights, mla_rope_tables, mla_softmax_scale  # noqa: E402

YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
            mscale=0.707, mscale_all_dim=0.707)                 # DeepSeek-V2-Lite's rope_scaling


VARIANTS = {
    "direct": MLATuning(staged=False),                       # warps read the cache rows from global memory
    "stage64x2": MLATuning(stage_tokens=64, stages=2),       # fewer, larger steps; one stage in flight
    "one-cta": MLATuning(waves=1, stages=5),                 # one CTA an SM with a deep ring
    "front-late": MLATuning(front_early_loads=False),        # MLAFront's weight loads after its norm
    "no-pdl": MLATuning(pdl=False),                          # plain launches (no programmatic dependence)
    "out-unfused": MLATuning(fuse_out=False),                # MLAOut and the wo GEMV as two launches
    "out-late": MLATuning(out_early_loads=False),            # fused: wo's loads only after the grid barrier
}


def bench_plan_key(batch: int, ctx: int, tuning: MLATuning = MLATuning()) -> MLAPlanKey:
    """The static plan of a benchmark row (for the test file's ``mla_prebuild_configs``):
    bf16, no residual, cache and RoPE table of ctx + 1 slots."""
    S = MLAShape()
    return MLAPlanKey(batch=batch, dtype="bfloat16", shape=S, eps=1e-6, scale=mla_softmax_scale(S, YARN),
                      has_residual=False, cache_shape=(batch, ctx + 1, S.latent_dim), max_pages=0,
                      max_positions=ctx + 1, layout="tiled", tuning=tuning)


def _set(S: MLAShape, batch: int, ctx: int, scale: float):
    dev, dt, H, r = "cuda", torch.bfloat16, S.hidden, S.kv_lora_rank
    w = MLAWeights(norm=(1 + 0.1 * torch.randn(H, device=dev)).to(dt),
                   wq=(torch.randn(S.num_heads * S.qk_head_dim, H, device=dev) / math.sqrt(H)).to(dt),
                   wkv_a=(torch.randn(S.latent_dim, H, device=dev) / math.sqrt(H)).to(dt),
                   kv_norm=(1 + 0.1 * torch.randn(r, device=dev)).to(dt),
                   wkv_b=(torch.randn(S.num_heads * (S.qk_nope_head_dim + S.v_head_dim), r, device=dev)
                          / math.sqrt(r)).to(dt),
                   wo=(torch.randn(H, S.num_heads * S.v_head_dim, device=dev) / math.sqrt(2048)).to(dt))
    cache = torch.randn(batch, ctx + 1, S.latent_dim, device=dev, dtype=dt)
    # the fused path reads the tiled pack (pack_mla's default), the torch step the same weights in
    # nn.Linear order (no per-call copies in the baseline)
    return (pack_mla(w, S, scale=scale), cache, torch.randn(batch, H, device=dev, dtype=dt),
            pack_mla(w, S, scale=scale, layout="linear"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="1024,4096,16384,32768")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--budget-gb", type=float, default=30.0, help="device memory for the rotating sets")
    ap.add_argument("--variants", default="", help=f"other tunings to time, of {','.join(VARIANTS)}")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}")
    S = MLAShape()
    scale = mla_softmax_scale(S, YARN)
    bw = read_bandwidth_gbs()
    rows = []
    for batch in (int(b) for b in a.batch.split(",")):
        for ctx in (int(c) for c in a.context.split(",")):
            cos, sin = (t.cuda() for t in mla_rope_tables(ctx + 1, S.qk_rope_head_dim, 10000.0, YARN))
            positions = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            probe = _set(S, batch, ctx, scale)
            w_bytes = sum(t.numel() * t.element_size() for t in (probe[0].w_front, probe[0].w_uk, probe[0].w_uv,
                                                                 probe[0].wo))
            nbytes = w_bytes + batch * (ctx + 1) * S.latent_dim * 2
            n = max(2, min(8, int(a.budget_gb * 1e9 // nbytes)))
            sets = [probe] + [_set(S, batch, ctx, scale) for _ in range(n - 1)]
            # sanity check on the first set (both steps append the same row at the same slot)
            expect = mla_decode_torch(probe[2], probe[3], probe[1], positions, cos, sin)
            got = mla_decode(probe[2], probe[0], probe[1], positions, cos, sin)
            err = ((got.float() - expect.float()).norm() / expect.float().norm()).item()
            fns = [lambda p=p, c=c, h=h: mla_decode_torch(h, p, c, positions, cos, sin) for _, c, h, p in sets]
            eager = time_ms(lambda: [f() for f in fns]) * 1e3 / n
            graphs = [capture_graph(f)[0] for f in fns]
            graph = time_ms(lambda: [g.replay() for g in graphs]) * 1e3 / n
            fused_fns = [lambda p=p, c=c, h=h: mla_decode(h, p, c, positions, cos, sin) for p, c, h, _ in sets]
            fused_graphs = [capture_graph(f)[0] for f in fused_fns]
            fused = time_ms(lambda: [g.replay() for g in fused_graphs]) * 1e3 / n
            extra = []
            for name in variants:
                v_graphs = [capture_graph(lambda p=p, c=c, h=h: mla_decode(h, p, c, positions, cos, sin,
                                                                           tuning=VARIANTS[name]))[0]
                            for p, c, h, _ in sets]
                extra.append(f"{time_ms(lambda: [g.replay() for g in v_graphs]) * 1e3 / n:.1f}")
                del v_graphs
            floor = nbytes / (bw * 1e3)
            row = [batch, ctx, f"{floor:.1f}", f"{eager:.1f}", f"{graph:.1f}", f"{nbytes / graph / 1e3:.0f}",
                   f"{100 * floor / graph:.0f}%", f"{fused:.1f}", f"{nbytes / fused / 1e3:.0f}",
                   f"{100 * floor / fused:.0f}%", f"{graph / fused:.2f}x", *extra, f"{err:.1e}"]
            print(" | ".join(map(str, row)), flush=True)
            rows.append(row)
            del sets, fns, graphs, probe, fused_fns, fused_graphs
            torch.cuda.empty_cache()
    print(f"\nMLA decode attention, DeepSeek-V2-Lite shape, bf16, read bandwidth {bw:.0f} GB/s ({stamp()}):\n")
    print(markdown_table(["batch", "context", "floor µs", "torch eager µs", "torch graph µs", "torch graph GB/s",
                          "torch graph % of floor", "cf_cute graph µs", "cf_cute GB/s", "cf_cute % of floor",
                          "cf_cute vs torch graph", *(f"{v} µs" for v in variants), "rel. err vs torch"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
