"""The three launches of the attention block's three-launch path
(``cf_cute.attention.attention_block_unfused``), each timed alone and together, against
the bytes each must read: where the block's time goes when it is not one kernel.

    python benchmarks/bench_unfused.py [--hidden 4096 --heads 32 --kv-heads 8]
        [--batch 1,2,4] [--context 1024,16384] [--wo-variants 4x64,16x128] [--qkv-clusters 8,16]

``--wo-variants CxBM``: the output projection also at clusters of C and BM-row blocks;
``--qkv-clusters C``: the QKV launch also as ``qkv_rope`` (a cluster of C CTAs a KV head).

Each launch at its planned size (``unfused_plan``), several weight / KV sets rotating (L2
does not hold them), every call of a row in one CUDA graph, CUDA events, median. Floors:
QKV weights, the KV cache read, W_o, each over the read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import attention_sets, graph_us, markdown_table, read_bandwidth_gbs, stamp  # noqa: E402

from cf_cute.attention import attention_block_unfused, unfused_plan  # noqa: E402
from cf_cute.decode_attention import decode_attention, decode_attention_config, sm_count  # noqa: E402
from cf_cute.gemv import splitk_gemv  # noqa: E402
from cf_cute.qkv_rope import qkv_project, qkv_rope  # noqa: E402
from cf_cute.reference import rope_tables  # noqa: E402


def run(B: int, ctx: int, H: int, heads: int, kv: int, bw: float, wo_variants=(), qkv_clusters=()) -> list:
    hd = H // heads
    per_set = 2 * B * (ctx + 1) * kv * hd * 2 + 2 * (2 * heads + 2 * kv) * hd * H
    sets = attention_sets(max(2, min(8, int(3e9 // per_set))), B, ctx, heads=heads, kv_heads=kv, hidden=H,
                          head_dim=hd)
    cos, sin = (t.cuda() for t in rope_tables(ctx + 1, hd, 10000.0))
    positions = torch.full((B,), ctx - 1, dtype=torch.int32, device="cuda")
    lengths = positions + 1
    plan = unfused_plan(B, H, heads, kv, hd, sm_count(positions.device))
    front = dict(num_heads=heads, num_kv_heads=kv, layout=sets[0][1].layout)

    def qkv(p, h, kc, vc):
        args = (h, p.norm, p.w_qkv, cos, sin, positions, kc, vc)
        return qkv_project(*args, **front) if plan.qkv is None else qkv_rope(*args, cluster_size=plan.qkv, **front)

    mids = [qkv(p, h, kc, vc) for _, p, kc, vc, h in sets]            # q, h of each set (for the later launches)
    outs = [decode_attention(q, kc, vc, lengths, cluster_size=plan.attn) for (q, _), (_, _, kc, vc, _) in
            zip(mids, sets)]
    t = {"QKV": graph_us([lambda s=s: qkv(s[1], s[4], s[2], s[3]) for s in sets]),
         "attention": graph_us([lambda q=q, s=s: decode_attention(q, s[2], s[3], lengths, cluster_size=plan.attn)
                                 for (q, _), s in zip(mids, sets)]),
         "W_o": graph_us([lambda o=o, h=h, s=s: splitk_gemv(o.view(B, -1), s[1].wo, residual=h,
                                                             cluster_size=plan.wo, block_m=plan.wo_block_m,
                                                             layout=s[1].layout)
                           for o, (_, h), s in zip(outs, mids, sets)]),
         "block": graph_us([lambda s=s: attention_block_unfused(s[4], s[1], s[2], s[3], positions, cos, sin)
                             for s in sets])}
    for c in qkv_clusters:
        t[f"QKV C={c}"] = graph_us([lambda s=s, c=c: qkv_rope(s[4], s[1].norm, s[1].w_qkv, cos, sin, positions, s[2],
                                                               s[3], cluster_size=c, **front) for s in sets])
    for c, bm in wo_variants:
        t[f"W_o C={c} x {bm}"] = graph_us([lambda o=o, h=h, s=s, c=c, bm=bm: splitk_gemv(
            o.view(B, -1), s[1].wo, residual=h, cluster_size=c, block_m=bm, layout=s[1].layout)
            for o, (_, h), s in zip(outs, mids, sets)])
    acfg = decode_attention_config(mids[0][0], sets[0][2], sets[0][3], None, plan.attn)
    nbytes = {"QKV": (heads + 2 * kv) * hd * H * 2, "attention": 2 * B * ctx * kv * hd * 2,
              "W_o": H * heads * hd * 2}
    nbytes["block"] = sum(nbytes.values())
    for name in t:
        if name not in nbytes:
            nbytes[name] = nbytes[name.split()[0]]
    sizes = {"QKV": "grid-wide" if plan.qkv is None else f"C={plan.qkv}",
             "attention": f"C={acfg.cluster_size} x {acfg.splits}, {acfg.num_threads} thr",
             "W_o": f"C={plan.wo}, {plan.wo_block_m} rows", "block": f"sum of parts {sum(list(t.values())[:3]):.1f}"}
    sizes.update({name: "variant" for name in t if name not in sizes})
    rows = []
    for name, us in t.items():
        floor = nbytes[name] / (bw * 1e3)
        rows.append([B, ctx, name, sizes[name], f"{floor:.1f}", f"{us:.1f}", f"{100 * floor / us:.0f}%"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--batch", default="1,2,4")
    ap.add_argument("--context", default="1024,16384")
    ap.add_argument("--wo-variants", default="", help="output projection grids CxBM, e.g. 4x64,16x128")
    ap.add_argument("--qkv-clusters", default="", help="QKV as qkv_rope at these cluster sizes, e.g. 8,16")
    a = ap.parse_args(argv)
    wo = [tuple(map(int, v.split("x"))) for v in a.wo_variants.split(",") if v]
    qc = [int(c) for c in a.qkv_clusters.split(",") if c]
    bw = read_bandwidth_gbs()
    rows = [r for B in map(int, a.batch.split(",")) for ctx in map(int, a.context.split(","))
            for r in run(B, ctx, a.hidden, a.heads, a.kv_heads, bw, wo, qc)]
    print(f"\nThe three launches, H={a.hidden}, {a.heads}/{a.kv_heads} heads, bf16, read bandwidth {bw:.0f} GB/s "
          f"({stamp()}):\n")
    print(markdown_table(["batch", "context", "launch", "grid", "floor µs", "µs", "% of floor"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
