"""Timing helpers shared by ``python -m cf_cute bench``, ``benchmarks/`` and the
runner: CUDA-event medians, the read bandwidth of this GPU, CUDA-graph capture."""

from __future__ import annotations

import statistics

import torch

__all__ = ["time_ms", "read_bandwidth_gbs", "capture_graph"]


def time_ms(fn, *, warmup: int = 3, reps: int = 15) -> float:
    """Median wall time of ``fn()`` on the current stream, in ms (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def read_bandwidth_gbs() -> float:
    """Read-only stream (sum of a 2 GiB bf16 tensor), GB/s."""
    x = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: x.sum(dtype=torch.float32), reps=20)
    del x
    return 2**31 / ms / 1e6


def capture_graph(fn):
    """``(graph, result)``: ``fn()`` run once on a side stream (compiles kernels,
    plans launches -- and really executes, so it must be safe to run), then
    captured into a CUDA graph whose replay recomputes ``result`` in place."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out
