"""Registers and stack (spills) of every kernel in a cf_cute disk cache, read on any machine
(no GPU): each cache entry (``<dir>/<DSL version>/<digest>.o``) embeds the kernel's cubin,
which ``cuobjdump -res-usage`` reads. Check this before tuning a load pipeline: the MLP's
``unroll = 8`` spilled 224-472 bytes at Llama-3-8B's shape and cost 7-11% (docs/NOTES.md,
session 14).

    CF_CUTE_CACHE_DIR=/tmp/cache python benchmarks/prebuild.py --only mlp --batch 1
    python benchmarks/res_usage.py /tmp/cache [--spills]

Needs ``cuobjdump`` on PATH or from pip (``pip install nvidia-cuda-cuobjdump``). Prints one line
a kernel: registers, stack bytes, entry digest, kernel class; ``--spills``: only those with a stack.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia
        for root in nvidia.__path__:
            for path in glob.glob(os.path.join(root, "*", "bin", "cuobjdump")):
                return path
    except ImportError:
        pass
    raise SystemExit("cuobjdump not found: pip install nvidia-cuda-cuobjdump (or put the CUDA toolkit on PATH)")


def usage(entry: str, tool: str) -> list[tuple[str, int, int]]:
    """(kernel, registers, stack bytes) of each cubin embedded in a cache entry."""
    data = open(entry, "rb").read()
    out = []
    for start in [m.start() for m in re.finditer(b"\x7fELF", data)][1:]:     # the first ELF is the host object
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as t:
            t.write(data[start:])
        try:
            text = subprocess.run([tool, "-res-usage", t.name], capture_output=True, text=True).stdout
        finally:
            os.unlink(t.name)
        name = None
        for line in text.splitlines():
            if "Function" in line:
                name = line.split("Function", 1)[1].strip().rstrip(":")
            m = re.search(r"REG:(\d+) STACK:(\d+)", line)
            if m and name:
                out.append((name, int(m.group(1)), int(m.group(2))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache_dir", nargs="?", default=os.environ.get("CF_CUTE_CACHE_DIR"))
    ap.add_argument("--spills", action="store_true", help="only kernels with a stack")
    a = ap.parse_args(argv)
    if not a.cache_dir:
        ap.error("give a cache directory (or set CF_CUTE_CACHE_DIR)")
    tool = cuobjdump()
    entries = sorted(glob.glob(os.path.join(a.cache_dir, "*", "*.o")))
    if not entries:
        raise SystemExit(f"no cache entries under {a.cache_dir}")
    for entry in entries:
        for name, regs, stack in usage(entry, tool):
            if stack or not a.spills:
                cls = re.search(r"kernel_cf_cute\w*?([A-Z]\w*?)_object", name)
                print(f"{regs:4d} regs {stack:5d} B stack  {os.path.basename(entry)[:12]}  "
                      f"{cls.group(1) if cls else name[:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
