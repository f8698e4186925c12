"""Host time per call: raw TVM-FFI function, the checked torch wrapper, and
the torch.library custom op, on a small split-K GEMV (its GPU time is far
under the host time, so the host is what is measured).

    python benchmarks/bench_host_overhead.py
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from cf_cute.gemv import _kernel, splitk_gemv, splitk_gemv_config

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import markdown_table, stamp  # noqa: E402


def host_us(fn, calls: int = 200, batches: int = 15) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda.synchronize()
    return statistics.median(per)


def main() -> int:
    w = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, 256, device="cuda", dtype=torch.bfloat16)
    raw = _kernel(splitk_gemv_config(x, w, 4, 64))
    rows = [
        ["raw TVM-FFI call", f"{host_us(lambda: raw(x, w, out, out)):.1f}"],
        ["cf_cute.gemv.splitk_gemv (checks + cache lookup), out given",
         f"{host_us(lambda: splitk_gemv(x, w, out=out)):.1f}"],
        ["torch.ops.cf_cute.splitk_gemv (custom op, allocates out)",
         f"{host_us(lambda: torch.ops.cf_cute.splitk_gemv(x, w, 4, 64)):.1f}"],
        ["torch.matmul (reference point)", f"{host_us(lambda: torch.matmul(x, w.T)):.1f}"],
    ]
    print(f"Host overhead per call ({stamp()}):\n")
    print(markdown_table(["path", "host µs/call"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
