"""A Llama-family model decoding on the fused kernels.

    model = LlamaModel.from_pretrained("path/or/llama-3.2-1b", max_batch=4, max_len=2048)
    out = model.generate([[1, 15043, 29892]], max_new_tokens=32)          # token ids in, ids out

Prefill runs through torch (per request: RMSNorm, QKV, RoPE, causal SDPA, MLP)
and writes the contiguous KV caches ``[max_batch, max_len, kv_heads, head_dim]``
that the fused kernels read. Each decode step is ``num_layers`` fused decoder
layers (two launches each: ``cf_cute.decoder.decoder_layer``), the final RMSNorm
and the LM head, captured once per batch size as one CUDA graph with static
token / position buffers and replayed. The weights are held in the GEMV
core's tiled order (``weight_layout="tiled"``, :mod:`cf_cute.tiles`; H200:
the MLP block 8-11% faster than on nn.Linear order), the attention weights too.

:meth:`LlamaModel.torch_step` is the same decode step in plain torch on the same
weights (in nn.Linear order: a copy made on its first call) and caches
(the baseline of ``python -m cf_cute bench``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cf_cute.attention import linear_attention, pack_attention
from cf_cute.decoder import DecoderLayerWeights, decoder_layer
from cf_cute.mlp import linear_mlp, mlp_block_torch, pack_mlp
from cf_cute.models import BUILTIN_CONFIGS, ModelConfig, load_checkpoint, model_config, random_weights
from cf_cute.reference import AttentionWeights, MLPWeights, rope_tables
from cf_cute.timing import capture_graph

__all__ = ["LlamaModel", "SamplingParams", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0
    seed: int | None = None


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits [B, V]`` (fp32): argmax when greedy, else
    temperature, top-k, top-p (nucleus) and a draw from ``generator``."""
    if p.temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(x, min(p.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        srt, idx = torch.sort(x, descending=True, dim=-1)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p        # keep the smallest prefix reaching top_p
        srt = srt.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, srt)
    return torch.multinomial(x.softmax(-1), 1, generator=generator).squeeze(-1)


class LlamaModel:
    """Weights, caches and compiled decode graphs of one Llama-family model."""

    def __init__(self, cfg: ModelConfig, tensors: dict, *, max_batch: int = 1, max_len: int | None = None,
                 device: str | torch.device = "cuda", weight_layout: str = "tiled"):
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device)
        t = {k: v.to(self.device) for k, v in tensors.items()}
        self.dtype = t["model.embed_tokens.weight"].dtype
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"weights must be bfloat16 or float16, got {self.dtype}")
        self.max_batch = max_batch
        self.max_len = max_len or min(cfg.max_positions, 4096)
        if not 1 <= max_batch <= 16:
            raise ValueError(f"max_batch must be 1..16, got {max_batch}")
        self.embed = t["model.embed_tokens.weight"]
        self.norm = t["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else t["lm_head.weight"]
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            aw = AttentionWeights(norm=t[p + "input_layernorm.weight"], wq=t[p + "self_attn.q_proj.weight"],
                                  wk=t[p + "self_attn.k_proj.weight"], wv=t[p + "self_attn.v_proj.weight"],
                                  wo=t[p + "self_attn.o_proj.weight"])
            mw = MLPWeights(norm=t[p + "post_attention_layernorm.weight"], w_gate=t[p + "mlp.gate_proj.weight"],
                            w_up=t[p + "mlp.up_proj.weight"], w_down=t[p + "mlp.down_proj.weight"])
            self.layers.append(DecoderLayerWeights(
                attn=pack_attention(aw, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, eps=cfg.rms_eps,
                                    layout=weight_layout),
                mlp=pack_mlp(mw, eps=cfg.rms_eps, layout=weight_layout)))
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                del t[p + name + ".weight"]          # packed copies only: the torch paths use them too
        del t
        cos, sin = rope_tables(self.max_len, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)
        shape = (max_batch, self.max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self._graphs: dict = {}
        self._linear_layers: list | None = None   # nn.Linear-order weights for torch_step, built on first use

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        **kw) -> "LlamaModel":
        """A local Hugging Face checkpoint directory, or a built-in config name
        (random weights, no download)."""
        if str(name_or_path) in BUILTIN_CONFIGS:
            cfg = model_config(name_or_path)
            dev = kw.get("device", "cuda")
            return cls(cfg, random_weights(cfg, dtype, dev, seed), **kw)
        cfg, tensors = load_checkpoint(name_or_path, dtype)
        return cls(cfg, tensors, **kw)

    # ------------------------------------------------------------------ prefill (torch)
    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Half-split RoPE of ``x [T, n, hd]`` at positions ``pos [T]`` (fp32 math)."""
        c, s = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        xf = x.float()
        h = xf.shape[-1] // 2
        x1, x2 = xf[..., :h], xf[..., h:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1).to(x.dtype)

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run prompt ``ids`` of request ``slot`` through torch, filling its cache
        rows ``[0, len(ids))``; returns the last position's logits (fp32 [vocab])."""
        cfg = self.cfg
        T = len(ids)
        if T == 0:
            raise ValueError("empty prompt")
        if T >= self.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit the cache of {self.max_len} (one slot must stay "
                             f"free for the first generated token)")
        pos = torch.arange(T, device=self.device)
        h = self.embed[torch.tensor(ids, device=self.device)]
        nq = cfg.num_heads
        for i in range(cfg.num_layers):
            layer = self._torch_layer(i, keep=False)
            q, k, v = self._qkv(h, layer, pos)
            self.k_cache[i][slot, :T] = k
            self.v_cache[i][slot, :T] = v
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                               is_causal=True, enable_gqa=nq != cfg.num_kv_heads)
            h = mlp_block_torch(h + o.transpose(0, 1).reshape(T, -1) @ layer.attn.wo.T, layer.mlp)
        return self._logits(h[-1:])[0]

    def _torch_layer(self, i: int, keep: bool) -> DecoderLayerWeights:
        """Layer i's weights in nn.Linear order for the torch paths. The fused kernels read
        them tiled (``cf_cute.tiles``): prefill untiles one layer at a time (``keep=False``,
        transient copies); the timed torch baseline keeps nn.Linear copies of every layer
        from its first run on (``keep=True``), so that it streams what cuBLAS expects."""
        layer = self.layers[i]
        if layer.attn.layout == "linear" and layer.mlp.layout == "linear":
            return layer
        if self._linear_layers is not None:
            return self._linear_layers[i]
        if keep:
            self._linear_layers = [self._torch_layer(j, keep=False) for j in range(len(self.layers))]
            return self._linear_layers[i]
        return DecoderLayerWeights(attn=linear_attention(layer.attn), mlp=linear_mlp(layer.mlp))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and LM head: fp32 logits ``[rows, vocab]``."""
        x = F.rms_norm(h, (self.cfg.hidden,), self.norm, self.cfg.rms_eps)
        return (x @ self.lm_head.T).float()

    def _qkv(self, h: torch.Tensor, layer: DecoderLayerWeights, pos: torch.Tensor):
        """RMSNorm, one matmul over the packed ``w_qkv`` (nn.Linear order: ``layer`` from
        :meth:`_torch_layer`), RoPE: q ``[T, heads, hd]``, k and v ``[T, kv_heads, hd]``."""
        cfg = self.cfg
        T, hd, nkv = h.shape[0], cfg.head_dim, cfg.num_kv_heads
        G = cfg.num_heads // nkv
        a = layer.attn
        x = F.rms_norm(h, (cfg.hidden,), a.norm, cfg.rms_eps)
        qkv = (x @ a.w_qkv.view(-1, cfg.hidden).T).view(T, nkv, G + 2, hd)
        q = self._rope(qkv[:, :, :G].reshape(T, nkv * G, hd), pos)
        return q, self._rope(qkv[:, :, G], pos), qkv[:, :, G + 1]

    # ------------------------------------------------------------------ decode (fused)
    def decode_step_eager(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for requests ``0..B-1``: ``tokens [B]`` (int64) at
        ``positions [B]`` (int32, on the GPU); returns logits ``[B, vocab]`` (fp32)."""
        h = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            B = tokens.shape[0]
            h = decoder_layer(h, layer, self.k_cache[i][:B] if B < self.max_batch else self.k_cache[i],
                              self.v_cache[i][:B] if B < self.max_batch else self.v_cache[i], positions,
                              self.cos, self.sin)
        return self._logits(h)

    def _graph(self, B: int, step, kv_len: int | None = None) -> tuple:
        key = (B, step, kv_len)
        if key not in self._graphs:
            tok = torch.zeros(B, dtype=torch.long, device=self.device)
            # the warm-up step below really runs and appends k, v: at the last cache slot it may
            # read, which generate never uses (prompt + new tokens <= max_len leaves it free)
            pos = torch.full((B,), (kv_len or self.max_len) - 1, dtype=torch.int32, device=self.device)
            if step == "fused":
                g, out = capture_graph(lambda: self.decode_step_eager(tok, pos))
            else:
                g, out = capture_graph(lambda: self.torch_step(tok, pos, kv_len=kv_len))
            self._graphs[key] = (g, tok, pos, out)
        return self._graphs[key]

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, *, step: str = "fused",
                    kv_len: int | None = None) -> torch.Tensor:
        """:meth:`decode_step_eager` replayed from a CUDA graph captured once per
        batch size (``step="torch"``: the torch baseline's graph, one per ``kv_len``)."""
        if kv_len is not None and step == "fused":
            raise ValueError("kv_len applies to the torch step; the fused kernels read each request's own length")
        g, tok, pos, out = self._graph(tokens.shape[0], step, kv_len)
        tok.copy_(tokens, non_blocking=True)
        pos.copy_(positions, non_blocking=True)
        g.replay()
        return out

    # ------------------------------------------------------------------ torch baseline
    def torch_step(self, tokens: torch.Tensor, positions: torch.Tensor, *, kv_len: int | None = None) -> torch.Tensor:
        """The same decode step in plain torch (cache append, SDPA over the first
        ``kv_len`` cache slots (default: all) with a length mask), on the same
        weights (copied once to nn.Linear order, :meth:`_torch_layer`) and caches. Every
        position must be below ``kv_len``: benchmarks pass the context + 1 so that the
        baseline reads no more KV than the fused step (a fixed shape, as a CUDA graph
        needs; unchecked on the device)."""
        cfg = self.cfg
        B = tokens.shape[0]
        L = self.max_len if kv_len is None else kv_len
        if not 1 <= L <= self.max_len:
            raise ValueError(f"kv_len must lie in [1, {self.max_len}], got {kv_len}")
        h = self.embed[tokens]
        rows = torch.arange(B, device=self.device)
        pos = positions.long()
        mask = torch.arange(L, device=self.device)[None, :] <= pos[:, None]                # [B, L]
        mask = mask[:, None, None, :]
        for i in range(cfg.num_layers):
            layer = self._torch_layer(i, keep=True)
            q, k, v = self._qkv(h, layer, pos)
            kc, vc = self.k_cache[i][:B, :L], self.v_cache[i][:B, :L]
            kc[rows, pos] = k
            vc[rows, pos] = v
            o = F.scaled_dot_product_attention(q.unsqueeze(2), kc.transpose(1, 2), vc.transpose(1, 2),
                                               attn_mask=mask, enable_gqa=cfg.num_heads != cfg.num_kv_heads)
            h = mlp_block_torch(h + o.reshape(B, -1) @ layer.attn.wo.T, layer.mlp)
        return self._logits(h)

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int = 32,
                 sampling: SamplingParams = SamplingParams(), stop_tokens: tuple[int, ...] = (), on_token=None,
                 step: str = "fused") -> list[list[int]]:
        """Prefill each prompt, then decode up to ``max_new_tokens`` per request
        (a request stops at a stop token; the batch runs until all stopped).
        ``on_token(step_index, tokens [B])`` is called after every step."""
        B = len(prompts)
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"batch of {B} prompts; this model was built for 1..{self.max_batch}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the cache "
                             f"({self.max_len})")
        gen = None
        if sampling.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        logits = torch.stack([self.prefill(b, p) for b, p in enumerate(prompts)])
        tokens = sample(logits, sampling, gen)
        positions = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=self.device)
        out = [[] for _ in range(B)]
        done = [False] * B                      # the request emitted a stop token
        for i in range(max_new_tokens):
            for b, t in enumerate(tokens.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in stop_tokens
            if on_token is not None:
                on_token(i, tokens)
            if i + 1 == max_new_tokens or all(done):
                break
            logits = self.decode_step(tokens, positions, step=step)
            tokens = sample(logits, sampling, gen)
            positions += 1
        return out
