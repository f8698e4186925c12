"""Torch-facing split-K GEMV (the composition example): ``y = x @ w.T``.

``splitk_gemv`` checks its inputs, fetches the compiled kernel from the cache
and launches it on the current stream. ``torch.ops.cf_cute.splitk_gemv`` is
the same thing as a torch.library custom op (fake implementation included),
so it traces under ``torch.compile`` and records into CUDA graphs.
"""

from __future__ import annotations

import functools

import torch

from cf_cute.fused.splitk_gemv import SplitKGemv, SplitKGemvConfig
from cf_cute.jit import TensorSpec, compile_kernel
from cf_cute.validate import check_operands, check_tensor, dtype_name

__all__ = ["splitk_gemv", "splitk_gemv_config", "arg_specs"]


def splitk_gemv_config(x: torch.Tensor, w: torch.Tensor, cluster_size: int = 4,
                       block_m: int = 128, residual: bool = False, layout: str = "linear") -> SplitKGemvConfig:
    """The static configuration for these operands (checks dtypes and shapes);
    ``layout`` is ``w``'s memory order (``"tiled"``: :func:`cf_cute.tiles.tile_weight`)."""
    check_tensor("w", w, dtype=(torch.bfloat16, torch.float16), shape=(None, None), cuda=False)
    check_tensor("x", x, dtype=w.dtype, shape=(None, w.shape[1]), cuda=False)
    cfg = SplitKGemvConfig(m=w.shape[0], k=w.shape[1], batch=x.shape[0], cluster_size=cluster_size,
                           block_m=block_m, dtype=dtype_name(w.dtype), residual=residual, w_layout=layout)
    cfg.validate()
    return cfg


@functools.lru_cache(maxsize=None)
def _kernel(cfg: SplitKGemvConfig):
    return compile_kernel(SplitKGemv, cfg, arg_specs(cfg))


def arg_specs(cfg: SplitKGemvConfig) -> list:
    """Fake-tensor specs of (x, w, residual, y)."""
    return [TensorSpec(cfg.dtype, (cfg.batch, cfg.k)), TensorSpec(cfg.dtype, (cfg.m, cfg.k)),
            TensorSpec(cfg.dtype, (cfg.batch, cfg.m)), TensorSpec(cfg.dtype, (cfg.batch, cfg.m))]


_launch_cache: dict = {}
_NAMES = ("w", "x", "residual", "out")


def splitk_gemv(x: torch.Tensor, w: torch.Tensor, *, residual: torch.Tensor | None = None,
                cluster_size: int = 4, block_m: int = 128, out: torch.Tensor | None = None,
                layout: str = "linear") -> torch.Tensor:
    """``x [B, K] @ w [M, K].T (+ residual [B, M]) -> [B, M]`` (bf16/fp16, fp32
    accumulation), K split over a cluster of ``cluster_size`` CTAs and reduced
    over DSMEM. ``layout``: ``w`` in nn.Linear order or tiled (:mod:`cf_cute.tiles`).
    Launches on the current stream; no host synchronisation."""
    has_res = residual is not None
    key = (x.shape, w.shape, x.dtype, w.dtype, cluster_size, block_m, has_res, layout)
    entry = _launch_cache.get(key)
    if entry is None:                      # first call for these shapes: full checks
        cfg = splitk_gemv_config(x, w, cluster_size, block_m, has_res, layout)
        entry = _launch_cache.setdefault(key, (cfg, _kernel(cfg)))
    cfg, fn = entry
    if out is None:
        out = torch.empty(cfg.batch, cfg.m, dtype=w.dtype, device=w.device)
    elif out.shape != (cfg.batch, cfg.m) or out.dtype != w.dtype:
        raise ValueError(f"out must be {str(w.dtype)[6:]} of shape [{cfg.batch}, {cfg.m}], "
                         f"got {str(out.dtype)[6:]} {list(out.shape)}")
    if has_res and (residual.shape != out.shape or residual.dtype != w.dtype):
        raise ValueError(f"residual must be {str(w.dtype)[6:]} of shape [{cfg.batch}, {cfg.m}], "
                         f"got {str(residual.dtype)[6:]} {list(residual.shape)}")
    r = residual if has_res else out
    check_operands(_NAMES, w, x, r, out)
    fn(x, w, r, out)
    return out


@torch.library.custom_op("cf_cute::splitk_gemv", mutates_args=())
def _splitk_gemv_op(x: torch.Tensor, w: torch.Tensor, cluster_size: int, block_m: int,
                    layout: str = "linear") -> torch.Tensor:
    return splitk_gemv(x, w, cluster_size=cluster_size, block_m=block_m, layout=layout)


@_splitk_gemv_op.register_fake
def _(x, w, cluster_size, block_m, layout="linear"):
    return x.new_empty(x.shape[0], w.shape[0])
