"""The MLP half of a Llama decoder layer at decode time, from torch.

    packed = pack_mlp(MLPWeights(norm, w_gate, w_up, w_down))       # once
    out = mlp_block(hidden, packed, residual=None)

``out = h + down(silu(gate(x)) * up(x))``, ``x = rmsnorm(h)``, ``h = hidden (+
residual)``: one launch of ``cf_cute.fused.mlp_block`` (phase A: norm and the
gate/up projections split over clusters, a DSMEM reduce-scatter and SiLU into an
L2 scratch; a grid barrier; phase B: the down projection plus h).

``pack_mlp`` concatenates gate and up into one ``[2I, H]`` weight (vLLM's
merged layout; pass ``w_gate_up`` directly if you have it) and, by default,
reorders both weights into the GEMV core's tiled order (:mod:`cf_cute.tiles`:
the same results bit for bit, 8-11% faster on an H200; ``layout="linear"``
keeps nn.Linear order, which the kernel reads too). The launch needs its
grid resident at once (sized from the GPU on first use) and a small workspace
per (shape, device): the activation ``[B, I]`` and the grid barrier's state.
Calls sharing a workspace must not run concurrently on different streams.
``torch.ops.cf_cute.mlp_block(hidden, norm, w_gate_up, w_down, residual, eps, layout)``
is the same call as a custom op (fake implementation included) for torch.compile.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from fractions import Fraction

import torch

from cf_cute.fused.mlp_block import MLPBlock, MLPBlockConfig
from cf_cute.jit import TensorSpec, compile_kernel
from cf_cute.reference import MLPWeights
from cf_cute.tiles import stored_weight, untile_weight
from cf_cute.validate import check_operands, check_tensor, dtype_name

__all__ = ["PackedMLP", "pack_mlp", "linear_mlp", "mlp_block", "mlp_block_torch", "mlp_block_config",
           "MLPWorkspace", "MLPTuning", "arg_specs", "grid_plan", "default_unroll", "planned_config"]

# clusters of C resident at once at one CTA per SM on the H100 SXM (132 SMs) measured here
# (cuOccupancyMaxActiveClusters; a cluster lives in one GPC of 14-18 SMs): the plan
# without a GPU. With a GPU the plan asks the driver.
HOPPER_RESIDENT_CLUSTERS = {1: 132, 2: 66, 4: 30}

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MLPBlockConfig)}


@dataclass(frozen=True)
class MLPTuning:
    """Knobs that change speed, never results (defaults: :class:`MLPBlockConfig`'s).
    ``cluster_size`` / ``num_clusters`` None: chosen by :func:`grid_plan`."""
    cluster_size: int | None = None
    num_clusters: int | None = None
    unroll: int | None = None             # None: :func:`default_unroll` (8, or 4 where 8 spills)
    k_parts: int = _DEFAULTS["k_parts"]
    l2_prefetch: bool = _DEFAULTS["l2_prefetch"]
    pipeline: bool | None = None          # None: one load pipeline per warp up to batch 8 (measured)
    shared_x: bool | None = None          # None: phase B's tiles in lock-step up to batch 8 (measured)
    phase_timer: bool = False             # per-CTA phase stamps in workspace.barrier[2:] (bench_phases.py)
    num_threads: int = _DEFAULTS["num_threads"]
    pdl: bool = _DEFAULTS["pdl"]            # programmatic dependent launch (overlaps the previous kernel's tail)
    early_loads: bool | None = None       # None: phase A's first W loads before the norm front above batch 8
    early_phase_b: bool = _DEFAULTS["early_phase_b"]   # phase B's first W_down loads before the grid barrier
    tail_pieces: int | None = None        # None: ``tail_plan``; 0: the busiest clusters take the leftover units
                                          # (H200, Llama-2-7B, split vs not: batch 1 73.0 vs 74.6 µs, batch 4
                                          # 75.9 vs 76.8, batch 16 82.3 vs 83.2; only shapes with leftovers)


@dataclass
class PackedMLP:
    norm: torch.Tensor        # [H] (post_attention_layernorm)
    w_gate_up: torch.Tensor   # [2I, H]: gate rows then up rows
    w_down: torch.Tensor      # [H, I]
    eps: float = 1e-5
    layout: str = "linear"    # memory order of both weights: "linear" (nn.Linear) or "tiled" (cf_cute.tiles)

    @property
    def intermediate(self) -> int:
        return self.w_down.shape[1]


def pack_mlp(weights: MLPWeights, *, eps: float = 1e-5, layout: str = "tiled") -> PackedMLP:
    """One-time packing of nn.Linear-layout weights (same dtype and device);
    ``layout="tiled"`` (default) also reorders them for the GEMV core (:mod:`cf_cute.tiles`)."""
    return PackedMLP(norm=weights.norm.contiguous(),
                     w_gate_up=stored_weight(torch.cat([weights.w_gate, weights.w_up]), layout),
                     w_down=stored_weight(weights.w_down.contiguous(), layout), eps=eps, layout=layout)


def linear_mlp(packed: PackedMLP) -> PackedMLP:
    """``packed`` with both weights in nn.Linear order (copies when tiled), for torch paths."""
    if packed.layout == "linear":
        return packed
    return dataclasses.replace(packed, w_gate_up=untile_weight(packed.w_gate_up),
                               w_down=untile_weight(packed.w_down), layout="linear")


def mlp_block_torch(hidden: torch.Tensor, packed: PackedMLP) -> torch.Tensor:
    """The same block in plain torch, unfused (the baseline of the benchmarks and the
    runner's torch paths): RMSNorm, one gate+up matmul over ``w_gate_up``, SiLU * up,
    down + residual, in the activation dtype."""
    packed = linear_mlp(packed)         # tiled weights: copies (benchmarks pass a linear pack)
    x = torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), packed.norm, packed.eps)
    g, u = (x @ packed.w_gate_up.T).chunk(2, dim=-1)
    return hidden + (torch.nn.functional.silu(g) * u) @ packed.w_down.T


def grid_plan(units: int, resident: dict, hidden: int | None = None) -> tuple[int, int]:
    """(cluster_size, num_clusters) that minimises the busiest CTA's phase-A bytes,
    ``ceil(units / clusters) / C``, given ``resident[C]`` = clusters of C resident at
    once. Ties go to clusters of 1 up to ``hidden`` 3072, else to clusters of 2, then to the
    smaller cluster. H200, µs, C=2 against C=1 (benchmarks/RESULTS.md, session 16): Llama-3-8B's
    896 units give 7 a CTA at both, and C=2 took 90.0 against 125.2 at batch 1 (Llama-2-7B, no
    tie: 73.4 against 101.6): a whole row of K is a long pipeline a CTA. Llama-3.2-1B's 512
    units (4 a CTA at both) took 34.8 / 35.3 / 38.1 / 40.5 at batch 1 / 2 / 4 / 8 with C=2 and
    31.4 / 31.5 / 31.8 / 32.7 with C=1 (no cluster reduce-scatter), Llama-3.2-3B's 43.7 / 44.8 /
    46.5 / 49.9 against 43.0 / 43.8 / 44.8 / 46.6."""
    prefer = 1 if hidden is not None and hidden <= 3072 else 2
    best = None
    for c in sorted(resident):
        n = min(resident[c], units)
        if n < 1:
            continue
        key = (Fraction(-(-units // n), c), 0 if c == prefer else c)
        if best is None or key < best[0]:
            best = (key, c, n)
    if best is None:
        raise ValueError("no cluster size has a resident grid on this GPU")
    return best[1], best[2]


def default_unroll(cfg: MLPBlockConfig) -> int:
    """MMA steps of W loads in flight a warp (``MLPBlockConfig.unroll``): 4 at batch 1 and
    wherever phase A's load pipeline holds more than four tiles' accumulators
    (``4 * n_tiles * J / units_per_pass`` fp32 registers, > 16), else 8. With that many
    accumulators unroll 8 runs out of the 255 registers and spills (``cuobjdump -res-usage``:
    Llama-3-8B's 7 tiles 264 bytes of stack at batch 1; Llama-2-7B's 6 tiles none at batch 1,
    224 bytes at batch 4, 328 at 8); 4 tiles (Llama-3.2-1B and -3B) do not. H200, µs, unroll
    8 / 4, batch 1 / 2 / 4 / 8 (benchmarks/RESULTS.md, session 14): Llama-3-8B 97.8 / 91.0,
    99.7 / 95.2, 107.4 / 96.3, 107.2 / 95.9; Llama-2-7B 73.7 / 74.2, 77.6 / 76.6, 84.8 / 76.4,
    86.2 / 79.8; Llama-3.2-1B 36.6 / 34.9, 35.6 / 37.3, 37.1 / 39.6, 40.0 / 42.2; Llama-3.2-3B
    level at every batch (44.7 / 44.3 at batch 1). Without the pipeline (batch > 8) there is
    no such accumulator block, and 8 is faster (batch 16: 82.0 / 98.5 µs)."""
    tiles = cfg.units_per_cluster // cfg.units_per_pass
    return 4 if cfg.pipeline and (cfg.batch == 1 or 4 * cfg.n_tiles * tiles > 16) else 8


def tail_plan(units: int, num_clusters: int, units_per_pass: int, k_width: int) -> int:
    """Pieces P to cut each leftover unit into (``MLPBlockConfig.tail_pieces``), or 0.

    ``units % num_clusters`` units are left after the full rounds; without a tail split the
    clusters that take them run a whole extra pass (Llama-2-7B: 688 units over 66 clusters
    of 2, 28 clusters with 11, the others 10 and a pass of dummy slots). Cut in K into P
    pieces over every cluster's slots, they cost every cluster 1/P of a pass. The largest P
    that fits the slots (``num_clusters * units_per_pass``) and whole 32-column steps of a
    warp's K range ``k_width``; only when the full rounds fill whole passes and the busiest
    cluster saves at least a quarter of a pass."""
    jf, rem = divmod(units, num_clusters)
    if rem == 0 or jf < units_per_pass or jf % units_per_pass:
        return 0
    busiest = -(-units // num_clusters)
    passes_now = -(-busiest // units_per_pass)
    best = 0
    p = 1
    while rem * p <= num_clusters * units_per_pass and k_width % (32 * p) == 0:
        best = p
        p *= 2
    if best == 0 or passes_now - (jf / units_per_pass + 1 / best) < 0.25:
        return 0
    return best


def mlp_block_config(hidden: torch.Tensor, packed: PackedMLP, *, cluster_size: int, num_clusters: int,
                     has_residual: bool, tuning: MLPTuning | None = None) -> MLPBlockConfig:
    check_tensor("hidden", hidden, dtype=(torch.bfloat16, torch.float16), shape=(None, None), cuda=False)
    B, H = hidden.shape
    check_tensor("w_down", packed.w_down, dtype=hidden.dtype, shape=(H, None), cuda=False)
    I = packed.w_down.shape[1]
    check_tensor("w_gate_up", packed.w_gate_up, dtype=hidden.dtype, shape=(2 * I, H), cuda=False)
    check_tensor("norm", packed.norm, dtype=hidden.dtype, shape=(H,), cuda=False)
    knobs = dataclasses.asdict(tuning or MLPTuning())
    knobs.pop("cluster_size"), knobs.pop("num_clusters")
    if knobs["pipeline"] is None:       # H200, Llama-2-7B: batch 1 89 vs 106 µs, batch 16 163 vs 113 µs
        knobs["pipeline"] = B <= 8
    if knobs["early_loads"] is None:    # H200, Llama-2-7B: batch 16 96.1 vs 110.2 µs, batch 1 91.7 vs 88.9 µs
        knobs["early_loads"] = B > 8
    if knobs["shared_x"] is None:       # H200, Llama-2-7B: batch 1 88.6 vs 90.8 µs, batch 16 115.8 vs 110.9 µs
        knobs["shared_x"] = B <= 8
    if knobs["tail_pieces"] is None:
        kp = knobs["k_parts"]
        knobs["tail_pieces"] = tail_plan(I // 16, num_clusters, (knobs["num_threads"] // 32) // (2 * kp),
                                         H // cluster_size // kp) if H % (cluster_size * kp) == 0 else 0
    unroll = knobs.pop("unroll")
    cfg = MLPBlockConfig(batch=B, hidden=H, intermediate=I, num_clusters=num_clusters, cluster_size=cluster_size,
                         eps=packed.eps, has_residual=has_residual, dtype=dtype_name(hidden.dtype),
                         w_layout=packed.layout, **knobs)
    cfg = dataclasses.replace(cfg, unroll=default_unroll(cfg) if unroll is None else unroll)
    cfg.validate()
    return cfg


def arg_specs(cfg: MLPBlockConfig) -> list:
    """Fake-tensor specs of (hidden, residual, norm, w_gate_up, w_down, act, barrier, out)."""
    dt, B, H, I = cfg.dtype, cfg.batch, cfg.hidden, cfg.intermediate
    return [TensorSpec(dt, (B, H)), TensorSpec(dt, (B, H)), TensorSpec(dt, (H,)), TensorSpec(dt, (2 * I, H)),
            TensorSpec(dt, (H, I)), TensorSpec(dt, (B, I)),
            TensorSpec("int32", (cfg.state_words,), align=4), TensorSpec(dt, (B, H))]


@dataclass
class MLPWorkspace:
    """Scratch of one fused MLP launch: the SiLU product and the grid barrier
    (zeroed once; it resets itself)."""
    act: torch.Tensor
    barrier: torch.Tensor

    @classmethod
    def new(cls, cfg: MLPBlockConfig, device) -> "MLPWorkspace":
        dt = getattr(torch, cfg.dtype)
        return cls(act=torch.empty(cfg.batch, cfg.intermediate, dtype=dt, device=device),
                   barrier=torch.zeros(cfg.state_words, dtype=torch.int32,
                                       device=device))


@functools.lru_cache(maxsize=None)
def _kernel(cfg: MLPBlockConfig):
    return compile_kernel(MLPBlock, cfg, arg_specs(cfg))


@functools.lru_cache(maxsize=None)
def _resident(cluster_size: int, smem_bytes: int, num_threads: int, device_index: int) -> int:
    """Clusters resident at once at one CTA per SM (the kernel's registers allow no
    more: up to 255 a thread; the driver's probe kernel would allow several)."""
    from cf_cute.primitives import max_resident_clusters
    with torch.cuda.device(device_index):
        return max_resident_clusters(cluster_size, smem_bytes, num_threads, ctas_per_sm=1)


def _probe_block(hidden, packed, c: int, has_residual: bool, tuning) -> MLPBlock | None:
    """The kernel at cluster size c with as many clusters as could ever be useful
    (for its shared-memory size), or None when c does not apply."""
    try:
        units = packed.intermediate // 16
        return MLPBlock(mlp_block_config(hidden, packed, cluster_size=c, num_clusters=max(1, min(units, 132 // c)),
                                         has_residual=has_residual, tuning=tuning))
    except ValueError:
        return None


_launch: dict = {}


def _plan(hidden, packed: PackedMLP, has_residual: bool, tuning: MLPTuning | None, dev: int) -> MLPBlockConfig:
    tuning = tuning or MLPTuning()
    sizes = [tuning.cluster_size] if tuning.cluster_size else [1, 2, 4]
    resident = {}
    for c in sizes:
        block = _probe_block(hidden, packed, c, has_residual, tuning)
        if block is None:
            continue
        if tuning.num_clusters:
            resident[c] = tuning.num_clusters
        elif hidden.device.type == "cuda":
            resident[c] = _resident(c, block.smem_bytes, block.cfg.num_threads, dev)
        else:                           # planning without a GPU: the 132-SM Hopper measured here
            resident[c] = HOPPER_RESIDENT_CLUSTERS[c]
    if not resident:
        # surface the real reason with the smallest cluster
        mlp_block_config(hidden, packed, cluster_size=sizes[0], num_clusters=1, has_residual=has_residual,
                         tuning=tuning)
        raise ValueError("no cluster size gives a valid MLP block for these shapes")
    c, n = grid_plan(packed.intermediate // 16, resident, hidden.shape[1])
    cfg = mlp_block_config(hidden, packed, cluster_size=c, num_clusters=n, has_residual=has_residual,
                           tuning=tuning)
    block = MLPBlock(cfg)              # shared-memory check at the final grid
    if hidden.device.type == "cuda" and not tuning.num_clusters:
        got = _resident(c, block.smem_bytes, cfg.num_threads, dev)
        if got < n:
            raise ValueError(f"the fused MLP block needs {n} clusters of {c} resident at once; this GPU holds "
                             f"{got}")
    return cfg


def planned_config(hidden: torch.Tensor, packed: PackedMLP, *, has_residual: bool = False,
                   tuning: MLPTuning | None = None) -> MLPBlockConfig:
    """The launch configuration :func:`mlp_block` uses for these operands (planned
    and checked on the first call for their shapes, then cached)."""
    dev = hidden.device.index if hidden.device.index is not None else 0
    key = (hidden.shape, hidden.dtype, hidden.device, packed.w_gate_up.shape, packed.w_down.shape,
           packed.w_gate_up.dtype, packed.w_down.dtype, packed.eps, packed.layout, has_residual, tuning)
    cfg = _launch.get(key)
    if cfg is None:                     # first call for these shapes: plan and full checks
        cfg = _launch.setdefault(key, _plan(hidden, packed, has_residual, tuning, dev))
    else:                               # cached plan: the weights may still be other tensors
        check_tensor("norm", packed.norm, dtype=hidden.dtype, shape=(cfg.hidden,), cuda=False)
    return cfg


_workspaces: dict = {}


def mlp_block(hidden: torch.Tensor, packed: PackedMLP, *, residual: torch.Tensor | None = None,
              out: torch.Tensor | None = None, workspace: MLPWorkspace | None = None,
              tuning: MLPTuning | None = None) -> torch.Tensor:
    """One launch: (residual add) + RMSNorm + gate/up + SiLU * up + down + residual.
    Returns ``out [B, hidden]`` (the residual stream for the next block). Runs on
    the current stream, no host synchronisation."""
    dev = hidden.device.index if hidden.device.index is not None else 0
    cfg = planned_config(hidden, packed, has_residual=residual is not None, tuning=tuning)
    if hidden.device.type != "cuda":
        raise ValueError(f"operands must be on a CUDA device, got {hidden.device}")
    B, H = hidden.shape
    if residual is not None:
        check_tensor("residual", residual, dtype=hidden.dtype, shape=(B, H), cuda=False)
    if out is not None:
        check_tensor("out", out, dtype=hidden.dtype, shape=(B, H), cuda=False)
    if workspace is None:
        wkey = (cfg, dev)
        workspace = _workspaces.get(wkey)
        if workspace is None:
            workspace = _workspaces.setdefault(wkey, MLPWorkspace.new(cfg, hidden.device))
    elif (workspace.act.shape != (B, cfg.intermediate)
          or workspace.barrier.shape != (cfg.state_words,)):
        raise ValueError("workspace does not match these shapes: build it with MLPWorkspace.new(cfg, device)")
    if out is None:
        out = torch.empty_like(hidden)
    res = residual if residual is not None else hidden
    check_operands(("hidden", "residual", "norm", "w_gate_up", "w_down", "act", "out", "barrier"),
                   hidden, res, packed.norm, packed.w_gate_up, packed.w_down, workspace.act, out,
                   workspace.barrier, align=(16,) * 7 + (4,))
    _kernel(cfg)(hidden, res, packed.norm, packed.w_gate_up, packed.w_down, workspace.act, workspace.barrier, out)
    return out


@torch.library.custom_op("cf_cute::mlp_block", mutates_args=())
def _mlp_block_op(hidden: torch.Tensor, norm: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  residual: torch.Tensor | None, eps: float, layout: str = "linear") -> torch.Tensor:
    return mlp_block(hidden, PackedMLP(norm, w_gate_up, w_down, eps, layout), residual=residual)


@_mlp_block_op.register_fake
def _(hidden, norm, w_gate_up, w_down, residual, eps, layout="linear"):
    return torch.empty_like(hidden)
