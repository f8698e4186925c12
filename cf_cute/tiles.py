"""The ``"tiled"`` weight order that the GEMV core streams fastest (see
``cf_cute.fused.mma_gemv``), packed once from nn.Linear's row-major ``[M, K]``.

Same shape, dtype and device as the input; only the memory order changes::

    element (row, k), row = 16 t + 8 h + r, k = 32 s + 8 c + e
    offset = ((t * K/32 + s) * 2 + h) * 256 + (4 r + c) * 8 + e

i.e. the weight as ``[M/16, K/32, 2, 8, 4, 8]`` = ``(t, s, h, r, c, e)``: every
MMA step of a warp (16 rows x 32 columns, 1 KB in bf16) is one contiguous run,
with lane ``4 r + c`` reading bytes ``16 (4 r + c)`` of each 512-byte half.
A tiled tensor is not a usable ``[M, K]`` matrix for torch: :func:`untile_weight`
gives the nn.Linear order back. A ``[G, M, K]`` stack (the QKV weight per KV
head) is tiled as the ``[G * M, K]`` matrix, which is each group tiled in turn.
"""

from __future__ import annotations

import torch

from cf_cute.fused.mma_gemv import WEIGHT_LAYOUTS, check_weight_layout

__all__ = ["WEIGHT_LAYOUTS", "tile_weight", "untile_weight", "linear_weight", "stored_weight"]


def _check(w: torch.Tensor) -> tuple[int, int]:
    """(rows of all groups, K) of a ``[M, K]`` or ``[G, M, K]`` weight."""
    if w.dim() not in (2, 3):
        raise ValueError(f"a weight must be [M, K] or [G, M, K], got shape {tuple(w.shape)}")
    m, k = w.shape[-2:]
    if m % 16 or k % 32:
        raise ValueError(f"a tiled weight needs M % 16 == 0 and K % 32 == 0, got {m} x {k}")
    return w.numel() // k, k


def tile_weight(w: torch.Tensor) -> torch.Tensor:
    """nn.Linear ``[M, K]`` (or ``[G, M, K]``) -> the tiled order (a new contiguous
    tensor of the same shape)."""
    m, k = _check(w)
    return w.reshape(m // 16, 2, 8, k // 32, 4, 8).permute(0, 3, 1, 2, 4, 5).contiguous().view(w.shape)


def untile_weight(w: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`tile_weight`."""
    m, k = _check(w)
    if not w.is_contiguous():
        raise ValueError("a tiled weight must be contiguous")
    return w.view(m // 16, k // 32, 2, 8, 4, 8).permute(0, 2, 3, 1, 4, 5).contiguous().view(w.shape)


def linear_weight(w: torch.Tensor, layout: str) -> torch.Tensor:
    """``w`` in nn.Linear order, whichever of :data:`WEIGHT_LAYOUTS` it is stored in
    (a copy for ``"tiled"``)."""
    check_weight_layout(layout, "weight layout")
    return untile_weight(w) if layout == "tiled" else w


def stored_weight(w: torch.Tensor, layout: str) -> torch.Tensor:
    """nn.Linear-order ``w`` in the memory order ``layout`` (the inverse of
    :func:`linear_weight`; a copy for ``"tiled"``): what the ``pack_*`` functions store."""
    check_weight_layout(layout, "layout")
    return tile_weight(w) if layout == "tiled" else w
