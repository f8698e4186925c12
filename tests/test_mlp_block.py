"""The fused MLP block and the decoder layer from torch: against the fp32
reference and transformers' LlamaMLP / LlamaDecoderLayer (GPU); compile, PTX,
planning and input checks (CPU)."""

import dataclasses
import math
import re

import pytest
import torch

from conftest import assert_replays_equal, make_kv_cache

from cf_cute.fused.mlp_block import MLPBlock, MLPBlockConfig
from cf_cute.jit import compile_for_inspection
from cf_cute.mlp import MLPTuning, arg_specs, grid_plan, mlp_block, pack_mlp
from cf_cute.reference import MLPWeights
from cf_cute.reference import mlp_block as reference_mlp
from cf_cute.tiles import linear_weight
from cf_cute.timing import capture_graph

# (hidden, intermediate): Llama-2-7B, Llama-3-8B, Llama-3.2-1B, Llama-3.2-3B
SHAPES = [(4096, 11008), (4096, 14336), (2048, 8192), (3072, 8192)]


def _weights(H, I, device, dtype):
    return MLPWeights(norm=(1 + 0.1 * torch.randn(H, device=device)).to(dtype),
                      w_gate=(torch.randn(I, H, device=device) / math.sqrt(H)).to(dtype),
                      w_up=(torch.randn(I, H, device=device) / math.sqrt(H)).to(dtype),
                      w_down=(torch.randn(H, I, device=device) / math.sqrt(I)).to(dtype))


@pytest.mark.parametrize("cluster,clusters,batch", [(1, 132, 1), (2, 66, 16), (4, 30, 3), (8, 16, 1)])
def test_compiles_with_dsmem_and_grid_barrier(cluster, clusters, batch):
    cfg = MLPBlockConfig(batch=batch, hidden=4096, intermediate=11008, num_clusters=clusters,
                         cluster_size=cluster, has_residual=True, l2_prefetch=True)
    ptx = compile_for_inspection(MLPBlock, cfg, arg_specs(cfg)).__ptx__
    assert "mma.sync.aligned.m16n8k16" in ptx and "atom.global.acq_rel.add" in ptx
    assert "cp.async.bulk.prefetch.L2" in ptx
    if cluster > 1:
        assert "st.async.shared::cluster.mbarrier::complete_tx::bytes" in ptx and "mapa.shared::cluster" in ptx
    # programmatic dependent launch: nothing is read from global memory before the wait for the
    # previous kernel (only weight prefetches come first), and the next kernel is released
    assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")
    assert ptx.index("cp.async.bulk.prefetch.L2") < ptx.index("griddepcontrol.wait")
    assert "griddepcontrol.launch_dependents" in ptx


@pytest.mark.parametrize("batch", [1, 16])
def test_tiled_weights_compile_to_the_same_loads(batch):
    """The tiled order (cf_cute.tiles) changes addresses only: the same 16-byte loads,
    MMAs and L2 prefetches as nn.Linear order."""
    counts = {}
    for layout in ("linear", "tiled"):
        cfg = MLPBlockConfig(batch=batch, hidden=4096, intermediate=11008, num_clusters=66, cluster_size=2,
                             w_layout=layout, l2_prefetch=True)
        ptx = compile_for_inspection(MLPBlock, cfg, arg_specs(cfg)).__ptx__
        counts[layout] = [ptx.count(s) for s in ("ld.global.v4", "mma.sync", "cp.async.bulk.prefetch.L2")]
    assert counts["tiled"] == counts["linear"] and min(counts["tiled"]) > 0


def test_fp16_and_small_shape_compile():
    cfg = MLPBlockConfig(batch=5, hidden=2048, intermediate=8192, num_clusters=33, cluster_size=2,
                         dtype="float16", k_parts=2)
    compile_for_inspection(MLPBlock, cfg, arg_specs(cfg))


