"""Where the time of the fused attention and MLP blocks goes: per-phase durations
from ``%globaltimer`` stamps that the kernels write when built with
``AttentionTuning(phase_timer=True)`` / ``MLPTuning(phase_timer=True)`` (thread 0
of every CTA; six points in the MLP, nine in the attention block).

    python benchmarks/bench_phases.py [--context 1024,16384] [--batch 1]
    python benchmarks/bench_phases.py --block mlp [--batch 1,16]

MLP phases: norm; gate_up = the split-K GEMV of phase A; reduce = the cluster
reduce-scatter and SiLU; wait = the grid barrier; down = phase B.

Phases (per CTA, ns; "median" and "max" over the CTAs, then the median over
launches of rotating weight/KV sets): norm = the RMSNorm front (with its cluster
round); gemv = warp 0's share of the QKV GEMV; qkv_red = the CTA barrier (the other
warps) and the cluster all-reduce of the QKV partials; rope_append = RoPE and the KV
append (two CTA barriers); attend = thread 0's attention loop (the CTA's share of
the tokens, warp 0's stream); stash = the rest of the CTA's warps, their merge and
the copy out; gather = the cluster gather of (m, l), i.e. waiting for the cluster's
slowest CTA; weights = each (request, head)'s merge weight and a CTA barrier; o_red =
the o reduce-scatter ("grid") or all-reduce ("head"); o_out = the copy out and the
barriers; wait = the grid barrier; o_proj = phase B.
"span" is the launch from the first CTA's start to the last CTA's end.
Timer reads cost a few ns; the stamps are for attribution, the benchmark of
record is bench_attention.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch

from cf_cute.attention import AttentionTuning, attention_block
from cf_cute.mlp import MLPTuning
from cf_cute.primitives import GridBarrier
from cf_cute.reference import rope_tables

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import attention_sets, markdown_table, stamp  # noqa: E402

# (phase names, the stamp indices that bound them in time order: phase i runs from stamp
# order[i] to stamp order[i + 1]; AttentionBlockConfig.phase_timer / MLPBlockConfig.phase_timer)
PHASES = ("norm", "gemv", "qkv_red", "rope_append", "attend", "stash", "gather", "weights", "o_red", "o_out", "wait",
          "o_proj")
ATTN_ORDER = (0, 9, 10, 1, 6, 7, 2, 8, 11, 12, 3, 4, 5)
MLP_PHASES = ("norm", "gate_up", "reduce", "wait", "down")
MLP_ORDER = (0, 1, 2, 3, 4, 5)


def stamp_words(barrier: torch.Tensor, grid: int) -> torch.Tensor:
    """The stamp words of a ``grid``-CTA launch as [CTA, STAMP_WORDS] (the state may go on past them:
    the MLP's tail counters and partials)."""
    W = GridBarrier.STAMP_WORDS
    return barrier[GridBarrier.STATE_WORDS:GridBarrier.STATE_WORDS + W * grid].view(grid, W)


def record(barrier: torch.Tensor, grid: int, per: dict, spans: list, names, order) -> None:
    """Add one launch's stamps (``stamp_words``, taken in ``order``) to ``per[name] =
    (medians, maxima)`` over the CTAs and its span to ``spans``."""
    record_stamps(stamp_words(barrier, grid)[:, list(order)], per, spans, names)


def record_stamps(t: torch.Tensor, per: dict, spans: list, names) -> None:
    """:func:`record` for stamps already in time order, ``t [CTA, len(names) + 1]`` (int32
    ``%globaltimer_lo`` values, any kernel's)."""
    t = t.to(torch.int64).cpu()
    t = (t - t[:, :1].min()) % 2**32                 # globaltimer_lo wraps: differences only
    d = t[:, 1:] - t[:, :-1]
    for k, name in enumerate(names):
        per[name][0].append(float(d[:, k].float().median()))
        per[name][1].append(float(d[:, k].max()))
    spans.append(float(t[:, -1].max() - t[:, 0].min()))


def placement(barrier: torch.Tensor, grid: int, place: list) -> None:
    """Add one launch's CTA placement to ``place``: (SMs used, SMs holding two or more
    CTAs, median first-phase time of CTAs sharing an SM, of CTAs alone on theirs), from
    the ``%smid`` that stamp 0 writes (``GridBarrier.SMID_WORD``)."""
    w = stamp_words(barrier, grid).to(torch.int64).cpu()
    sm = w[:, GridBarrier.SMID_WORD]
    d = (w[:, 1] - w[:, 0]) % 2**32
    ids, inverse, counts = torch.unique(sm, return_inverse=True, return_counts=True)
    shared = counts[inverse] > 1
    med = lambda m: float(d[m].float().median()) if bool(m.any()) else float("nan")  # noqa: E731
    place.append((len(ids), int((counts > 1).sum()), med(shared), med(~shared)))


def placement_row(key: list, place: list) -> list:
    cols = list(zip(*place))
    row = key + [f"{statistics.median(cols[0]):.0f}", f"{statistics.median(cols[1]):.0f}",
                 f"{statistics.median(cols[2]) / 1e3:.1f}", f"{statistics.median(cols[3]) / 1e3:.1f}"]
    print("placement:", " | ".join(map(str, row)), flush=True)
    return row


def summary(key: list, per: dict, spans: list, names, digits: int = 1) -> list:
    f = f".{digits}f"
    row = key + [f"{statistics.median(per[n][0]) / 1e3:{f}} / {statistics.median(per[n][1]) / 1e3:{f}}"
                 for n in names] + [f"{statistics.median(spans) / 1e3:{f}}"]
    print(" | ".join(map(str, row)), flush=True)
    return row


def mlp_main(a) -> int:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_layer import mlp_sets, variant_tuning
    from cf_cute.mlp import MLPWorkspace, mlp_block, planned_config
    rows = []
    for batch in (int(b) for b in a.batch.split(",")):
        sets = mlp_sets(a.sets, batch, a.hidden, a.intermediate)
        tuning = dataclasses.replace(variant_tuning(a.variant)[1] if a.variant else MLPTuning(), phase_timer=True,
                                     unroll=a.unroll)
        cfg = planned_config(sets[0][1], sets[0][0], tuning=tuning)
        ws = MLPWorkspace.new(cfg, "cuda")
        per = {p: ([], []) for p in MLP_PHASES}
        spans = []
        for i in range(a.launches + 3):
            p, hidden, _ = sets[i % len(sets)]
            mlp_block(hidden, p, tuning=tuning, workspace=ws)
            torch.cuda.synchronize()
            if i >= 3:
                record(ws.barrier, cfg.grid, per, spans, MLP_PHASES, MLP_ORDER)
        rows.append(summary([batch, f"{cfg.num_clusters}x{cfg.cluster_size}"], per, spans, MLP_PHASES))
    print(f"\nFused MLP block phases, µs (median / max over CTAs), hidden {a.hidden}, intermediate "
          f"{a.intermediate}, bf16{', variant ' + a.variant if a.variant else ''} ({stamp()}):\n")
    print(markdown_table(["batch", "grid"] + list(MLP_PHASES) + ["span"], rows))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="1024,16384")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--launches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per CTA (AttentionTuning.num_threads; default: the variant's or the block's)")
    ap.add_argument("--cluster-size", type=int, default=None, help="attention only (default: the planner's)")
    ap.add_argument("--variant", default="",
                    help="a tuning variant: of bench_attention.py, or with --block mlp of bench_layer.py")
    ap.add_argument("--block", choices=["attention", "mlp"], default="attention")
    ap.add_argument("--heads", type=int, default=32, help="attention only (GQA: --kv-heads 8)")
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008, help="MLP only (Llama-3-8B: 14336)")
    ap.add_argument("--unroll", type=int, default=4,
                    help="MLP only: loads in flight per warp. At batch 1 the stamped build with unroll 8 spills "
                         "past the 255-register cap and hangs on the H200 (docs/NOTES.md); 4 measures the same "
                         "speed without stamps")
    a = ap.parse_args(argv)
    if a.block == "mlp":
        return mlp_main(a)
    dev, dt, H, heads, kv_heads = "cuda", torch.bfloat16, a.hidden, a.heads, a.kv_heads
    hd = H // heads                                   # the Llama shapes: hidden = heads x head_dim
    threads = {} if a.threads is None else dict(num_threads=a.threads)
    tuning = AttentionTuning(phase_timer=True, **threads)
    if a.variant:
        from bench_attention import VARIANTS
        tuning = dataclasses.replace(VARIANTS[a.variant], phase_timer=True, **threads)
    rows, places = [], []
    for batch in (int(b) for b in a.batch.split(",")):
        for ctx in (int(c) for c in a.context.split(",")):
            L = ctx + 1
            cos, sin = (t.to(dev) for t in rope_tables(L, hd, 10000.0))
            positions = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
            sets = [it[1:] for it in attention_sets(a.sets, batch, ctx, heads=heads, kv_heads=kv_heads, hidden=H,
                                                    head_dim=hd)]
            ws = None
            per = {p: ([], []) for p in PHASES}
            spans, place = [], []
            for i in range(a.launches + 3):
                p, kc, vc, hidden = sets[i % len(sets)]
                if ws is None:
                    attention_block(hidden, p, kc, vc, positions, cos, sin, tuning=tuning,
                                    cluster_size=a.cluster_size)   # builds the workspace
                    from cf_cute.attention import _workspaces
                    wcfg, ws = next((k[0], v) for k, v in _workspaces.items()
                                    if k[0].phase_timer and tuning.num_threads in (None, k[0].num_threads)
                                    and k[0].max_len == L)
                    print(f"threads per CTA: {wcfg.num_threads}", flush=True)
                attention_block(hidden, p, kc, vc, positions, cos, sin, tuning=tuning, workspace=ws,
                                cluster_size=a.cluster_size)
                torch.cuda.synchronize()
                if i < 3:
                    continue
                record(ws.barrier, wcfg.grid, per, spans, PHASES, ATTN_ORDER)
                placement(ws.barrier, wcfg.grid, place)
            rows.append(summary([batch, ctx], per, spans, PHASES))
            places.append(placement_row([batch, ctx], place))
    print(f"\nFused attention block phases, µs (median / max over CTAs), H={H}, {heads}/{kv_heads} heads x {hd}, "
          f"bf16{', variant ' + a.variant if a.variant else ''} ({stamp()}):\n")
    print(markdown_table(["batch", "context"] + list(PHASES) + ["span"], rows))
    print("\nPlacement (median over launches): SMs holding a CTA, SMs holding two or more, median qkv µs of "
          "CTAs sharing an SM / alone:\n")
    print(markdown_table(["batch", "context", "SMs", "shared SMs", "qkv shared", "qkv alone"], places))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
