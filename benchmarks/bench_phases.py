"""Where the time of the fused attention block goes: per-phase durations from
``%globaltimer`` stamps that the kernel writes when built with
``AttentionTuning(phase_timer=True)`` (thread 0 of every CTA, six points).

    python benchmarks/bench_phases.py [--context 1024,16384] [--batch 1]

Phases (per CTA, ns; "median" and "max" over the CTAs, then the median over
launches of rotating weight/KV sets): qkv = norm + QKV GEMV + its cluster
reduce; attn = RoPE, KV append and the CTA's share of the attention; merge =
the cluster merge of the attention partials; wait = the grid barrier; o_proj =
phase B. "span" is the launch from the first CTA's start to the last CTA's end.
Timer reads cost a few ns; the stamps are for attribution, the benchmark of
record is bench_attention.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from cf_cute.attention import AttentionTuning, attention_block
from cf_cute.reference import rope_tables

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import attention_sets, markdown_table, stamp  # noqa: E402

PHASES = ("qkv", "attn", "merge", "wait", "o_proj")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="1024,16384")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--launches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=256, help="threads per CTA (AttentionTuning.num_threads)")
    a = ap.parse_args(argv)
    dev, dt, H, heads, hd = "cuda", torch.bfloat16, 4096, 32, 128
    tuning = AttentionTuning(phase_timer=True, num_threads=a.threads)
    rows = []
    print(f"threads per CTA: {a.threads}", flush=True)
    for batch in (int(b) for b in a.batch.split(",")):
        for ctx in (int(c) for c in a.context.split(",")):
            L = ctx + 1
            cos, sin = (t.to(dev) for t in rope_tables(L, hd, 10000.0))
            positions = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
            sets = [it[1:] for it in attention_sets(a.sets, batch, ctx, heads=heads, kv_heads=heads, hidden=H,
                                                    head_dim=hd)]
            ws = None
            per = {p: ([], []) for p in PHASES}
            spans = []
            for i in range(a.launches + 3):
                p, kc, vc, hidden = sets[i % len(sets)]
                if ws is None:
                    attention_block(hidden, p, kc, vc, positions, cos, sin, tuning=tuning)   # builds the workspace
                    from cf_cute.attention import _workspaces
                    ws = next(v for k, v in _workspaces.items()
                              if k[0].phase_timer and k[0].num_threads == a.threads and k[0].max_len == L)
                attention_block(hidden, p, kc, vc, positions, cos, sin, tuning=tuning, workspace=ws)
                torch.cuda.synchronize()
                if i < 3:
                    continue
                t = ws.barrier[2:].view(-1, 8)[:, :6].to(torch.int64).cpu()
                t = (t - t[:, :1].min()) % 2**32                 # globaltimer_lo wraps: differences only
                d = t[:, 1:6] - t[:, 0:5]
                for k, name in enumerate(PHASES):
                    per[name][0].append(float(d[:, k].float().median()))
                    per[name][1].append(float(d[:, k].max()))
                spans.append(float(t[:, 5].max() - t[:, 0].min()))
            row = [batch, ctx] + [f"{statistics.median(per[n][0]) / 1e3:.1f} / {statistics.median(per[n][1]) / 1e3:.1f}"
                                  for n in PHASES] + [f"{statistics.median(spans) / 1e3:.1f}"]
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
    print(f"\nFused attention block phases, µs (median / max over CTAs), Llama-2-7B shape, bf16 ({stamp()}):\n")
    print(markdown_table(["batch", "context"] + list(PHASES) + ["span"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
