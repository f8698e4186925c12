"""What a launch costs before any work: an empty kernel (``LaunchProbeKernel``) of a given
grid and cluster size, replayed back to back in one CUDA graph, against the same grid
with a cluster barrier at its start and end (a cluster collective's set-up and
teardown), and torch's smallest kernel. Every fused kernel here pays this once a launch;
compare it with a kernel's time at tiny sizes (e.g. decode attention at context 16).

    python benchmarks/bench_launch.py [--ctas 128,132,256] [--clusters 1,2,4,8,16] [--threads 256]

µs per launch: 20 launches of one variant in one CUDA graph, median of 30 replays.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import graph_us, markdown_table, stamp  # noqa: E402

from cf_cute.collective_kernels import LaunchProbeConfig, LaunchProbeKernel  # noqa: E402
from cf_cute.jit import TensorSpec, compile_kernel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctas", default="128,256")
    ap.add_argument("--clusters", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=256)
    a = ap.parse_args(argv)
    rows = []
    small = torch.zeros(1, device="cuda")
    torch_us = graph_us([lambda: small.add_(1.0)] * 20, reps=30)
    for n in (int(c) for c in a.ctas.split(",")):
        for c in (int(c) for c in a.clusters.split(",")):
            if n % c:
                continue
            out = torch.empty(n, dtype=torch.int32, device="cuda")
            row = [n, c, a.threads]
            for sync in (False, True):
                cfg = LaunchProbeConfig(num_ctas=n, cluster_size=c, num_threads=a.threads, cluster_sync=sync)
                fn = compile_kernel(LaunchProbeKernel, cfg, [TensorSpec("int32", (n,), align=4)])
                out.fill_(-1)
                fn(out)
                torch.cuda.synchronize()
                assert torch.equal(out.cpu(), torch.arange(n, dtype=torch.int32)), "a CTA did not run"
                row.append(f"{graph_us([lambda: fn(out)] * 20, reps=30):.2f}")
            rows.append(row + [f"{torch_us:.2f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print(f"\nEmpty launches in a CUDA graph, µs each ({stamp()}):\n")
    print(markdown_table(["CTAs", "cluster", "threads", "empty", "cluster barriers", "torch add_ (1 elem)"],
                         rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
