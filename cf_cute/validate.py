"""Input checks run before any launch: a bad argument raises here, with the
argument's name, and nothing is written anywhere."""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["check_tensor", "check_operands", "host_index_checked", "kv_cache_layout", "DTYPES", "dtype_name"]

DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
          torch.int32: "int32", torch.int64: "int64"}


def dtype_name(dt: torch.dtype) -> str:
    try:
        return DTYPES[dt]
    except KeyError:
        raise TypeError(f"unsupported dtype {dt}") from None


def check_tensor(name: str, t, *, dtype: torch.dtype | Iterable[torch.dtype] | None = None,
                 shape: tuple | None = None, align: int = 16, cuda: bool = True,
                 contiguous: bool = True) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming ``name`` unless ``t`` is a
    tensor of the given dtype(s) and shape (``None`` entries are free), on a
    CUDA device (when ``cuda``), row-major contiguous, its data pointer
    aligned to ``align`` bytes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if cuda and t.device.type != "cuda":
        raise ValueError(f"{name} must be on a CUDA device, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()}")
    if align and t.data_ptr() % align:
        raise ValueError(f"{name}'s data pointer must be {align}-byte aligned")


def check_operands(names: tuple, *tensors, align: int | tuple = 16) -> None:
    """The per-call checks that a cached shape/dtype check cannot cover: every
    tensor contiguous, aligned (``align`` bytes, or one alignment per tensor),
    on the same CUDA device as the first. Built for the launch path (about
    0.4 µs a tensor); the precise error is worked out only when a check fails."""
    aligns = align if isinstance(align, tuple) else (align,) * len(tensors)
    dev = tensors[0].get_device()
    for t, a in zip(tensors, aligns):
        if not t.is_contiguous() or t.data_ptr() % a or t.get_device() != dev:
            _explain(names, tensors, aligns)
    if dev < 0:
        raise ValueError(f"operands must be on a CUDA device, got {tensors[0].device}")


def _explain(names: tuple, tensors: tuple, aligns: tuple) -> None:
    device = tensors[0].device
    for name, t, a in zip(names, tensors, aligns):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()}")
        if t.data_ptr() % a:
            raise ValueError(f"{name}'s data pointer must be {a}-byte aligned")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} like {names[0]}")


def host_index_checked(t: torch.Tensor, lo: int, hi: int, what: str, device, note: str = "") -> torch.Tensor:
    """An index tensor (positions, lengths, page table) on the CPU is range-checked
    against ``[lo, hi]`` before any launch, then moved to ``device`` without a
    sync; a tensor already on the GPU is returned as it is (checking it would
    need a host sync: the kernels clamp such indices to the cache instead)."""
    if t.device.type != "cpu":
        return t
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}]{note}, got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t.to(device, non_blocking=True)


def kv_cache_layout(k_cache: torch.Tensor, page_table, batch: int) -> dict:
    """The cache fields of an attention config (``max_len``, ``paged``,
    ``page_size``, ``num_pages``) for a contiguous ``[B, max_len, kv_heads, hd]``
    cache (``page_table is None``) or a paged ``[pages, page_size, kv_heads, hd]``
    one with ``page_table [B, max_pages]`` (int32)."""
    if page_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"contiguous k_cache must be [B={batch}, max_len, kv_heads, hd], "
                             f"got {list(k_cache.shape)}")
        return dict(max_len=k_cache.shape[1])
    check_tensor("page_table", page_table, dtype=torch.int32, shape=(batch, None), cuda=False, align=4)
    return dict(max_len=page_table.shape[1] * k_cache.shape[1], paged=True, page_size=k_cache.shape[1],
                num_pages=k_cache.shape[0])
