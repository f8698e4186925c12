"""Split-KV decode attention alone (the middle launch of the attention block's
three-launch path, ``cf_cute.decode_attention``): the bandwidth floor, torch eager and
torch CUDA-graph SDPA, and cf_cute's kernel, one row per (KV heads, batch, context).
``--variants`` adds a column each: a variant is ``+``-joined settings, ``cuda-cores``
(the CUDA-core kernel at GQA), ``cN`` (cluster size N), ``tN`` (N threads a CTA), ``dN``
(tensor cores: N steps of loads in flight a warp), ``sN`` (N clusters a request and KV
head, merged through global memory), e.g. ``c2+s4+t256``.

    python benchmarks/bench_decode_attention.py [--kv-heads 8] [--heads 32] [--head-dim 128]
        [--batch 16] [--context 1024,4096,16384] [--variants cuda-cores,c1,c2+t128,d2] [--phases]

Bytes per call: every request's K and V rows up to its length (all ``ctx`` tokens here)
plus q and o. Several caches rotate (more bytes than L2 holds), all calls of one
variant in one CUDA graph; CUDA events, median of the replays.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import graph_us, markdown_table, read_bandwidth_gbs, stamp, time_ms  # noqa: E402

from cf_cute.decode_attention import DecodeAttentionTuning, decode_attention, decode_attention_config  # noqa: E402

_SETTINGS = {"t": "num_threads", "d": "mma_depth", "s": "splits"}


def variant_kwargs(name: str) -> dict:
    """``decode_attention`` keywords of a variant name (see the module docstring)."""
    kw, tune = {}, {}
    for part in name.split("+"):
        if part == "cuda-cores":
            tune["tensor_cores"] = False
        elif part[:1] == "c" and part[1:].isdigit():
            kw["cluster_size"] = int(part[1:])
        elif part[:1] in _SETTINGS and part[1:].isdigit():
            tune[_SETTINGS[part[0]]] = int(part[1:])
        else:
            raise SystemExit(f"unknown variant setting {part!r} in {name!r}: cuda-cores, cN, tN, dN or sN")
    return dict(kw, tuning=DecodeAttentionTuning(**tune))


def _sets(n: int, batch: int, ctx: int, heads: int, kv_heads: int, hd: int):
    dev, dt = "cuda", torch.bfloat16
    return [(torch.randn(batch, heads, hd, device=dev, dtype=dt),
             torch.randn(batch, ctx, kv_heads, hd, device=dev, dtype=dt),
             torch.randn(batch, ctx, kv_heads, hd, device=dev, dtype=dt)) for _ in range(n)]


def phases(a) -> None:
    """Each phase of the default kernel (``phase_timer``): the time from the previous stamp
    of the same CTA (thread 0), median / max over CTAs, median over launches of rotating
    caches; ``span``: first start to last end of a launch (bench_phases.py's statistics)."""
    from bench_phases import record_stamps, summary
    from cf_cute.decode_attention import split_state
    from cf_cute.fused.decode_attention import PHASES
    H, KV, hd = a.heads, a.kv_heads, a.head_dim
    tune = DecodeAttentionTuning(phase_timer=True)
    names = PHASES[1:]
    rows = []
    for B in map(int, a.batch.split(",")):
        for ctx in map(int, a.context.split(",")):
            n = max(2, math.ceil(3 * 60e6 / (2 * B * ctx * KV * hd * 2)))
            sets = _sets(n, B, ctx, H, KV, hd)
            lengths = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
            cfg = decode_attention_config(*sets[0], None, None, tune)
            work = split_state(cfg, "cuda")[0]              # the workspace decode_attention uses
            per, spans = {p: ([], []) for p in names}, []
            for i in range(3 + 30):
                decode_attention(*sets[i % n], lengths, tuning=tune)
                torch.cuda.synchronize()
                if i >= 3:
                    record_stamps(work[cfg.stamp_base:].view(torch.int32).view(cfg.grid, len(PHASES)), per, spans,
                                  names)
            rows.append(summary([KV, B, ctx, f"{cfg.cluster_size} x {cfg.splits}, {cfg.num_threads} thr"], per,
                                spans, names, digits=2))
    print(f"\nDecode attention phases, µs (median / max over CTAs), thread 0 ({stamp()}):\n")
    print(markdown_table(["KV heads", "batch", "context", "grid"] + list(names) + ["span"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", default="16")
    ap.add_argument("--context", default="1024,4096,16384")
    ap.add_argument("--variants", default="")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--phases", action="store_true",
                    help="instead: the default kernel's phases from its stamped build (µs, median / max over CTAs)")
    a = ap.parse_args()
    if a.phases:
        return phases(a)
    variants = {v: variant_kwargs(v) for v in a.variants.split(",") if v}
    bw = read_bandwidth_gbs()
    print(f"# {stamp()}; read bandwidth {bw:.0f} GB/s", flush=True)
    H, KV, hd = a.heads, a.kv_heads, a.head_dim
    header = ["KV heads", "batch", "context", "cluster x splits", "floor µs", "torch eager µs", "torch graph µs",
              "cf_cute µs", "GB/s", "% of floor", "vs torch graph"] + [f"{v} µs" for v in variants]
    rows = []
    for B in map(int, a.batch.split(",")):
        for ctx in map(int, a.context.split(",")):
            kv_bytes = 2 * B * ctx * KV * hd * 2
            n = max(2, math.ceil(3 * 60e6 / kv_bytes))           # three L2s' worth of caches
            sets = _sets(n, B, ctx, H, KV, hd)
            lengths = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
            outs = [torch.empty_like(q) for q, _, _ in sets]

            def torch_call(q, k, v):
                return torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), enable_gqa=KV != H)

            eager = 1e3 * time_ms(lambda: [torch_call(*s) for s in sets], reps=a.reps) / n
            graph = graph_us([lambda s=s: torch_call(*s) for s in sets], a.reps)

            def ours(**kw):
                return graph_us([lambda s=s, o=o: decode_attention(*s, lengths, out=o, **kw)
                                  for s, o in zip(sets, outs)], a.reps)

            t = ours()
            floor = (kv_bytes + 4 * B * H * hd) / (bw * 1e3)
            cfg = decode_attention_config(*sets[0], None, None)
            row = [KV, B, ctx, f"{cfg.cluster_size} x {cfg.splits}, {cfg.num_threads} thr", f"{floor:.1f}",
                   f"{eager:.1f}", f"{graph:.1f}", f"{t:.1f}", f"{kv_bytes / t / 1e3:.0f}", f"{100 * floor / t:.0f}%",
                   f"{graph / t:.2f}x"]
            row += [f"{ours(**kw):.1f}" for kw in variants.values()]
            print(" | ".join(map(str, row)), flush=True)
            rows.append(row)
            del sets, outs
            torch.cuda.empty_cache()
    print()
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
