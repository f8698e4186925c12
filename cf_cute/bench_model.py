"""``python -m cf_cute bench``: time per output token of a whole model's decode
step, cf_cute (fused decoder layers, one CUDA graph) against the torch CUDA-graph
decode step on the same weights and caches, in the same run.

Caches are filled with random keys/values up to the context length (prefill is
not what is measured); every request sits at that context. Each step is timed
as a median of CUDA-event timed graph replays after warm-up; the weights of a
7B model (13 GB) are far larger than L2, so every step streams them from HBM.
Floor = (all layer weights + final norm + LM head + the KV cache read) / the read
bandwidth measured in the same run.
"""

from __future__ import annotations

import math
import sys

import torch

from cf_cute.timing import read_bandwidth_gbs, time_ms

__all__ = ["run_bench", "table", "weight_bytes"]


def weight_bytes(mc, *, per_step: bool) -> int:
    """bf16/fp16 bytes of the model's tensors (``models.expected_shapes``): all of them
    (``per_step=False``, what the GPU holds), or what one decode step reads: every
    tensor but the embedding table, of which only B rows are read, plus the LM head,
    which is that table when the embeddings are tied."""
    from cf_cute.models import expected_shapes
    shapes = expected_shapes(mc)
    n = sum(math.prod(s) for s in shapes.values())
    if per_step:
        n -= 0 if mc.tie_word_embeddings else mc.vocab * mc.hidden
    return 2 * n


def _progress(i: int, n: int, what: str) -> None:
    w = 30
    done = w * i // n
    sys.stderr.write(f"\r[{'#' * done}{'.' * (w - done)}] {i}/{n} {what:40s}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def run_bench(model_name: str, contexts: list[int], batches: list[int], *, plot: str | None = "cf_cute_bench.png",
              dtype=torch.bfloat16) -> list[dict]:
    from cf_cute.runner import LlamaModel
    bw = read_bandwidth_gbs()
    rows = []
    n = len(contexts) * len(batches)
    i = 0
    from cf_cute.models import model_config
    mc = model_config(model_name)
    free = torch.cuda.mem_get_info()[0]
    stored, read = weight_bytes(mc, per_step=False), weight_bytes(mc, per_step=True)
    for B in batches:
        per_tok = 2 * mc.num_layers * B * mc.num_kv_heads * mc.head_dim * 2      # KV bytes per cached token
        fits = [c for c in contexts if stored + per_tok * (c + 1) < 0.8 * free]
        for c in contexts:
            if c not in fits:
                print(f"\nskipped batch {B}, context {c}: caches and weights exceed this GPU's free memory",
                      file=sys.stderr)
                n -= 1
        if not fits:
            continue
        model = LlamaModel.from_pretrained(model_name, dtype=dtype, max_batch=B, max_len=max(fits) + 1)
        for ctx in fits:
            _progress(i, n, f"batch {B}, context {ctx}")
            for kc, vc in zip(model.k_cache, model.v_cache):
                kc[:, :ctx].normal_()
                vc[:, :ctx].normal_()
            tok = torch.randint(0, mc.vocab, (B,), device="cuda")
            pos = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
            res = {}
            # the torch step reads the ctx + 1 valid cache slots, not the whole cache (sized for
            # the longest context of the run): each context's baseline reads what the fused step reads
            kw = {"torch": dict(kv_len=ctx + 1), "fused": {}}
            for step in ("torch", "fused"):
                model.decode_step(tok, pos, step=step, **kw[step])          # capture (and compile) once
                res[step] = time_ms(lambda s=step: model.decode_step(tok, pos, step=s, **kw[s]), reps=10)
            nbytes = read + per_tok * (ctx + 1)
            rows.append(dict(model=model_name, batch=B, context=ctx, floor_ms=nbytes / (bw * 1e6),
                             torch_ms=res["torch"], cf_cute_ms=res["fused"], bytes=nbytes, bw=bw))
            i += 1
        del model
        torch.cuda.empty_cache()
    _progress(n, n, "done")
    if plot:
        _plot(rows, plot)
    return rows


def table(rows: list[dict]) -> str:
    head = ["model", "batch", "context", "floor ms", "torch graph ms/token", "cf_cute ms/token", "cf_cute GB/s",
            "% of floor", "vs torch graph"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in (
            r["model"], r["batch"], r["context"], f"{r['floor_ms']:.2f}", f"{r['torch_ms']:.2f}",
            f"{r['cf_cute_ms']:.2f}", f"{r['bytes'] / r['cf_cute_ms'] / 1e6:.0f}",
            f"{100 * r['floor_ms'] / r['cf_cute_ms']:.0f}%", f"{r['torch_ms'] / r['cf_cute_ms']:.2f}x")) + " |")
    return "\n".join(out)


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for B in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == B]
        x = [r["context"] for r in rs]
        ax.plot(x, [r["cf_cute_ms"] for r in rs], "o-", label=f"cf_cute, batch {B}")
        ax.plot(x, [r["torch_ms"] for r in rs], "s--", label=f"torch CUDA graph, batch {B}")
        ax.plot(x, [r["floor_ms"] for r in rs], ":", color="gray", label=f"floor, batch {B}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per output token")
    ax.set_title(f"{rows[0]['model']} decode, {torch.cuda.get_device_name()}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)