def test_grid_plan_balances_units_per_cta():
    # 688 units (Llama-2-7B): 66 clusters of 2 give 11 units per cluster, 5.5 per CTA's bytes
    assert grid_plan(688, {1: 132, 2: 66, 4: 30}) == (2, 66)
    assert grid_plan(10, {1: 132, 2: 66}) == (2, 10)          # few units: split K to use more SMs
    assert grid_plan(688, {1: 132}) == (1, 132)
    # Llama-3-8B: 896 units, 7 a CTA at C=1 and C=2: the tie goes to C=2 (1.4x faster, H200)
    assert grid_plan(896, {1: 132, 2: 66, 4: 30}) == (2, 66)
    assert grid_plan(896, {1: 132, 2: 66, 4: 30}, hidden=4096) == (2, 66)
    # Llama-3.2-1B / -3B: 512 units, 4 a CTA at both: the tie goes to C=1 up to hidden 3072
    # (no cluster reduce-scatter; 10-19% faster at the 1B shape, 2-7% at the 3B, batch 1-8)
    assert grid_plan(512, {1: 132, 2: 66, 4: 30}, hidden=2048) == (1, 132)
    assert grid_plan(512, {1: 132, 2: 66, 4: 30}, hidden=3072) == (1, 132)
    assert grid_plan(512, {1: 132, 2: 66, 4: 30}, hidden=4096) == (2, 66)
    assert grid_plan(896, {1: 132, 4: 30}) == (1, 132)
    with pytest.raises(ValueError, match="resident"):
        grid_plan(688, {})


def test_tail_plan_splits_the_leftover_units():
    from cf_cute.mlp import tail_plan
    # Llama-2-7B: 688 = 10 x 66 + 28; 28 units x 4 pieces fill 112 of the 132 slots, a warp's
    # 1024 columns in pieces of 8 steps: the busiest cluster runs 5.25 passes instead of 6
    assert tail_plan(688, 66, 2, 1024) == 4
    assert tail_plan(896, 66, 2, 1024) == 0        # 13 full rounds: not whole passes
    assert tail_plan(512, 64, 2, 1024) == 0        # no leftover
    assert tail_plan(512, 40, 2, 1024) == 2        # 32 left over, 80 slots
    assert tail_plan(688, 66, 2, 64) == 2          # pieces of whole 32-column steps only
    assert tail_plan(700, 66, 2, 1024) == 2        # 40 left: 2 pieces; 6 -> 5.5 passes
    ok = dict(batch=1, hidden=4096, intermediate=11008, num_clusters=66, cluster_size=2, tail_pieces=4)
    cfg = MLPBlockConfig(**ok)
    cfg.validate()
    assert (cfg.units_per_cluster, cfg.tail_units) == (10, 28)
    assert cfg.state_words == 2 + 28 + 28 * 4 * 2 * 32
    for bad in (dict(tail_pieces=8), dict(tail_pieces=3), dict(intermediate=14336), dict(num_clusters=43)):
        with pytest.raises(ValueError, match="tail_pieces"):
            MLPBlockConfig(**{**ok, **bad}).validate()
    # the planner splits the tail by default where it has one (Llama-2-7B), not where it has none
    from cf_cute.mlp import PackedMLP, planned_config
    for I, pieces in ((11008, 4), (14336, 0)):
        m = dict(device="meta", dtype=torch.bfloat16)
        packed = PackedMLP(norm=torch.empty(4096, **m), w_gate_up=torch.empty(2 * I, 4096, **m),
                           w_down=torch.empty(4096, I, **m), layout="tiled")
        assert planned_config(torch.empty(1, 4096, **m), packed).tail_pieces == pieces


@pytest.mark.parametrize("batch", [1, 16])
def test_tail_compiles_to_release_adds_and_acquire_polls(batch):
    """The tail's partials are published by release atomics and read after acquire loads
    (integer, synchronisation only), besides the grid barrier's own."""
    base = dict(batch=batch, hidden=4096, intermediate=11008, num_clusters=66, cluster_size=2, w_layout="tiled",
                pipeline=batch <= 8)
    with_tail = compile_for_inspection(MLPBlock, MLPBlockConfig(**base, tail_pieces=4),
                                       arg_specs(MLPBlockConfig(**base, tail_pieces=4))).__ptx__
    without = compile_for_inspection(MLPBlock, MLPBlockConfig(**base), arg_specs(MLPBlockConfig(**base))).__ptx__
    # one poll (a first load and the spin) per unit a cluster combines (28 units over 66
    # clusters: one), not a copy of the combine per tail unit: each copy the CTA branches over
    # cost an instruction-cache miss (H200: 3-7 µs for 28 of them)
    assert with_tail.count("ld.acquire.gpu") - without.count("ld.acquire.gpu") == 2
    assert "atom.global.release.add" in with_tail and "atom.global.release.add" not in without
    assert not re.search(r"(atom|red)\.[^;]*\.f(16|32|64)", with_tail)


