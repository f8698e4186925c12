import os

import pytest

os.environ.setdefault("CUTE_DSL_DISABLE_FILE_CACHING", "1")


def _has_hopper() -> bool:
    try:
        import torch
        return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    except Exception:
        return False


HAS_GPU = _has_hopper()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an sm_90 GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run; the seed is printed on failure."""
    import random
    import torch
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def make_kv_cache(batch: int, max_len: int, kv_heads: int, head_dim: int, paged: bool,
                  device="cuda", dtype=None, page_size: int = 16, spare_pages: int = 5):
    """Random k and v caches, contiguous ``[B, L, kv, hd]`` or paged
    ``[pages, page_size, kv, hd]`` with a shuffled page table ``[B, L / page_size]``
    (int32, CPU) that leaves ``spare_pages`` pages unused; table is None when contiguous."""
    import torch
    dtype = dtype or torch.bfloat16
    if paged:
        n_pages = batch * max_len // page_size + spare_pages
        k = torch.randn(n_pages, page_size, kv_heads, head_dim, device=device, dtype=dtype)
        table = torch.randperm(n_pages)[: batch * (max_len // page_size)].view(batch, -1).int()
    else:
        k = torch.randn(batch, max_len, kv_heads, head_dim, device=device, dtype=dtype)
        table = None
    return k, torch.randn_like(k), table


def assert_replays_equal(graph, out, expect, times: int = 3):
    """Replay a captured CUDA graph ``times`` times with ``out`` poisoned (NaN)
    before each replay; every replay must rewrite ``out`` to exactly ``expect``."""
    import torch
    for _ in range(times):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)


def finish_or_exit(fn, seconds: float, what: str):
    """Run ``fn()`` (GPU launches) on a side stream and wait for it at most ``seconds``.
    A kernel that never finishes cannot be cancelled, and any later CUDA call of the
    process would wait for it forever: report the hang and end the process (exit 3)."""
    import os
    import sys
    import time
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
        done = torch.cuda.Event()
        done.record()
    t0 = time.time()
    while not done.query():
        if time.time() - t0 > seconds:
            sys.stderr.write(f"\nHANG: {what} did not finish in {seconds:.0f} s; ending the test process\n")
            sys.stderr.flush()
            os._exit(3)
        time.sleep(0.002)
    torch.cuda.current_stream().wait_stream(side)
    return out
