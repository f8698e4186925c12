"""Attention block at decode time: cf_cute against torch eager and torch CUDA
graphs, with the bandwidth floor measured in the same run.

Llama-2-7B shape by default (hidden 4096, 32 heads of 128), bf16, every request
at the same context length. Several weight/KV sets are rotated so that L2
(50 MB) does not hold the working set; each variant is captured in one CUDA
graph per set and the replays are timed with CUDA events (median).

    python benchmarks/bench_attention.py [--context 1024,4096,16384,32768] [--batch 1,16]
                                         [--heads 32 --kv-heads 32 --hidden 4096]
                                         [--clusters 2,4] [--unfused]

Head dim = hidden / heads. ``--unfused`` adds the single launch at its automatic cluster size
("1 launch") and the three launches ("3 launches") beside the automatic choice.

Floor = (QKV + O weights + the KV cache read) / measured read bandwidth.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from cf_cute.attention import (AttentionTuning, attention_block, attention_block_unfused, default_cluster_size,
                               linear_attention)

# tuning variants timed with --variants (name -> AttentionTuning), at the auto cluster size
VARIANTS = {"unroll4": AttentionTuning(unroll=4), "prefetch": AttentionTuning(l2_prefetch=True),
            "attn-unroll4": AttentionTuning(attn_unroll=4), "pipeline": AttentionTuning(pipeline_tiles=True),
            "early-wo": AttentionTuning(early_wo_prefetch=True, l2_prefetch=True, o_proj="grid"),
            "threads512": AttentionTuning(num_threads=512), "threads128": AttentionTuning(num_threads=128),
            "threads256": AttentionTuning(num_threads=256),    # GQA: 128 threads by default since session 12
            "fold8": AttentionTuning(attn_fold_budget=8),     # softmax rescales shared by 8 / G tokens
            "attn-cuda-cores": AttentionTuning(attn_tensor_cores=False),   # GQA attention on CUDA cores
            "attn-depth1": AttentionTuning(attn_mma_depth=1),  # GQA: the next step's loads in flight
            "attn-depth0": AttentionTuning(attn_mma_depth=0),  # GQA: loads at each step's start
            "early-b": AttentionTuning(early_phase_b=True, o_proj="grid"),    # W_o's first loads before the barrier
            "default": AttentionTuning(),                      # with @C: the defaults at cluster size C
            "head": AttentionTuning(o_proj="head"),            # W_o per KV-head cluster, no grid barrier
            "grid": AttentionTuning(o_proj="grid"),            # W_o over the grid after a grid barrier
            "flags": AttentionTuning(o_proj="grid", grid_sync="flags"),      # ... after per-head counters
            "barrier": AttentionTuning(o_proj="grid", grid_sync="barrier"),  # ... after the grid barrier
            "early": AttentionTuning(early_loads=True),        # QKV: each warp's first W loads under the norm
            "stage1": AttentionTuning(o_proj="head", o_stage_tiles=1),   # head + W_o tiles a warp staged by
            "stage2": AttentionTuning(o_proj="head", o_stage_tiles=2),   # cp.async under the merge
            "head-late": AttentionTuning(o_proj="head", o_early_loads=False),
            "pipeline4": AttentionTuning(pipeline_tiles=True, unroll=4)}   # QKV tiles as one pipeline, 4 steps
from cf_cute.reference import AttentionWeights, rope_tables

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (RESULT_COLUMNS, attention_sets, capture_graph, markdown_table,  # noqa: E402
                    read_bandwidth_gbs, result_row, stamp, time_ms)


class TorchBlock:
    """The unfused torch block: RMSNorm, fused QKV matmul, RoPE, cache write, SDPA, O + residual."""

    def __init__(self, w: AttentionWeights, heads: int, kv_heads: int, cos, sin, context: int):
        self.w, self.heads, self.kv_heads, self.context = w, heads, kv_heads, context
        self.wqkv = torch.cat([w.wq, w.wk, w.wv], 0)
        self.cos, self.sin = cos, sin
        self.hd = w.wq.shape[0] // heads

    def __call__(self, hidden, kc, vc, positions):
        B = hidden.shape[0]
        hd, nq, nkv = self.hd, self.heads, self.kv_heads
        x = F.rms_norm(hidden, (hidden.shape[1],), self.w.norm, 1e-5)
        qkv = x @ self.wqkv.T
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=1)
        c, s = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

        def rope(t, n):
            t = t.view(B, n, hd).float()
            t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
            return torch.cat((t1 * c - t2 * s, t2 * c + t1 * s), -1).to(hidden.dtype)

        q, k = rope(q, nq), rope(k, nkv)
        rows = torch.arange(B, device=hidden.device)
        kc[rows, positions] = k
        vc[rows, positions] = v.view(B, nkv, hd)
        L = self.context                     # same context for every request (no host read: capturable)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kc[:, :L].transpose(1, 2), vc[:, :L].transpose(1, 2),
                                           enable_gqa=nq != nkv)
        return hidden + o.reshape(B, nq * hd) @ self.w.wo.T


def graphed(fn):
    return capture_graph(fn)[0]


def run(ctx: int, batch: int, heads: int, kv_heads: int, H: int, sets: int, bw: float, clusters, unfused: bool,
        variants=()):
    dev, dt = "cuda", torch.bfloat16
    hd = H // heads
    L = ctx + 1
    cos, sin = rope_tables(L, hd, 10000.0)
    cos, sin = cos.to(dev), sin.to(dev)
    positions = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
    items = attention_sets(sets, batch, ctx, heads=heads, kv_heads=kv_heads, hidden=H, head_dim=hd)
    results = {}
    names = (["torch eager", "torch graph", "cf_cute auto"] + [f"fused C={c}" for c in clusters]
             + [f"auto {v}" for v in variants] + (["1 launch", "3 launches"] if unfused else []))
    c1 = default_cluster_size(kv_heads, H)           # the single launch's automatic cluster size
    for name in names:
        fns = []
        for w, packed, kc, vc, hidden in items:
            if name.startswith("torch"):
                blk = TorchBlock(w, heads, kv_heads, cos, sin, ctx)
                fns.append(lambda blk=blk, h=hidden, kc=kc, vc=vc: blk(h, kc, vc, positions))
            elif name.startswith("fused") or name.startswith("cf_cute auto") or name == "1 launch":
                c = int(name.split("=")[1]) if "=" in name else c1 if name == "1 launch" else None
                fns.append(lambda p=packed, h=hidden, kc=kc, vc=vc, c=c:
                           attention_block(h, p, kc, vc, positions, cos, sin, cluster_size=c))
            elif name == "auto linear":          # the same weights in nn.Linear order (pack_attention tiles them)
                fns.append(lambda p=linear_attention(packed), h=hidden, kc=kc, vc=vc:
                           attention_block(h, p, kc, vc, positions, cos, sin))
            elif name.startswith("auto "):          # "auto VARIANT" or "auto VARIANT@C" (cluster size C)
                v, _, c = name[5:].partition("@")
                t = VARIANTS[v]
                fns.append(lambda p=packed, h=hidden, kc=kc, vc=vc, t=t, c=int(c) if c else None:
                           attention_block(h, p, kc, vc, positions, cos, sin, tuning=t, cluster_size=c))
            else:
                fns.append(lambda p=packed, h=hidden, kc=kc, vc=vc:
                           attention_block_unfused(h, p, kc, vc, positions, cos, sin))
        if name == "torch eager":
            step = lambda: [f() for f in fns]                # noqa: E731
        else:
            try:
                graphs = [graphed(f) for f in fns]
            except ValueError as e:                          # e.g. a cluster size whose grid is not resident
                print(f"skipped {name}: {e}", file=sys.stderr)
                continue
            step = lambda: [g.replay() for g in graphs]      # noqa: E731
        results[name] = time_ms(step) * 1e3 / sets          # µs per block
    weight_bytes = (heads + 2 * kv_heads) * hd * H * 2 + H * heads * hd * 2
    kv_bytes = 2 * batch * ctx * kv_heads * hd * 2
    floor_us = (weight_bytes + kv_bytes) / (bw * 1e3)
    return results, floor_us, weight_bytes + kv_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="1024,4096,16384,32768")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--budget-gb", type=float, default=40.0, help="device memory for the rotating sets")
    ap.add_argument("--clusters", default="", help="cluster sizes of the fused kernel (default: its heuristic)")
    ap.add_argument("--unfused", action="store_true", help="also time the three-launch composition")
    ap.add_argument("--variants", default="", help=f"tuning variants, from {sorted(VARIANTS) + ['linear']} "
                                                   f"(linear: the weights in nn.Linear order), each optionally "
                                                   f"@C for cluster size C (e.g. head@8)")
    a = ap.parse_args(argv)
    clusters = [int(c) for c in a.clusters.split(",")] if a.clusters else []
    bw = read_bandwidth_gbs()
    rows = []
    for batch in (int(b) for b in a.batch.split(",")):
        for ctx in (int(c) for c in a.context.split(",")):
            hd = a.hidden // a.heads
            per_set = 2 * batch * (ctx + 1) * a.kv_heads * hd * 2 + 2 * (a.heads + a.kv_heads) * hd * a.hidden * 2
            sets = max(2, min(8, int(a.budget_gb * 1e9 // per_set)))
            res, floor_us, nbytes = run(ctx, batch, a.heads, a.kv_heads, a.hidden, sets, bw, clusters, a.unfused,
                                        [v for v in a.variants.split(",") if v])
            for name in res:
                if name.startswith("torch"):
                    continue
                rows.append(result_row([batch, ctx, sets], res, name, nbytes, bw))
    print(f"\nAttention block, H={a.hidden}, {a.heads}/{a.kv_heads} heads x {a.hidden // a.heads}, bf16, "
          f"read bandwidth {bw:.0f} GB/s ({stamp()}):\n")
    print(markdown_table(["batch", "context", "sets", "cf_cute"] + RESULT_COLUMNS, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