def test_batch_dependent_defaults():
    # measured on an H200 (benchmarks/RESULTS.md): one load pipeline and lock-step phase B up to batch 8
    from cf_cute.mlp import mlp_block_config
    H, I = 4096, 11008
    packed = pack_mlp(MLPWeights(*(torch.empty(*s, dtype=torch.bfloat16, device="meta")
                                   for s in ((H,), (I, H), (I, H), (H, I)))))
    for B, expect in ((1, True), (8, True), (9, False), (16, False)):
        cfg = mlp_block_config(torch.empty(B, H, dtype=torch.bfloat16, device="meta"), packed, cluster_size=2,
                               num_clusters=66, has_residual=False)
        assert cfg.pipeline is expect and cfg.shared_x is expect and cfg.pdl is False
        assert cfg.early_loads is not expect     # the weight loads before the norm: faster above batch 8
    cfg = mlp_block_config(torch.empty(1, H, dtype=torch.bfloat16, device="meta"), packed, cluster_size=2,
                           num_clusters=66, has_residual=False, tuning=MLPTuning(shared_x=False, pdl=True))
    assert not cfg.shared_x and cfg.pdl


@pytest.mark.parametrize("H,I,batch,unroll", [(4096, 14336, 1, 4), (4096, 14336, 8, 4), (4096, 11008, 1, 4),
                                               (2048, 8192, 1, 4), (2048, 8192, 2, 8), (3072, 8192, 4, 8),
                                               (4096, 14336, 16, 8)])
def test_default_unroll_avoids_the_spilling_pipeline(H, I, batch, unroll):
    """Unroll 4 at batch 1 and where phase A's pipeline holds more than four tiles'
    accumulators (unroll 8 spills there), else 8; an explicit unroll wins."""
    from cf_cute.mlp import mlp_block_config
    packed = pack_mlp(MLPWeights(*(torch.empty(*s, dtype=torch.bfloat16, device="meta")
                                   for s in ((H,), (I, H), (I, H), (H, I)))))
    x = torch.empty(batch, H, dtype=torch.bfloat16, device="meta")
    cfg = mlp_block_config(x, packed, cluster_size=2, num_clusters=66, has_residual=False)
    assert cfg.unroll == unroll
    assert mlp_block_config(x, packed, cluster_size=2, num_clusters=66, has_residual=False,
                            tuning=MLPTuning(unroll=12 - unroll)).unroll == 12 - unroll


def test_config_errors():
    ok = dict(batch=1, hidden=4096, intermediate=11008, num_clusters=66, cluster_size=2)
    MLPBlockConfig(**ok).validate()
    for bad, msg in ((dict(intermediate=11000), "multiple of 16"), (dict(intermediate=11024), "down projection"),
                     (dict(batch=17), "batch"), (dict(hidden=4000), "hidden"), (dict(k_parts=3), "k_parts"),
                     (dict(unroll=0), "unroll"),
                     (dict(dtype="float32"), "dtype"), (dict(cluster_size=3), "cluster_size"),
                     (dict(w_layout="blocked"), "w_layout")):
        with pytest.raises(ValueError, match=msg):
            MLPBlockConfig(**{**ok, **bad}).validate()


