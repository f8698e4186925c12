"""``python -m cf_cute [main|generate|bench|bench-kernels|compile-all]``

``main`` (the default): on a Hopper GPU, the fused decode benchmark of a
built-in Llama config with random weights (``bench --model llama-2-7b
--context 1024,4096 --batch 1``) against the torch CUDA-graph decode step;
without a GPU, compile every kernel of the catalog for sm_90a, check the PTX
for the cluster instructions the design relies on, and say that no GPU was used.

``generate --model PATH_OR_NAME --prompt TEXT --max-new-tokens N``: stream the
continuation (text with the checkpoint's tokenizer, token ids otherwise), then
ms/token and tokens/s. ``bench --model NAME --context ... --batch ...``: time
per output token against torch, floor, table and PNG plot. ``bench-kernels``:
the kernel benchmarks (attention block, primitives, host overhead).
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


def _need_gpu(what: str) -> bool:
    if _has_hopper():
        return True
    print(f"{what} needs a Hopper (sm_90) GPU; none found. `python -m cf_cute compile-all` builds every "
          f"kernel for sm_90a without one.")
    return False


def generate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m cf_cute generate")
    ap.add_argument("--model", required=True, help="checkpoint directory or built-in config name")
    ap.add_argument("--prompt", default="Hello", help="text (needs a tokenizer) or comma-separated token ids")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="copies of the prompt decoded together")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--max-len", type=int, default=None, help="KV cache length (default: prompt + new tokens)")
    a = ap.parse_args(argv)
    if not _need_gpu("generate"):
        return 2
    import torch
    from cf_cute.runner import LlamaModel, SamplingParams
    tok = None
    if Path(a.model).is_dir():
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(a.model)
        except Exception:                  # no tokenizer files: ids in, ids out
            tok = None
    if tok is not None:
        ids = tok(a.prompt)["input_ids"]
        stops = tuple(t for t in (tok.eos_token_id,) if t is not None)
    else:
        try:
            ids = [int(t) for t in a.prompt.split(",")]
        except ValueError:
            print("no tokenizer here: give the prompt as comma-separated token ids", file=sys.stderr)
            return 2
        stops = ()
    max_len = a.max_len or len(ids) + a.max_new_tokens + 1
    model = LlamaModel.from_pretrained(a.model, dtype=getattr(torch, a.dtype), max_batch=a.batch,
                                       max_len=max_len)
    if tok is not None:
        print(a.prompt, end="", flush=True)
    times = []

    def show(i, tokens):
        torch.cuda.synchronize()
        times.append(time.perf_counter())
        t = int(tokens[0])
        print(tok.decode([t]) if tok is not None else f" {t}", end="", flush=True)

    model.generate([list(ids)] * a.batch, max_new_tokens=2)          # compile kernels, capture the graph
    out = model.generate([list(ids)] * a.batch, max_new_tokens=a.max_new_tokens, stop_tokens=stops,
                         sampling=SamplingParams(a.temperature, a.top_k, a.top_p, a.seed), on_token=show)
    print()
    if len(times) > 1:
        ms = 1e3 * (times[-1] - times[0]) / (len(times) - 1)
        print(f"{len(out[0])} tokens; decode {ms:.2f} ms/token, {1e3 / ms * a.batch:.1f} tokens/s "
              f"(batch {a.batch}, after prefill)")
    return 0


def bench_model(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m cf_cute bench")
    ap.add_argument("--model", default="llama-2-7b", help="built-in config name (random weights) or checkpoint")
    ap.add_argument("--context", default="1024,4096,16384")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--plot", default="cf_cute_bench.png", help="PNG path ('' for none)")
    a = ap.parse_args(argv)
    if not _need_gpu("bench"):
        return 2
    from cf_cute.bench_model import run_bench, table
    rows = run_bench(a.model, [int(c) for c in a.context.split(",")], [int(b) for b in a.batch.split(",")],
                     plot=a.plot or None)
    from cf_cute.jit import dsl_version
    import torch
    print(f"\n{a.model} decode, random weights, bf16, {torch.cuda.get_device_name()}, read bandwidth "
          f"{rows[0]['bw']:.0f} GB/s, nvidia-cutlass-dsl {dsl_version()}:\n" if rows else "nothing ran")
    print(table(rows))
    return 0


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
    ap.add_argument("command", nargs="?", default="main",
                    choices=["main", "generate", "bench", "bench-kernels", "compile-all"])
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    os.environ.setdefault("CUTE_DSL_DISABLE_FILE_CACHING", "1")
    if a.command == "compile-all":
        return compile_all()
    if a.command == "bench-kernels":
        return bench(a.rest)
    if a.command == "bench":
        return bench_model(a.rest)
    if a.command == "generate":
        return generate(a.rest)
    if _has_hopper():
        return bench_model(a.rest or ["--model", "llama-2-7b", "--context", "1024,4096", "--batch", "1"])
    print("No Hopper GPU here: compiling every kernel for sm_90a instead of benchmarking.")
    return compile_all()


if __name__ == "__main__":
    raise SystemExit(main())
