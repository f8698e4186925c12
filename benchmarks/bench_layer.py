"""MLP block and whole decoder layer at decode time: cf_cute against torch eager
and torch CUDA graphs, with the bandwidth floor measured in the same run.

Llama-2-7B shape by default (hidden 4096, intermediate 11008, 32 heads of 128),
bf16. Several weight (and KV) sets are rotated so that L2 does not hold the
working set; each variant is captured in one CUDA graph per set and the replays
are timed with CUDA events (median over repetitions, µs per block).

    python benchmarks/bench_layer.py [--batch 1,16] [--context 1024,4096]
                                     [--hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32]
                                     [--mlp-variants k2,k1,c1,c4,prefetch] [--no-layer]

Floors: MLP = (gate + up + down weights) / measured read bandwidth; layer = MLP
+ attention weights + the KV cache read.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_attention import TorchBlock, graphed  # noqa: E402
from common import (RESULT_COLUMNS, attention_sets, markdown_table, read_bandwidth_gbs,  # noqa: E402
                    result_row, stamp, time_ms)

from cf_cute.attention import AttentionTuning, attention_block  # noqa: E402
from cf_cute.decoder import DecoderLayerWeights, decoder_layer  # noqa: E402
from cf_cute.mlp import MLPTuning, mlp_block, mlp_block_torch, pack_mlp, planned_config  # noqa: E402
from cf_cute.reference import MLPWeights, rope_tables  # noqa: E402

MLP_VARIANTS = {"k4": MLPTuning(k_parts=4), "k1": MLPTuning(k_parts=1), "pipeline": MLPTuning(pipeline=True),
                "early-b": MLPTuning(early_phase_b=True), "c1": MLPTuning(cluster_size=1),
                "c2": MLPTuning(cluster_size=2), "c4": MLPTuning(cluster_size=4), "prefetch": MLPTuning(l2_prefetch=True),
                "unroll2": MLPTuning(unroll=2), "unroll4": MLPTuning(unroll=4), "unroll8": MLPTuning(unroll=8),
                "shared-x": MLPTuning(shared_x=True),
                "no-shared-x": MLPTuning(shared_x=False), "no-pipeline": MLPTuning(pipeline=False),
                "k4-no-pipeline": MLPTuning(k_parts=4, pipeline=False), "early": MLPTuning(early_loads=True),
                "no-tail": MLPTuning(tail_pieces=0)}


def mlp_sets(n: int, batch: int, H: int, I: int):
    dev, dt = "cuda", torch.bfloat16
    out = []
    for _ in range(n):
        w = MLPWeights(norm=(1 + 0.1 * torch.randn(H, device=dev)).to(dt),
                       w_gate=(torch.randn(I, H, device=dev) / math.sqrt(H)).to(dt),
                       w_up=(torch.randn(I, H, device=dev) / math.sqrt(H)).to(dt),
                       w_down=(torch.randn(H, I, device=dev) / math.sqrt(I)).to(dt))
        out.append((pack_mlp(w), torch.randn(batch, H, device=dev, dtype=dt), pack_mlp(w, layout="linear")))
    return out


def _time(fns, eager: bool) -> float | None:
    if eager:
        step = lambda: [f() for f in fns]                # noqa: E731
    else:
        try:
            graphs = [graphed(f) for f in fns]
        except ValueError as e:
            print(f"skipped: {e}", file=sys.stderr)
            return None
        step = lambda: [g.replay() for g in graphs]      # noqa: E731
    return time_ms(step) * 1e3 / len(fns)

# weight-order variants the benchmark is run with (prebuild.py compiles them ahead)
LINEAR_VARIANTS = ("linear",)


def variant_tuning(name: str) -> tuple[bool, MLPTuning]:
    """``name`` = variants joined by ``+`` (e.g. ``linear+unroll4``): (nn.Linear-order
    weights instead of the default tiled ones?, the MLPTuning with every named
    variant's non-default knobs)."""
    parts = name.split("+")
    linear = "linear" in parts
    knobs = {}
    for v in (p for p in parts if p != "linear"):
        t = MLP_VARIANTS[v]
        knobs.update({f.name: getattr(t, f.name) for f in dataclasses.fields(t)
                      if getattr(t, f.name) != f.default})
    return linear, MLPTuning(**knobs)


def bench_mlp(batch: int, H: int, I: int, sets: int, variants) -> dict:
    sets3 = mlp_sets(sets, batch, H, I)
    items = [(p, h) for p, h, _ in sets3]                 # tiled weights (pack_mlp's default)
    linear_items = [(pl, h) for _, h, pl in sets3]        # the same weights in nn.Linear order
    res = {"torch eager": _time([lambda p=p, h=h: mlp_block_torch(h, p) for p, h in linear_items], True),
           "torch graph": _time([lambda p=p, h=h: mlp_block_torch(h, p) for p, h in linear_items], False)}
    cfg = planned_config(items[0][1], items[0][0])
    res[f"cf_cute ({cfg.num_clusters}x{cfg.cluster_size})"] = _time(
        [lambda p=p, h=h: mlp_block(h, p) for p, h in items], False)
    for v in variants:
        linear, t = variant_tuning(v)
        res[f"cf_cute {v}"] = _time([lambda p=p, h=h, t=t: mlp_block(h, p, tuning=t)
                                     for p, h in (linear_items if linear else items)], False)
    return res


def bench_layer(batch: int, ctx: int, H: int, I: int, heads: int, kv_heads: int, sets: int) -> dict:
    dev, hd = "cuda", 128
    cos, sin = rope_tables(ctx + 1, hd, 10000.0)
    cos, sin = cos.to(dev), sin.to(dev)
    positions = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
    attn = attention_sets(sets, batch, ctx, heads=heads, kv_heads=kv_heads, hidden=H, head_dim=hd)
    mlps = mlp_sets(sets, batch, H, I)
    items = [(w, DecoderLayerWeights(attn=pa, mlp=pm), kc, vc, h, pl)
             for (w, pa, kc, vc, h), (pm, _, pl) in zip(attn, mlps)]

    def torch_layer(w, layer, kc, vc, h, linear_mlp):
        blk = TorchBlock(w, heads, kv_heads, cos, sin, ctx)
        return lambda: mlp_block_torch(blk(h, kc, vc, positions), linear_mlp)

    res = {"torch eager": _time([torch_layer(*it) for it in items], True),
           "torch graph": _time([torch_layer(*it) for it in items], False),
           "cf_cute layer": _time([lambda l=layer, kc=kc, vc=vc, h=h: decoder_layer(h, l, kc, vc, positions, cos, sin)
                                   for _, layer, kc, vc, h, _ in items], False),
           "cf_cute layer, PDL": _time([lambda l=layer, kc=kc, vc=vc, h=h: decoder_layer(
               h, l, kc, vc, positions, cos, sin, attn_tuning=AttentionTuning(pdl=True),
               mlp_tuning=MLPTuning(pdl=True)) for _, layer, kc, vc, h, _ in items], False),
           "cf_cute attention only": _time([lambda l=layer, kc=kc, vc=vc, h=h:
                                            attention_block(h, l.attn, kc, vc, positions, cos, sin)
                                            for _, layer, kc, vc, h, _ in items], False)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--context", default="1024,4096")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--mlp-variants", default="", help=f"from {sorted(MLP_VARIANTS)}")
    ap.add_argument("--no-layer", action="store_true", help="MLP block only")
    a = ap.parse_args(argv)
    H, I, hd = a.hidden, a.intermediate, 128
    bw = read_bandwidth_gbs()
    mlp_bytes = 3 * H * I * 2
    attn_w = (a.heads + 2 * a.kv_heads) * hd * H * 2 + H * a.heads * hd * 2
    rows = []
    for batch in (int(b) for b in a.batch.split(",")):
        res = bench_mlp(batch, H, I, a.sets, [v for v in a.mlp_variants.split(",") if v])
        for name, t in res.items():
            if t is not None and not name.startswith("torch"):
                rows.append(result_row(["MLP", batch, "-"], res, name, mlp_bytes, bw))
        if a.no_layer:
            continue
        for ctx in (int(c) for c in a.context.split(",")):
            nbytes = mlp_bytes + attn_w + 2 * batch * ctx * a.kv_heads * hd * 2
            res = bench_layer(batch, ctx, H, I, a.heads, a.kv_heads, max(2, min(a.sets, int(30e9 // nbytes))))
            for name, t in res.items():
                if t is not None and not name.startswith("torch"):
                    nb = nbytes - (mlp_bytes if "attention" in name else 0)
                    rows.append(result_row(["layer", batch, ctx], res, name, nb, bw))
    print(f"\nMLP block and decoder layer, H={H}, I={I}, {a.heads}/{a.kv_heads} heads x 128, bf16, read "
          f"bandwidth {bw:.0f} GB/s ({stamp()}):\n")
    print(markdown_table(["block", "batch", "context", "cf_cute"] + RESULT_COLUMNS, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