def test_bad_inputs_are_rejected_before_launch():
    H, I = 256, 512
    p = pack_mlp(_weights(H, I, "cpu", torch.bfloat16))
    x = torch.randn(2, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        mlp_block(x, p)
    with pytest.raises(TypeError, match="float16"):
        mlp_block(x.half(), p)
    with pytest.raises(ValueError, match="shape"):
        mlp_block(torch.randn(2, H + 32, dtype=torch.bfloat16), p)
    bad = dataclasses.replace(p, w_down=p.w_down[:, :-16].contiguous())
    with pytest.raises(ValueError, match="w_gate_up"):
        mlp_block(x, bad)


def _check(out, ref):
    assert torch.isfinite(out).all()
    assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("H,I", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_matches_reference(H, I, batch):
    dt = torch.bfloat16
    w = _weights(H, I, "cuda", dt)
    hidden = torch.randn(batch, H, device="cuda", dtype=dt)
    residual = torch.randn(batch, H, device="cuda", dtype=dt) if batch != 3 else None
    out = torch.full_like(hidden, float("nan"))
    mlp_block(hidden, pack_mlp(w), residual=residual, out=out)
    cpu = MLPWeights(*(t.float().cpu() for t in (w.norm, w.w_gate, w.w_up, w.w_down)))
    ref = reference_mlp(hidden.cpu(), cpu, residual=None if residual is None else residual.cpu())
    _check(out, ref)


# (hidden, intermediate, batch) run in both weight orders
LAYOUT_CASES = [(4096, 11008, 1), (4096, 11008, 16), (2048, 8192, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("H,I,batch", LAYOUT_CASES)
def test_tiled_and_linear_weights_give_the_same_bits(H, I, batch):
    """Only the addresses differ: every lane multiplies the same values in the same order."""
    w = _weights(H, I, "cuda", torch.bfloat16)
    hidden = torch.randn(batch, H, device="cuda", dtype=torch.bfloat16)
    outs = []
    for layout in ("tiled", "linear"):
        packed = pack_mlp(w, layout=layout)
        assert packed.layout == layout
        out = torch.full_like(hidden, float("nan"))
        mlp_block(hidden, packed, out=out)
        outs.append(out)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("tuning", [MLPTuning(cluster_size=1), MLPTuning(cluster_size=4, k_parts=2),
                                    MLPTuning(k_parts=1, l2_prefetch=True),
                                    MLPTuning(cluster_size=2, num_clusters=40, tail_pieces=0),
                                    MLPTuning(pipeline=False), MLPTuning(early_loads=True),
                                    MLPTuning(pipeline=False, early_loads=True),
                                    MLPTuning(cluster_size=2, num_clusters=40, tail_pieces=None),
                                    MLPTuning(cluster_size=1, num_clusters=120, tail_pieces=None)])
def test_every_grid_and_knob_matches_reference(tuning):
    """Every grid and knob against the fp32 reference; with ``tail_pieces=None`` (the
    default), 40 clusters of 2 (512 units: 12 rounds + 32 left over) and 120 CTAs (4 rounds
    + 32) split their tail in 2 and 4 pieces (``tail_plan``); ``tail_pieces=0`` does not."""
    H, I, batch, dt = 2048, 8192, 5, torch.float16
    w = _weights(H, I, "cuda", dt)
    hidden = torch.randn(batch, H, device="cuda", dtype=dt)
    out = mlp_block(hidden, pack_mlp(w), tuning=tuning)
    cpu = MLPWeights(*(t.float().cpu() for t in (w.norm, w.w_gate, w.w_up, w.w_down)))
    _check(out, reference_mlp(hidden.cpu(), cpu))


EARLY_PHASE_B_CASES = [(2048, 8192, 5, False), (2048, 8192, 1, True), (512, 1024, 3, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("H,I,batch,shared_x", EARLY_PHASE_B_CASES)
def test_early_phase_b_gives_the_same_bits(H, I, batch, shared_x):
    """W_down's first loads issued before the grid barrier (``early_phase_b``) change timing
    only: the same bits, tile after tile and in lock-step (``shared_x``); with hidden 512 (32
    row tiles) most CTAs have no phase-B tile and must still pass the barrier."""
    w = _weights(H, I, "cuda", torch.bfloat16)
    packed = pack_mlp(w)
    hidden = torch.randn(batch, H, device="cuda", dtype=torch.bfloat16)
    base = mlp_block(hidden, packed, tuning=MLPTuning(shared_x=shared_x))
    out = torch.full_like(base, float("nan"))
    mlp_block(hidden, packed, out=out, tuning=MLPTuning(shared_x=shared_x, early_phase_b=True))
    assert torch.equal(out, base)
    cpu = MLPWeights(*(t.float().cpu() for t in (w.norm, w.w_gate, w.w_up, w.w_down)))
    _check(base, reference_mlp(hidden.cpu(), cpu))


@pytest.mark.gpu
def test_matches_transformers_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
    H, I, B = 2048, 8192, 4
    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=16, num_key_value_heads=4)
    mlp = LlamaMLP(cfg).cuda().to(torch.bfloat16).eval()
    norm = LlamaRMSNorm(H, eps=cfg.rms_norm_eps).cuda().to(torch.bfloat16)
    w = _weights(H, I, "cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w.norm)
        mlp.gate_proj.weight.copy_(w.w_gate)
        mlp.up_proj.weight.copy_(w.w_up)
        mlp.down_proj.weight.copy_(w.w_down)
        hidden = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
        expect = (hidden.float() + mlp(norm(hidden)).float())
    out = mlp_block(hidden, pack_mlp(w, eps=cfg.rms_norm_eps))
    assert (out.float() - expect).norm() / expect.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tuning", [None, MLPTuning(tail_pieces=0)], ids=["default-tail-split", "no-tail"])
def test_deterministic_graph_capturable_and_writes_every_output(tuning):
    """Same bits every launch and replay; the tail split's counters reset themselves
    (Llama-2-7B's 688 units over 66 clusters: 28 left over, split by default)."""
    H, I, batch = 4096, 11008, 16
    w = pack_mlp(_weights(H, I, "cuda", torch.bfloat16))
    hidden = torch.randn(batch, H, device="cuda", dtype=torch.bfloat16)
    first = mlp_block(hidden, w, tuning=tuning).clone()
    static = torch.full_like(first, float("nan"))
    mlp_block(hidden, w, out=static, tuning=tuning)
    assert torch.equal(static, first)
    g, _ = capture_graph(lambda: mlp_block(hidden, w, out=static, tuning=tuning))
    assert_replays_equal(g, static, first)


@pytest.mark.gpu
def test_chained_launches_overlap_safely():
    """With ``pdl=True`` every launch is a programmatic dependent of the one before it (its
    prologue overlaps the previous kernel's tail): a chain of blocks, each reading the last one's
    output, gives the same bits as the same chain launched without PDL, eagerly and replayed from
    a CUDA graph."""
    H, I, B, n = 2048, 8192, 3, 6
    ws = [pack_mlp(_weights(H, I, "cuda", torch.bfloat16)) for _ in range(2)]
    x0 = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)

    def chain(outs, tuning=None):
        x = x0
        for k, o in enumerate(outs):
            x = mlp_block(x, ws[k % 2], out=o, tuning=tuning)
        return x

    plain = [torch.full_like(x0, float("nan")) for _ in range(n)]
    chain(plain, MLPTuning(pdl=False))
    pdl = [torch.full_like(x0, float("nan")) for _ in range(n)]
    chain(pdl, MLPTuning(pdl=True))
    for a, b in zip(pdl, plain):
        assert torch.equal(a, b)
    g, _ = capture_graph(lambda: chain(pdl, MLPTuning(pdl=True)))
    for _ in range(3):
        for o in pdl:
            o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for a, b in zip(pdl, plain):
            assert torch.equal(a, b)
    x = x0.cpu()
    for k in range(n):
        w = ws[k % 2]
        gu, down = linear_weight(w.w_gate_up, w.layout), linear_weight(w.w_down, w.layout)
        cpu = MLPWeights(norm=w.norm.float().cpu(), w_gate=gu[:I].float().cpu(),
                         w_up=gu[I:].float().cpu(), w_down=down.float().cpu())
        x = reference_mlp(x.float(), cpu)
        _check(pdl[k], x)
        x = pdl[k].cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("paged,batch", [(False, 1), (True, 2)])
def test_decoder_layer_matches_transformers(paged, batch):
    """cf_cute.decoder_layer against transformers' LlamaDecoderLayer with the same
    weights and cache contents (Llama-3.2-1B-like shape, GQA), request by request."""
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from cf_cute.attention import pack_attention
    from cf_cute.decoder import DecoderLayerWeights, decoder_layer
    from cf_cute.reference import AttentionWeights, rope_tables
    H, I, heads, kv, hd, L = 2048, 8192, 32, 8, 64, 256
    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=hd, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=L)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    dt = torch.bfloat16
    s = 1 / math.sqrt(H)
    aw = AttentionWeights(norm=1 + 0.1 * torch.randn(H), wq=torch.randn(heads * hd, H) * s,
                          wk=torch.randn(kv * hd, H) * s, wv=torch.randn(kv * hd, H) * s,
                          wo=torch.randn(H, heads * hd) / math.sqrt(heads * hd))
    mw = _weights(H, I, "cpu", torch.float32)
    aw = AttentionWeights(*(t.to(dt).float() for t in dataclasses.astuple(aw)))
    mw = MLPWeights(*(t.to(dt).float() for t in dataclasses.astuple(mw)))
    with torch.no_grad():
        layer.input_layernorm.weight.copy_(aw.norm)
        layer.post_attention_layernorm.weight.copy_(mw.norm)
        for n in ("q", "k", "v", "o"):
            getattr(layer.self_attn, f"{n}_proj").weight.copy_(getattr(aw, f"w{n}"))
        layer.mlp.gate_proj.weight.copy_(mw.w_gate)
        layer.mlp.up_proj.weight.copy_(mw.w_up)
        layer.mlp.down_proj.weight.copy_(mw.w_down)
    kc, vc, table = make_kv_cache(batch, L, kv, hd, paged, "cuda", dt)
    positions = torch.randint(1, L, (batch,), dtype=torch.int32)
    positions[-1] = L - 1
    hidden = torch.randn(batch, H, device="cuda", dtype=dt)
    cos, sin = rope_tables(L, hd, 500000.0)
    weights = DecoderLayerWeights(
        attn=pack_attention(AttentionWeights(*(t.to(dt).cuda() for t in dataclasses.astuple(aw))),
                            num_heads=heads, num_kv_heads=kv),
        mlp=pack_mlp(MLPWeights(*(t.to(dt).cuda() for t in dataclasses.astuple(mw)))))
    ctx_k = [_read(kc, table, b, int(positions[b])) for b in range(batch)]   # before the append
    ctx_v = [_read(vc, table, b, int(positions[b])) for b in range(batch)]
    out = decoder_layer(hidden, weights, kc, vc, positions, cos.cuda(), sin.cuda(), page_table=table)
    rot = LlamaRotaryEmbedding(cfg)
    import inspect                     # the cache keyword was renamed between transformers 5.17 and 5.24
    cache_kw = "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"
    for b in range(batch):
        p = int(positions[b])
        cache = DynamicCache()
        cache.update(ctx_k[b].transpose(0, 1)[None], ctx_v[b].transpose(0, 1)[None], 0)
        x = hidden[b].float().cpu()[None, None]
        with torch.no_grad():
            pe = rot(x, torch.tensor([[p]]))
            expect = layer(x, position_embeddings=pe, attention_mask=None, **{cache_kw: cache})
            expect = expect[0] if isinstance(expect, tuple) else expect
        expect = expect[0, 0]
        assert (out[b].float().cpu() - expect).norm() / expect.norm() < 2e-2


def _read(cache, table, b, n):
    """The first n cached tokens of request b, fp32 on the CPU ([n, kv, hd])."""
    if table is None:
        return cache[b, :n].float().cpu()
    P = cache.shape[1]
    pages = table[b, : -(-n // P)].long()
    return cache[pages.to(cache.device)].reshape(-1, *cache.shape[2:])[:n].float().cpu()


def test_custom_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    import cf_cute.attention  # noqa: F401  (registers cf_cute::attention_block)
    with FakeTensorMode():
        h = torch.empty(2, 256, dtype=torch.bfloat16, device="cuda")
        out = torch.ops.cf_cute.mlp_block(h, torch.empty(256, dtype=torch.bfloat16),
                                          torch.empty(1024, 256, dtype=torch.bfloat16),
                                          torch.empty(256, 512, dtype=torch.bfloat16), None, 1e-5)
        assert out.shape == h.shape and out.dtype == h.dtype
        kc = torch.empty(2, 64, 2, 64, dtype=torch.bfloat16, device="cuda")
        out = torch.ops.cf_cute.attention_block(
            h, torch.empty(256, dtype=torch.bfloat16), torch.empty(2, 4 * 64, 256, dtype=torch.bfloat16),
            torch.empty(256, 256, dtype=torch.bfloat16), kc, torch.empty_like(kc),
            torch.empty(2, dtype=torch.int32), torch.empty(64, 32), torch.empty(64, 32), None, None, 4, 2, 1e-5,
            "neox")
        assert out.shape == h.shape


@pytest.mark.gpu
def test_mlp_block_under_torch_compile():
    H, I = 2048, 8192
    w = pack_mlp(_weights(H, I, "cuda", torch.bfloat16))
    x = torch.randn(3, H, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda a: torch.ops.cf_cute.mlp_block(a, w.norm, w.w_gate_up, w.w_down, None, w.eps,
                                                                 w.layout) * 2,
                      fullgraph=True)
    torch.testing.assert_close(f(x), mlp_block(x, w) * 2, rtol=0, atol=0)


def test_phase_timer_compiles_to_globaltimer_stamps():
    cfg = MLPBlockConfig(batch=1, hidden=4096, intermediate=11008, num_clusters=66, cluster_size=2, phase_timer=True)
    ptx = compile_for_inspection(MLPBlock, cfg, arg_specs(cfg)).__ptx__
    assert ptx.count("%globaltimer_lo") >= 6
