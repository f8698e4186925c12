"""Torch-facing split-KV decode attention (``cf_cute.fused.decode_attention``).

STATUS: GPU-tested on an H100; the tensor-core path and the splits on an H200.

``decode_attention(q, k_cache, v_cache, lengths, page_table=None)`` returns
``o [B, heads, head_dim]``: request b attends to its first ``lengths[b]``
cached tokens (contiguous ``[B, max_len, kv_heads, hd]`` caches, or paged
``[num_pages, page_size, kv_heads, hd]`` with ``page_table [B, max_pages]``).
``lengths`` (and ``page_table``) given as CPU tensors are range-checked before
the launch and copied to the device; device tensors are used as they are
(no host synchronisation) and the kernel clamps them to the cache, so a bad
value cannot read outside the cache but gives wrong results.

The grid is chosen per batch and GPU (:func:`default_cluster_size`,
:func:`default_splits`, :func:`default_num_threads`). With ``splits > 1`` each
(request, KV head) spans several clusters whose results merge through a small
workspace (:func:`split_state`: fp32 partials and int32 arrival counters, one pair per
config and device, allocated on first use); calls that share it must not run
concurrently on different streams.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from cf_cute.fused.decode_attention import DecodeAttention, DecodeAttentionConfig, takes_tensor_cores
from cf_cute.jit import TensorSpec, compile_kernel
from cf_cute.validate import check_operands, check_tensor, dtype_name, host_index_checked, kv_cache_layout

__all__ = ["decode_attention", "decode_attention_config", "DecodeAttentionTuning", "default_cluster_size",
           "default_num_threads", "default_splits", "sm_count", "arg_specs", "split_state"]

_NAMES = ("q", "k_cache", "v_cache", "page_table", "lengths", "out")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (132 for anything else: the H100 SXM / H200 the defaults were tuned on)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def default_cluster_size(batch: int, num_kv_heads: int, sm_count: int = 132, *, tensor_cores: bool = False) -> int:
    """CTAs per (request, KV head): a power of two, measured alone on an H200 (Llama-2-7B and
    Llama-3-8B shapes, 1K / 4K / 16K; benchmarks/RESULTS.md, sessions 5 and 12).

    CUDA cores (MHA, 256 threads a CTA): one when the (request, KV head) pairs alone give
    every SM three CTAs (batch 16, 512 pairs: 75 µs at 1K against 96 with clusters of 4), else
    the smallest of 2, 4, 8 that gives about two CTAs an SM or more: batch 1 clusters of 8
    (256 CTAs), batch 2 of 4 (16K: 131.7 µs against 160.3 with 8), batch 3 of 4, batch 4 to 8
    of 2 (batch 4, 16K: 253.8 µs against 341.2 with one CTA a pair and 310.0 with 4).

    Tensor cores (GQA): clusters of 2 wherever the pairs' clusters of 2 fit one wave at one
    CTA an SM; :func:`default_splits` then gives each pair as many clusters as still fit and
    :func:`default_num_threads` 256 threads: 128 CTAs of eight warps from batch 1 to 8 with 8
    KV heads (H200, session 13, 16K: batch 1 26.7 µs against 34.7 with one cluster of 16,
    batch 2 42.6 against 52.9 with 8, batch 4 72.6 against 93.6 with 4; session 12: batch 8
    127.3, the floor, against 158.9 at 128 threads and 190.0 with 4). Above that, the largest
    power of two (16 at most) whose grid runs in one wave at two 128-thread CTAs an SM
    (:func:`_one_wave`): batch 16 clusters of 2 (243.1 against 306.1 with 1)."""
    pairs = batch * num_kv_heads
    if tensor_cores:
        if _one_wave(pairs * 2, 2, 1, sm_count):
            return 2
        return next(c for c in (16, 8, 4, 2, 1) if _one_wave(pairs * c, c, 2, sm_count) or c == 1)
    if pairs >= 3 * sm_count:
        return 1
    c = 2
    while c < 8 and 10 * pairs * c < 19 * sm_count:
        c *= 2
    return c


def default_splits(batch: int, num_kv_heads: int, cluster_size: int, sm_count: int = 132, *,
                   tensor_cores: bool = False) -> int:
    """Clusters a (request, KV head), merged through global memory (``last_arrival``). On
    tensor cores the largest power of two (16 at most) whose grid of ``cluster_size`` clusters
    still runs in one wave at one CTA an SM, so that :func:`default_num_threads` takes 256
    threads: fewer pairs than a wave holds would leave warps idle (H200, 8 KV heads, clusters
    of 2 at 256 threads, 1K / 4K / 16K: batch 1 with 8 splits 9.4 / 14.4 / 26.7 µs, 16 (two
    waves) slower; batch 2 with 4 splits 11.4 / 18.6 / 42.6, 8: 16.6 / 25.1 / 50.1; batch 4
    with 2 splits 14.4 / 27.0 / 72.6, 4: 20.2 / 34.1 / 79.2). 1 on CUDA cores (MHA, not
    measured with splits) and where the pairs fill a wave already."""
    if not tensor_cores:
        return 1
    pairs = batch * num_kv_heads
    s = 1
    while s < 16 and _one_wave(pairs * cluster_size * s * 2, cluster_size, 1, sm_count):
        s *= 2
    return s


def _one_wave(ctas: int, cluster_size: int, per_sm: int, sm_count: int) -> bool:
    """Whether ``ctas`` CTAs in clusters of ``cluster_size``, ``per_sm`` CTAs an SM, run in one
    wave: clusters of 4 or more live inside a GPC and leave about a tenth of the SMs without one
    (an H100 holds 30 clusters of 4 at one CTA an SM, 120 CTAs on 132 SMs)."""
    slots = per_sm * sm_count
    return ctas <= (slots if cluster_size <= 2 else 9 * slots // 10)


def default_num_threads(tensor_cores: bool, ctas: int | None = None, cluster_size: int = 1,
                        sm_count: int = 132) -> int:
    """Threads a CTA: on CUDA cores 256; on tensor cores 128 (about 200 registers a thread:
    two CTAs an SM), or 256 when the grid of ``ctas`` runs in one wave at one CTA an SM (twice
    the warps at the same residency: batch 8, 8 KV heads, clusters of 2, 16K 127.3 against
    158.9 µs, H200, session 12)."""
    if not tensor_cores:
        return 256
    return 256 if ctas is not None and _one_wave(ctas, cluster_size, 1, sm_count) else 128


@dataclass(frozen=True)
class DecodeAttentionTuning:
    """Knobs of :func:`decode_attention` that change speed, never results (see
    :class:`~cf_cute.fused.decode_attention.DecodeAttentionConfig`)."""
    tensor_cores: bool = True         # GQA (2 or more query heads a KV head) on tensor cores; MHA: CUDA cores
    num_threads: int | None = None    # threads a CTA (None: default_num_threads)
    mma_depth: int = 1                # tensor cores: 16-token steps of loads a warp keeps in flight
    splits: int | None = None         # clusters a (request, KV head) (None: default_splits)
    phase_timer: bool = False         # per-CTA phase stamps past the workspace (bench_decode_attention.py --phases)


def decode_attention_config(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            page_table: torch.Tensor | None, cluster_size: int | None,
                            tuning: DecodeAttentionTuning = DecodeAttentionTuning()) -> DecodeAttentionConfig:
    """The kernel config for these operands (meta tensors will do); ``cluster_size=None``,
    ``tuning.splits=None`` and ``tuning.num_threads=None`` take :func:`default_cluster_size`,
    :func:`default_splits` and :func:`default_num_threads` (in that order)."""
    check_tensor("q", q, dtype=(torch.bfloat16, torch.float16), shape=(None, None, None), cuda=False)
    B, heads, hd = q.shape
    check_tensor("k_cache", k_cache, dtype=q.dtype, shape=(None, None, None, hd), cuda=False)
    check_tensor("v_cache", v_cache, dtype=q.dtype, shape=tuple(k_cache.shape), cuda=False)
    kv_heads = k_cache.shape[2]
    tc = takes_tensor_cores(heads, kv_heads, tuning.tensor_cores)
    sms = sm_count(q.device)
    if cluster_size is None:
        cluster_size = default_cluster_size(B, kv_heads, sms, tensor_cores=tc)
    splits = tuning.splits or default_splits(B, kv_heads, cluster_size, sms, tensor_cores=tc)
    threads = tuning.num_threads or default_num_threads(tc, B * kv_heads * splits * cluster_size, cluster_size, sms)
    cfg = DecodeAttentionConfig(batch=B, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                                cluster_size=cluster_size, dtype=dtype_name(q.dtype), num_threads=threads,
                                tensor_cores=tuning.tensor_cores, mma_depth=tuning.mma_depth, splits=splits,
                                phase_timer=tuning.phase_timer,
                                **kv_cache_layout(k_cache, page_table, B))
    cfg.validate()
    return cfg


def arg_specs(cfg: DecodeAttentionConfig) -> list:
    """Fake-tensor specs of (q, k_cache, v_cache, page_table, lengths, out, work, counters)."""
    q = (cfg.batch, cfg.num_heads, cfg.head_dim)
    return [TensorSpec(cfg.dtype, q), TensorSpec(cfg.dtype, cfg.kv_shape), TensorSpec(cfg.dtype, cfg.kv_shape),
            TensorSpec("int32", cfg.table_shape, align=4), TensorSpec("int32", (cfg.batch,), align=4),
            TensorSpec(cfg.dtype, q), TensorSpec("float32", (cfg.work_elems,), align=4),
            TensorSpec("int32", (cfg.count_elems,), align=4)]


_split_states: dict = {}


def split_state(cfg: DecodeAttentionConfig, device) -> tuple:
    """The (partials, arrival counters) operands of ``cfg`` on ``device``: allocated (the
    counters zeroed) on first use and reused by every later call, CUDA-graph replays
    included (the last arrival resets its counter). One pair a config and device, so two
    launches of one config must not run concurrently on different streams. ``"cuda"`` means
    the current device, as for tensors (the same pair as ``"cuda:N"``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (cfg, device)
    st = _split_states.get(key)
    if st is None:
        st = _split_states.setdefault(key, (torch.empty(cfg.work_elems, dtype=torch.float32, device=device),
                                            torch.zeros(cfg.count_elems, dtype=torch.int32, device=device)))
    return st


@functools.lru_cache(maxsize=None)
def _kernel(cfg: DecodeAttentionConfig):
    return compile_kernel(DecodeAttention, cfg, arg_specs(cfg))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                     page_table: torch.Tensor | None = None, cluster_size: int | None = None,
                     out: torch.Tensor | None = None,
                     tuning: DecodeAttentionTuning = DecodeAttentionTuning()) -> torch.Tensor:
    """``cluster_size=None``: :func:`default_cluster_size` for this batch, KV-head
    count and GPU; ``tuning.splits=None``: :func:`default_splits` clusters a (request,
    KV head). GQA caches (2 or more query heads a KV head) take the tensor-core
    kernel (a warp a token stream) unless ``tuning.tensor_cores`` is off; MHA always the
    CUDA-core one."""
    cfg = decode_attention_config(q, k_cache, v_cache, page_table, cluster_size, tuning)
    check_tensor("lengths", lengths, dtype=torch.int32, shape=(cfg.batch,), cuda=False, align=4)
    lengths = host_index_checked(lengths, 1, cfg.max_len, "lengths", q.device)
    if page_table is None:
        page_table = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    else:
        page_table = host_index_checked(page_table, 0, cfg.num_pages - 1, "page_table entries", q.device)
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, dtype=q.dtype, shape=tuple(q.shape), cuda=False)
    check_operands(_NAMES, q, k_cache, v_cache, page_table, lengths, out, align=(16, 16, 16, 4, 4, 16))
    _kernel(cfg)(q, k_cache, v_cache, page_table, lengths, out, *split_state(cfg, q.device))
    return out
