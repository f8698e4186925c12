"""Llama-family model configurations and checkpoint loading (no GPU needed).

* :class:`ModelConfig` -- the static shape of a Llama-family decoder, read
  from a Hugging Face ``config.json`` (with clear errors for what the fused
  kernels do not support) or taken from :data:`BUILTIN_CONFIGS` by name.
* :func:`load_checkpoint` -- a local Hugging Face directory: ``config.json``
  plus ``model.safetensors``, or shards with or without
  ``model.safetensors.index.json``; every tensor checked for presence and
  shape before anything is converted, then cast to the requested dtype.
* :func:`random_weights` -- the same tensor dictionary with random weights of
  sensible scale, for benchmarks on a machine with no downloads.

Tensor names are the Hugging Face ones (``model.layers.{i}.self_attn.q_proj.weight``...).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["ModelConfig", "BUILTIN_CONFIGS", "model_config", "expected_shapes", "load_checkpoint",
           "random_weights"]


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None        # sorted (key, value) pairs of a llama3 dict
    max_positions: int = 4096
    tie_word_embeddings: bool = False

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def validate(self) -> None:
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim not in (64, 128):
            raise ValueError(f"head_dim {self.head_dim} is not supported (64 or 128)")
        if self.hidden % 256:
            raise ValueError(f"hidden_size {self.hidden} must be a multiple of 256")
        if self.intermediate % 256:
            raise ValueError(f"intermediate_size {self.intermediate} must be a multiple of 256 (the fused MLP "
                             f"splits the down projection's K over 8 warps of 32 columns)")

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a Hugging Face ``config.json`` dict; raises ``ValueError`` for
        architectures and options the kernels do not implement."""
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "llama" or (archs and archs[0] != "LlamaForCausalLM"):
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}: cf_cute runs "
                             f"Llama-family models (LlamaForCausalLM)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (silu only)")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"unsupported: {flag} = true")
        rope = cfg.get("rope_scaling") or None
        params = cfg.get("rope_parameters") or {}
        if rope is None and params.get("rope_type", "default") != "default":
            rope = params
        theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type"))
            if kind != "llama3":
                raise ValueError(f"unsupported rope_scaling type {kind!r} (none or llama3)")
            keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            rope = tuple(sorted([("rope_type", "llama3")] + [(k, rope[k]) for k in keep]))
        heads = cfg["num_attention_heads"]
        out = cls(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                  num_layers=cfg["num_hidden_layers"], num_heads=heads,
                  num_kv_heads=cfg.get("num_key_value_heads") or heads,
                  head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                  rms_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=rope,
                  max_positions=cfg.get("max_position_embeddings", 4096),
                  tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        out.validate()
        return out

    def to_dict(self) -> dict:
        return asdict(self)


_LLAMA3_SCALING = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                   ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
_LLAMA32_SCALING = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                    ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))

BUILTIN_CONFIGS = {
    "llama-2-7b": ModelConfig(hidden=4096, intermediate=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                              head_dim=128, vocab=32000, rms_eps=1e-5, rope_theta=10000.0, max_positions=4096),
    "llama-3-8b": ModelConfig(hidden=4096, intermediate=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                              head_dim=128, vocab=128256, rms_eps=1e-5, rope_theta=500000.0, max_positions=8192),
    "llama-3.1-8b": ModelConfig(hidden=4096, intermediate=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                                head_dim=128, vocab=128256, rms_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=_LLAMA3_SCALING, max_positions=131072),
    "llama-3.2-1b": ModelConfig(hidden=2048, intermediate=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                                head_dim=64, vocab=128256, rms_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=_LLAMA32_SCALING, max_positions=131072, tie_word_embeddings=True),
    "llama-3.2-3b": ModelConfig(hidden=3072, intermediate=8192, num_layers=28, num_heads=24, num_kv_heads=8,
                                head_dim=128, vocab=128256, rms_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=_LLAMA32_SCALING, max_positions=131072, tie_word_embeddings=True),
}


def model_config(name_or_path: str | Path) -> ModelConfig:
    """A built-in config by name, or the ``config.json`` of a checkpoint directory."""
    if str(name_or_path) in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[str(name_or_path)]
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{name_or_path!r} is neither a built-in config ({', '.join(BUILTIN_CONFIGS)}) "
                         f"nor a directory with a config.json")
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold, with its shape."""
    H, hd = cfg.hidden, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (cfg.num_heads * hd, H),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, H),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, H),
            p + "self_attn.o_proj.weight": (H, cfg.num_heads * hd),
            p + "mlp.gate_proj.weight": (cfg.intermediate, H),
            p + "mlp.up_proj.weight": (cfg.intermediate, H),
            p + "mlp.down_proj.weight": (H, cfg.intermediate),
        })
    return shapes


def _shard_files(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index if there is one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = {name: path / f for name, f in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise ValueError(f"checkpoint shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"no .safetensors files in {path}")
    from safetensors import safe_open
    files = {}
    for f in shards:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                files[name] = f
    return files


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load and check a local Hugging Face Llama checkpoint. Raises
    ``ValueError`` naming the problem (architecture, missing shard, missing or
    mis-shaped tensor) before converting anything."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be bfloat16 or float16, got {dtype}")
    path = Path(path)
    cfg = model_config(path)
    files = _shard_files(path)
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in files]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint lacks {', '.join(missing[:3])}{more}")
    from safetensors import safe_open
    by_file: dict[Path, list[str]] = {}
    for name in want:
        by_file.setdefault(files[name], []).append(name)
    for f, names in by_file.items():              # every header checked before any data is read
        with safe_open(str(f), framework="pt") as h:
            for name in names:
                shape = tuple(h.get_slice(name).get_shape())
                if shape != want[name]:
                    raise ValueError(f"{name} has shape {list(shape)}, expected {list(want[name])} "
                                     f"for this config")
    tensors = {}
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for name in names:
                tensors[name] = h.get_tensor(name).to(device=device, dtype=dtype)
    return cfg, tensors


def random_weights(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the right shapes: linear layers ~ N(0, 1/fan_in), norms
    around 1, embeddings ~ N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if len(shape) == 1:
            t = 1 + 0.05 * t
        elif "embed_tokens" not in name:
            t = t / math.sqrt(shape[1])
        out[name] = t.to(dtype)
    return out
