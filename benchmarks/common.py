"""Shared benchmark helpers: CUDA-event timing with warm-up and medians,
environment stamp (date, card, commit) for benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import subprocess

import torch

from cf_cute.timing import capture_graph, read_bandwidth_gbs, time_ms  # noqa: F401  (re-exported)


def stamp() -> str:
    """Date, card, commit (``CF_CUTE_COMMIT`` when git is not at hand, as on
    the device machine) and torch version, for RESULTS.md."""
    import os
    if os.environ.get("CF_CUTE_COMMIT"):
        commit = os.environ["CF_CUTE_COMMIT"]
    else:
        commit = _git_commit()
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{datetime.date.today().isoformat()}, {card}, commit {commit}, torch {torch.__version__}"


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False).stdout.strip()
        commit += "+dirty" if dirty else ""
    except OSError:
        commit = "unknown"
    return commit


RESULT_COLUMNS = ["floor µs", "torch eager µs", "torch graph µs", "cf_cute µs", "cf_cute GB/s", "% of floor",
                  "vs torch graph"]


def result_row(key: list, res: dict, name: str, nbytes: float, bw_gbs: float) -> list:
    """``key`` + the RESULT_COLUMNS of variant ``name`` of ``res`` (µs per call, with the
    'torch eager' and 'torch graph' baselines), for ``nbytes`` read at ``bw_gbs``;
    printed as it is made."""
    t, floor = res[name], nbytes / (bw_gbs * 1e3)
    row = key + [name, f"{floor:.1f}", f"{res['torch eager']:.1f}", f"{res['torch graph']:.1f}", f"{t:.1f}",
                 f"{nbytes / t / 1e3:.0f}", f"{100 * floor / t:.0f}%", f"{res['torch graph'] / t:.2f}x"]
    print(" | ".join(map(str, row)), flush=True)
    return row


def graph_us(calls: list, reps: int = 20) -> float:
    """µs per call: every call of ``calls`` in one CUDA graph, median of ``reps`` replays."""
    g, _ = capture_graph(lambda: [c() for c in calls])
    return 1e3 * time_ms(g.replay, reps=reps) / len(calls)


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def attention_sets(n: int, batch: int, ctx: int, *, heads: int = 32, kv_heads: int = 32, hidden: int = 4096,
                   head_dim: int = 128, dtype=None):
    """``n`` independent (weights, packed weights, k_cache, v_cache, hidden) sets for the
    attention block at ``ctx`` cached tokens (cache length ctx + 1), random and on the GPU,
    so that rotating them keeps L2 from holding the working set."""
    import math
    from cf_cute.attention import pack_attention
    from cf_cute.reference import AttentionWeights
    dev, dt, H, hd = "cuda", dtype or torch.bfloat16, hidden, head_dim
    s = 1 / math.sqrt(H)
    out = []
    for _ in range(n):
        w = AttentionWeights(norm=torch.ones(H, device=dev, dtype=dt),
                             wq=(torch.randn(heads * hd, H, device=dev) * s).to(dt),
                             wk=(torch.randn(kv_heads * hd, H, device=dev) * s).to(dt),
                             wv=(torch.randn(kv_heads * hd, H, device=dev) * s).to(dt),
                             wo=(torch.randn(H, heads * hd, device=dev) * s).to(dt))
        kc = torch.randn(batch, ctx + 1, kv_heads, hd, device=dev, dtype=dt)
        out.append((w, pack_attention(w, num_heads=heads, num_kv_heads=kv_heads), kc, torch.randn_like(kc),
                    torch.randn(batch, H, device=dev, dtype=dt)))
    return out
