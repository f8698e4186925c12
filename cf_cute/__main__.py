"""``python -m cf_cute [main|compile-all|bench]``

``main`` (the default): on a Hopper GPU, run the benchmarks (the fused
attention block on the Llama-2-7B shape with random weights against torch
eager and CUDA graphs, the cluster primitives against the global-memory
exchange, host overhead per call) and print their tables; without a GPU, compile every kernel of the
catalog for sm_90a, check the PTX for the cluster instructions the design
relies on, and say that no GPU was used.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _has_hopper() -> bool:
    try:
        import torch
        return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    except Exception:
        return False


def compile_all(verbose: bool = True) -> int:
    from cf_cute.catalog import REQUIRED_PTX, entries
    from cf_cute.jit import compile_for_inspection, dsl_version

    t0 = time.perf_counter()
    n, failures = 0, []
    for e in entries():
        t = time.perf_counter()
        try:
            ptx = compile_for_inspection(e.kernel_cls, e.cfg, e.args).__ptx__
            missing = [i for i in REQUIRED_PTX.get(e.ptx_kind, ()) if i not in ptx]
            if missing:
                failures.append(f"{e.name}: PTX lacks {', '.join(missing)}")
        except Exception as exc:          # report every entry, then fail
            failures.append(f"{e.name}: {type(exc).__name__}: {exc}")
        n += 1
        if verbose:
            print(f"  [{n:3d}] {e.name:55s} {time.perf_counter() - t:5.1f} s", flush=True)
    dt = time.perf_counter() - t0
    gpu = "a Hopper GPU is present" if _has_hopper() else "no GPU was used"
    print(f"compiled {n} kernels for sm_90a with nvidia-cutlass-dsl {dsl_version()} in {dt:.0f} s "
          f"({gpu}); PTX checked for mapa / st.async / cp.async.bulk / mbarrier / barrier.cluster")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


def bench(argv: list[str]) -> int:
    if not _has_hopper():
        print("bench needs a Hopper (sm_90) GPU; none found. `python -m cf_cute compile-all` "
              "builds every kernel for sm_90a without one.")
        return 2
    if not BENCH_DIR.is_dir():
        print(f"benchmarks/ not found next to the package ({BENCH_DIR}): run from a source checkout")
        return 2
    sys.path.insert(0, str(BENCH_DIR))
    rc = 0
    for script, default in (("bench_attention.py", ["--context", "1024,4096", "--batch", "1,16"]),
                            ("bench_primitives.py", []), ("bench_host_overhead.py", [])):
        print(f"== {script}", flush=True)
        sys.argv = [script] + (argv or default)
        try:
            runpy.run_path(str(BENCH_DIR / script), run_name="__main__")
        except SystemExit as e:
            rc = rc or int(e.code or 0)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cf_cute", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="main", choices=["main", "compile-all", "bench"])
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    os.environ.setdefault("CUTE_DSL_DISABLE_FILE_CACHING", "1")
    if a.command == "compile-all":
        return compile_all()
    if a.command == "bench":
        return bench(a.rest)
    if _has_hopper():
        return bench(a.rest)
    print("No Hopper GPU here: compiling every kernel for sm_90a instead of benchmarking.")
    return compile_all()


if __name__ == "__main__":
    raise SystemExit(main())
