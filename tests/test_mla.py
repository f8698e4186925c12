"""MLA (issue 6): packing for the absorbed form, input checks, the torch decode
step (checked against the fp32 references of cf_cute.reference_mla, which match
transformers), and the fused path ``mla_decode``: its kernels compile for sm_90a
with the instructions the design relies on (CPU), bad inputs raise before any
launch (CPU), and on a GPU it matches the torch step and the fp32 reference,
appends the right cache rows, is deterministic and replays in a CUDA graph."""

import dataclasses
import math
import re

import pytest
import torch

from conftest import assert_replays_equal

from cf_cute.jit import compile_for_inspection
from cf_cute.mla import (MLAPlanKey, MLATuning, check_mla_operands, linear_mla, mla_decode, mla_decode_torch,
                         mla_kernels, mla_splits, pack_mla)
from cf_cute.tiles import tile_weight
from cf_cute.reference_mla import (LatentCache, MLAShape, MLAWeights, PagedLatentCache, mla_attention_block,
                                   mla_attention_block_absorbed, mla_rope_tables, mla_softmax_scale)

SHAPE = MLAShape(hidden=256, num_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
            mscale=0.707, mscale_all_dim=0.707)


def _weights(S: MLAShape, dtype=torch.float32, device="cpu") -> MLAWeights:
    H, r = S.hidden, S.kv_lora_rank
    w = MLAWeights(norm=1 + 0.1 * torch.randn(H), wq=torch.randn(S.num_heads * S.qk_head_dim, H) / math.sqrt(H),
                   wkv_a=torch.randn(S.latent_dim, H) / math.sqrt(H), kv_norm=1 + 0.1 * torch.randn(r),
                   wkv_b=torch.randn(S.num_heads * (S.qk_nope_head_dim + S.v_head_dim), r) / math.sqrt(r),
                   wo=torch.randn(H, S.num_heads * S.v_head_dim) / math.sqrt(S.num_heads * S.v_head_dim))
    return MLAWeights(*(t.to(device, dtype) for t in (w.norm, w.wq, w.wkv_a, w.kv_norm, w.wkv_b, w.wo)))


def _case(S, B, L, paged, dtype=torch.float32, device="cpu", P=16):
    """Random weights, activations and cache contents; positions: context 1, odd, the last slot."""
    w = _weights(S, dtype, device)
    positions = torch.tensor([0, 21, L - 1][:B] + [7] * max(0, B - 3), dtype=torch.int32)
    hidden = torch.randn(B, S.hidden).to(device, dtype)
    residual = torch.randn(B, S.hidden).to(device, dtype)
    ctx = torch.randn(B, L, S.latent_dim).to(device, dtype)
    if paged:
        table = torch.randperm(B * L // P + 3)[: B * L // P].view(B, L // P).to(torch.int32)
        data = torch.randn(B * L // P + 3, P, S.latent_dim).to(device, dtype)
        data[table.long()] = ctx.view(B, L // P, P, S.latent_dim)
    else:
        table, data = None, ctx.clone()
    return w, positions, hidden, residual, data, table


def test_pack_mla_layout():
    S = SHAPE
    w = _weights(S)
    p = pack_mla(w, S, scale=0.1, layout="linear")
    tiled = pack_mla(w, S, scale=0.1)
    assert tiled.layout == "tiled" and p.layout == "linear"
    for name in ("w_front", "w_uk", "w_uv", "wo"):
        assert torch.equal(getattr(tiled, name), tile_weight(getattr(p, name)))
        assert torch.equal(getattr(linear_mla(tiled), name), getattr(p, name))
    wkv_b = w.wkv_b.view(S.num_heads, S.qk_nope_head_dim + S.v_head_dim, S.kv_lora_rank)
    assert p.w_front.shape == (S.num_heads * S.qk_head_dim + S.latent_dim, S.hidden)
    assert torch.equal(p.w_front[: S.num_heads * S.qk_head_dim], w.wq)
    assert torch.equal(p.w_front[S.num_heads * S.qk_head_dim:], w.wkv_a)
    for h in range(S.num_heads):
        assert torch.equal(p.w_uk[h], wkv_b[h, : S.qk_nope_head_dim].T)
        assert torch.equal(p.w_uv[h], wkv_b[h, S.qk_nope_head_dim:])
    assert all(t.is_contiguous() for t in (p.w_front, p.w_uk, p.w_uv))


@pytest.mark.parametrize("paged", [False, True])
def test_torch_step_matches_references(paged):
    S, B, L = SHAPE, 3, 48
    w, positions, hidden, residual, data, table = _case(S, B, L, paged)
    cos, sin = mla_rope_tables(2560, S.qk_rope_head_dim, 10000.0, YARN)
    scale = mla_softmax_scale(S, YARN)
    ref_cache = PagedLatentCache(data.clone(), table.long()) if paged else LatentCache(data.clone())
    ref = mla_attention_block_absorbed(hidden, w, S, ref_cache, positions, cos, sin, scale=scale,
                                       residual=residual)
    unabsorbed = mla_attention_block(hidden, w, S, PagedLatentCache(data.clone(), table.long()) if paged
                                     else LatentCache(data.clone()), positions, cos, sin, scale=scale,
                                     residual=residual)
    cache = data.clone()
    out = mla_decode_torch(hidden, pack_mla(w, S, scale=scale), cache, positions, cos, sin, residual=residual,
                           page_table=table)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, unabsorbed, rtol=2e-4, atol=2e-4)
    # the appended rows, and nothing else, changed
    torch.testing.assert_close(cache, ref_cache.data, rtol=1e-5, atol=1e-5)
    assert not torch.equal(cache, data)


def test_torch_step_bf16_deepseek_v2_lite_shape():
    S, B, L = MLAShape(), 2, 64                      # DeepSeek-V2-Lite
    w, positions, hidden, residual, data, _ = _case(S, B, L, False, torch.bfloat16)
    cos, sin = mla_rope_tables(4096, S.qk_rope_head_dim, 10000.0, YARN)
    scale = mla_softmax_scale(S, YARN)
    ref = mla_attention_block_absorbed(hidden, w, S, LatentCache(data.clone()), positions, cos, sin, scale=scale,
                                       residual=residual)
    out = mla_decode_torch(hidden, pack_mla(w, S, scale=scale), data, positions, cos, sin, residual=residual)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


def test_bad_inputs_raise_before_anything_is_written():
    S, B, L = SHAPE, 3, 48
    cos, sin = mla_rope_tables(2560, S.qk_rope_head_dim, 10000.0, YARN)
    for paged in (False, True):
        w, positions, hidden, residual, data, table = _case(S, B, L, paged)
        packed = pack_mla(w, S, scale=0.1)
        cache = data.clone()
        bad = [
            (dict(positions=torch.tensor([0, 1, L], dtype=torch.int32)), ValueError, "positions"),
            (dict(positions=torch.tensor([0, -1, 2], dtype=torch.int32)), ValueError, "positions"),
            (dict(positions=positions.long()), TypeError, "positions"),
            (dict(hidden=hidden.half(), residual=residual.half()), TypeError, "norm must be float16"),
            (dict(hidden=hidden[:, :-8]), ValueError, "hidden"),
            (dict(residual=residual[:2]), ValueError, "residual"),
            (dict(cache=cache[..., :-1]), ValueError, "cache"),
            (dict(cos=cos.double()), TypeError, "cos"),
        ]
        if paged:
            bad.append((dict(page_table=torch.full_like(table, data.shape[0])), ValueError, "page_table"))
        else:
            bad.append((dict(cache=cache[:2]), ValueError, "contiguous cache"))
        for change, exc, msg in bad:
            args = dict(hidden=hidden, cache=cache, positions=positions, cos=cos, sin=sin, residual=residual,
                        page_table=table)
            args.update(change)
            with pytest.raises(exc, match=msg):
                mla_decode_torch(args.pop("hidden"), packed, args.pop("cache"), args.pop("positions"),
                                 args.pop("cos"), args.pop("sin"), **args)
            assert torch.equal(cache, data)               # nothing written
    with pytest.raises(ValueError, match="batch"):
        check_mla_operands(torch.zeros(17, S.hidden), packed, torch.zeros(17, L, S.latent_dim),
                           torch.zeros(17, dtype=torch.int32), cos, sin)


@pytest.mark.gpu
def test_torch_step_is_capturable_in_a_cuda_graph():
    from cf_cute.timing import capture_graph
    S, B, L = MLAShape(), 4, 256
    w, positions, hidden, residual, data, _ = _case(S, B, L, False, torch.bfloat16, "cuda")
    cos, sin = (t.cuda() for t in mla_rope_tables(L, S.qk_rope_head_dim, 10000.0, YARN))
    packed = pack_mla(w, S, scale=mla_softmax_scale(S, YARN))
    pos = positions.cuda()
    expect = mla_decode_torch(hidden, packed, data.clone(), pos, cos, sin, residual=residual)
    cache = data.clone()
    g, out = capture_graph(lambda: mla_decode_torch(hidden, packed, cache, pos, cos, sin, residual=residual))
    for _ in range(2):
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)


# ---------------------------------------------------------------------------------------------
# fused path (mla_decode)

LITE = MLAShape()                                           # DeepSeek-V2-Lite
NARROW = MLAShape(hidden=1024, num_heads=8)                  # fewer heads, smaller hidden: the generic path
LITE_YARN = dict(YARN, original_max_position_embeddings=4096)

# (shape, batch, cache slots L, paged, dtype, residual): the GPU tests run exactly these
# (mla_prebuild_configs compiles them); L is a contiguous cache's length or a paged one's
# pages * 16 a request
GPU_CASES = [
    (LITE, 1, 64, False, torch.bfloat16, True),
    (LITE, 3, 100, False, torch.float16, False),             # L not a multiple of 16
    (LITE, 16, 48, True, torch.bfloat16, True),
    (LITE, 3, 4096, True, torch.float16, True),
    (LITE, 2, 32769, False, torch.bfloat16, True),           # context 32768 + the new token
    (NARROW, 5, 80, True, torch.bfloat16, False),
    (LITE, 9, 160, True, torch.bfloat16, False),             # odd batch above 8: padded cluster reduces
]
_ROPE_ROWS = 32769 + 7                                        # the cos/sin table of every GPU case
# other tunings of one case: the direct attention kernel (rows read from global memory) with
# its tensor-core and CUDA-core P V (the reference path), one split a request (no merge), an
# odd split count (empty splits at short context), a deeper stage of fewer ring slots
TUNING_CASE = GPU_CASES[3]
TUNINGS = [MLATuning(staged=False), MLATuning(staged=False, pv_tensor_cores=False), MLATuning(splits=1),
           MLATuning(splits=7), MLATuning(stage_tokens=64, stages=2), MLATuning(pdl=False),
           MLATuning(front_early_loads=False), MLATuning(fuse_out=False), MLATuning(out_early_loads=False)]
TUNING_IDS = ["direct", "direct-cuda-core-pv", "splits-1", "splits-7", "stage-64x2", "no-pdl", "front-late",
              "out-unfused", "out-late"]


def _plan_key(S, B, L, paged, dtype, residual, P=16, tuning=None, layout="tiled") -> MLAPlanKey:
    """The plan ``mla_decode`` makes for a GPU case (weights as pack_mla gives them)."""
    cache_shape = (B * L // P + 3, P, S.latent_dim) if paged else (B, L, S.latent_dim)
    return MLAPlanKey(batch=B, dtype=str(dtype).replace("torch.", ""), shape=S, eps=1e-6,
                      scale=mla_softmax_scale(S, LITE_YARN), has_residual=residual, cache_shape=cache_shape,
                      max_pages=L // P if paged else 0, max_positions=_ROPE_ROWS, tuning=tuning or MLATuning(),
                      layout=layout)


def mla_prebuild_configs(bench_contexts=(1024, 4096, 16384, 32768), bench_batches=(1, 16)) -> list:
    """``[(KernelCls, cfg, arg_specs)]`` (specs as a tuple: hashable) of every kernel the
    GPU tests and benchmarks/bench_mla.py compile, once each (for benchmarks/prebuild.py)."""
    keys = ([_plan_key(*case) for case in GPU_CASES] + [_plan_key(*TUNING_CASE, tuning=t) for t in TUNINGS]
            + [_plan_key(*GPU_CASES[1], layout="linear")]     # test_tiled_and_linear_weights_give_the_same_bits
            + [_plan_key(*GPU_CASES[2], tuning=MLATuning(pdl=False))])    # test_fused_replays_in_a_cuda_graph
    if bench_contexts:
        import sys
        from pathlib import Path
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from bench_mla import VARIANTS, bench_plan_key
        keys += [bench_plan_key(B, ctx, t) for B in bench_batches for ctx in bench_contexts
                 for t in (MLATuning(), *VARIANTS.values())]
    return list(dict.fromkeys((cls, cfg, tuple(specs)) for k in keys for cls, cfg, specs in mla_kernels(k)))


_FLOAT_ATOMIC = re.compile(r"^\s*(@%p\d+\s+)?(atom|red)\.[^;]*\.f(16|32|64)", re.M)


def _case_id(c):
    return (f"h{c[0].num_heads}-b{c[1]}-L{c[2]}-{'paged' if c[3] else 'contig'}-{str(c[4])[6:]}-"
            f"{'res' if c[5] else 'nores'}")


@pytest.mark.parametrize("case,tuning", [(c, None) for c in GPU_CASES] + [(TUNING_CASE, t) for t in TUNINGS[:2]]
                         + [(GPU_CASES[4], TUNINGS[4]), (GPU_CASES[2], MLATuning(pdl=False)),
                            (GPU_CASES[6], MLATuning(fuse_out=False)), (GPU_CASES[2], MLATuning(fuse_out=False))],
                         ids=[_case_id(c) for c in GPU_CASES] + TUNING_IDS[:2] + ["stage-64x2", "no-pdl",
                                                                                   "out-unfused-b9", "out-unfused-b16"])
def test_fused_kernels_compile_for_sm90a(case, tuning):
    """Every launch of the plan compiles; the PTX holds what the design relies on:
    tensor-core MMAs everywhere, DSMEM (mapa + st.async) and mbarriers in the clustered
    front / out kernels, base-2 exponentials in the attention (bulk copies into shared
    memory completing on mbarriers in the staged one), the grid barrier's integer
    acquire-release atomic between the fused out kernel's two phases, and no float
    atomics."""
    names = []
    for cls, cfg, specs in mla_kernels(_plan_key(*case, tuning=tuning)):
        ptx = compile_for_inspection(cls, cfg, specs).__ptx__
        names.append(cls.__name__)
        # programmatic dependent launch: every launch lets the next one start and waits for the
        # previous grid (which waited for its own), so the chain stays ordered (NormSlice, in
        # MLAFront, always waits: a no-op in a launch without the attribute)
        pdl = (tuning or MLATuning()).pdl
        assert ("griddepcontrol.launch_dependents" in ptx) == pdl, cls.__name__
        assert "griddepcontrol.wait" in ptx or not pdl, cls.__name__
        assert "mma.sync.aligned.m16n8k16" in ptx, cls.__name__
        assert not _FLOAT_ATOMIC.search(ptx), cls.__name__
        if cls.__name__ in ("MLAFront", "MLAOut", "SplitKGemv", "MLAOutProj"):
            assert "mapa" in ptx and "st.async" in ptx and "mbarrier" in ptx, cls.__name__
            assert "barrier.cluster" in ptx, cls.__name__
        atomics = re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.[^\s]*", ptx, re.M)
        if cls.__name__ == "MLAOutProj":
            # the grid barrier's arrival, an integer acq_rel add (traced twice with early loads: in the
            # warps that load wo tiles and in those that do not)
            assert atomics and {a.strip() for a in atomics} == {"atom.global.acq_rel.add.u32"}, atomics
            assert "ld.acquire.gpu" in ptx and "st.release.gpu" in ptx
            # W_UV tile + wo tile per warp: (slice / 32 + K slice / 32) MMA steps of 2 halves x n-tiles
            steps = cfg.out.slice // 32 + cfg.wo.k // cfg.wo.cluster_size // 32
            assert ptx.count("mma.sync.aligned.m16n8k16") == 2 * steps * cfg.out.n_tiles
        else:
            assert not atomics, (cls.__name__, atomics)
        if cls.__name__ == "MLAAttention":
            assert "ex2.approx" in ptx and "ld.global.v4" in ptx
            # scores: 18 MMA steps x 2 halves x n-tiles; the tensor-core P V adds 2 per 16 dims of a warp
            n_scores = 2 * (case[0].latent_dim // 32) * cfg.n_tiles
            n_pv = 2 * cfg.kv_lora_rank // (cfg.num_threads // 32) // 16 if cfg.tensor_core_pv else 0
            assert ptx.count("mma.sync.aligned.m16n8k16") == n_scores + n_pv
        if cls.__name__ == "MLAStagedAttention":
            assert "ex2.approx" in ptx and "mbarrier.try_wait.parity" in ptx
            assert "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes" in ptx
            assert "ld.global.v4" not in ptx          # every cache row travels by bulk copy
            # scores: k16 steps of the warp's K slice x its token n-tiles; P V: 2 per 16 dims a chunk
            ks = cfg.latent_dim // 16 // cfg.k_groups
            n_scores = ks * cfg.stage_tokens // (8 // cfg.k_groups) // 8
            n_pv = cfg.stage_tokens // 16 * 2 * (cfg.kv_lora_rank // 8 // 16)
            assert ptx.count("mma.sync.aligned.m16n8k16") == n_scores + n_pv
        if cls.__name__ == "MLAAbsorb":
            assert "rsqrt" in ptx
    attn = "MLAAttention" if tuning is not None and not tuning.staged else "MLAStagedAttention"
    tail = ["MLAOutProj"] if (tuning or MLATuning()).fuse_out else ["MLAOut", "SplitKGemv"]
    assert names == ["MLAFront", "MLAAbsorb", attn] + tail


@pytest.mark.parametrize("S", [LITE, NARROW], ids=["16heads", "8heads"])
def test_every_batch_has_a_plan(S):
    """Batch 1..16, contiguous and paged: every kernel object (and its collectives'
    layouts) builds; only compiling is left."""
    for B in range(1, 17):
        for paged in (False, True):
            for cls, cfg, specs in mla_kernels(_plan_key(S, B, 64, paged, torch.bfloat16, B % 2 == 0)):
                cls(cfg)


def test_splits_fill_the_gpu_without_tiny_ranges():
    assert mla_splits(1, 32769) == 264 and mla_splits(16, 32769) == 16
    assert mla_splits(1, 32769, waves=1) == 132 and mla_splits(16, 32769, waves=1) == 8
    assert mla_splits(1, 64) == 1 and mla_splits(3, 100) == 2 and mla_splits(1, 4097) == 65
    assert all(B * mla_splits(B, 10**6) <= 2 * 132 for B in range(1, 17))
    assert mla_splits(16, 32769, sm_count=114) == 14           # another Hopper (H100 PCIe): its own SMs
    # the staged kernel (the default): two CTAs an SM with a 2-stage ring, at most one wave a
    # request (batch 1, 2); one CTA an SM gets the deepest ring that fits
    key = _plan_key(*GPU_CASES[4])                                # batch 2, 32K
    assert (key.splits, key.stages) == (132, 2)
    assert dataclasses.replace(key, sm_count=114).splits == 114
    key = _plan_key(LITE, 1, 32769, False, torch.bfloat16, False)
    assert (key.splits, key.stages) == (132, 0)
    assert _plan_key(LITE, 16, 32769, False, torch.bfloat16, False).splits == 16
    assert _plan_key(*GPU_CASES[4], tuning=MLATuning(staged=False)).splits == 132


def _lite_case(B, L, paged, dtype, device="cpu", S=LITE, P=16):
    w, _, hidden, residual, data, table = _case(S, B, L, paged, dtype, device, P)
    return w, hidden, residual, data, table


def test_fused_bad_inputs_raise_before_any_launch():
    """Checks run before the first launch (and before any compile): CPU tensors reach
    the device check; unsupported shapes name what is unsupported; nothing is written."""
    S, B, L = LITE, 2, 64
    cos, sin = mla_rope_tables(128, S.qk_rope_head_dim, 10000.0, LITE_YARN)
    w, hidden, residual, data, table = _lite_case(B, L, False, torch.bfloat16)
    packed = pack_mla(w, S, scale=0.1)
    cache = data.clone()
    pos = torch.tensor([0, 9], dtype=torch.int32)
    cases = [
        (dict(positions=torch.tensor([0, L], dtype=torch.int32)), ValueError, "positions"),
        (dict(hidden=hidden.float(), residual=residual.float()), TypeError, "norm must be float32"),
        (dict(cache=cache[..., :-1]), ValueError, "cache"),
        (dict(), ValueError, "CUDA device"),                       # everything on the CPU
        (dict(out=torch.empty(B, S.hidden + 8, dtype=torch.bfloat16)), ValueError, "out"),
    ]
    for change, exc, msg in cases:
        args = dict(hidden=hidden, cache=cache, positions=pos, cos=cos, sin=sin, residual=residual)
        args.update(change)
        with pytest.raises(exc, match=msg):
            mla_decode(args.pop("hidden"), packed, args.pop("cache"), args.pop("positions"), args.pop("cos"),
                       args.pop("sin"), **args)
        assert torch.equal(cache, data)
    # fp32 activations pass the shared checks but the kernels take bf16/fp16 only
    w32, h32, r32, d32, _ = _lite_case(B, L, False, torch.float32)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        mla_decode(h32, pack_mla(w32, S, scale=0.1), d32, pos, cos, sin)
    # a paged cache with pages of 8 slots: a 16-token tile would cross pages
    w, hidden, residual, data, table = _lite_case(B, L, True, torch.bfloat16, P=8)
    with pytest.raises(ValueError, match="page_size"):
        mla_decode(hidden, pack_mla(w, S, scale=0.1), data, pos, cos, sin, page_table=table)
    # more than 16 heads do not fit the attention's MMA N side
    S32 = MLAShape(hidden=1024, num_heads=32)
    w, hidden, residual, data, _ = _lite_case(1, 32, False, torch.bfloat16, S=S32)
    with pytest.raises(ValueError, match="heads"):
        mla_decode(hidden, pack_mla(w, S32, scale=0.1), data, torch.zeros(1, dtype=torch.int32),
                   *mla_rope_tables(64, S32.qk_rope_head_dim, 10000.0, LITE_YARN))


def _gpu_inputs(S, B, L, paged, dtype, residual, P=16):
    """Fresh random weights, activations and cache; positions mix 0, odd lengths and
    the last slot (per request)."""
    w, hidden, res, data, table = _lite_case(B, L, paged, dtype, "cuda", S=S, P=P)
    # small h: the norm does not care, and the output is then mostly the attention's own
    # contribution (at long context it is small next to an O(1) residual stream)
    hidden, res = hidden * 0.01, res * 0.01
    # the last request at the last slot: its final 16-row tile is the one that must be
    # shifted back inside a contiguous cache whose length is not a multiple of 16
    base = [0, 21 % L, 1, L // 2 + 1]
    extra = torch.randint(0, L, (max(0, B - 1 - len(base)),)).tolist()
    positions = torch.tensor((base + extra)[: B - 1] + [L - 1], dtype=torch.int32)
    cos, sin = (t.cuda() for t in mla_rope_tables(_ROPE_ROWS, S.qk_rope_head_dim, 10000.0, LITE_YARN))
    packed = pack_mla(w, S, scale=mla_softmax_scale(S, LITE_YARN))
    return w, packed, hidden, (res if residual else None), data, table, positions, cos, sin


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_fused_matches_torch_step_and_reference(case):
    S, B, L, paged, dtype, residual = case
    w, packed, hidden, res, data, table, positions, cos, sin = _gpu_inputs(*case)
    tbl = None if table is None else table.cuda()
    # the torch step in the activation dtype (what the kernel reproduces)
    cache_t = data.clone()
    expect = mla_decode_torch(hidden, packed, cache_t, positions, cos, sin, residual=res, page_table=tbl)
    # the fp32 absorbed reference on its own copy of the cache
    ref_cache = (PagedLatentCache(data.clone(), table.long().cuda()) if paged else LatentCache(data.clone()))
    ref = mla_attention_block_absorbed(hidden, w, S, ref_cache, positions.cuda(), cos, sin, scale=packed.scale,
                                       residual=res)
    # the kernel's cache holds NaN in every slot no request may read: garbage past a
    # request's position (and in unused pages) must never reach the output
    data_k = _poison_unused_slots(data, positions, table)
    cache = data_k.clone()
    out = torch.full((B, S.hidden), float("nan"), dtype=dtype, device="cuda")
    got = mla_decode(hidden, packed, cache, positions, cos, sin, residual=res, page_table=tbl, out=out)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    assert torch.isfinite(out).all()
    # the torch step itself is 4.7e-3 (bf16) / 5.6e-4 (fp16) from the fp32 reference (CPU, L 64-4096)
    tol = 1.5e-2 if dtype == torch.bfloat16 else 3e-3
    assert _rel(out, expect) < tol, _rel(out, expect)
    assert _rel(out, ref) < 2 * tol, _rel(out, ref)
    # the attention's contribution itself is right (not hidden under the residual stream)
    h = hidden.float() + (res.float() if res is not None else 0)
    assert _rel(out.float() - h, expect.float() - h) < tol
    # cache: the appended rows equal the torch step's up to rounding, every other row untouched
    written = torch.zeros(cache.shape[:2], dtype=torch.bool, device="cuda")
    for b in range(B):
        p = int(positions[b])
        if paged:
            written[int(table[b, p // cache.shape[1]]), p % cache.shape[1]] = True
        else:
            written[b, p] = True
    assert _bits_equal(cache[~written], data_k[~written])
    rows, rows_t = cache[written].float(), cache_t[written].float()
    assert _rel(rows, rows_t) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert not torch.equal(cache[written], data[written])
    # deterministic, and no stale scratch is read: the workspace poisoned, the same inputs
    # give the same bits
    for ws in _mla_workspaces():
        for t in vars(ws).values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    cache2 = data_k.clone()
    again = mla_decode(hidden, packed, cache2, positions, cos, sin, residual=res, page_table=tbl)
    torch.cuda.synchronize()
    assert torch.equal(again, out) and _bits_equal(cache2, cache)


def _mla_workspaces():
    from cf_cute import mla
    return list(mla._workspaces.values())


def _bits_equal(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def _poison_unused_slots(data, positions, table):
    """A copy of the cache with NaN in every slot past each request's position (the
    position itself is written by the step) and in pages no request owns."""
    used = torch.zeros(data.shape[:2], dtype=torch.bool)
    for b, p in enumerate(positions.tolist()):
        t = torch.arange(p + 1)
        if table is None:
            used[b, t] = True
        else:
            used[table[b].long()[t // data.shape[1]], t % data.shape[1]] = True
    out = data.clone()
    out[~used.to(data.device)] = float("nan")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("case,tuning", [(GPU_CASES[0], None), (GPU_CASES[2], None), (GPU_CASES[2], MLATuning(pdl=False))],
                         ids=["contiguous-b1", "paged-b16", "paged-b16-no-pdl"])
def test_fused_replays_in_a_cuda_graph(case, tuning):
    """Device-side positions and page table; the captured launches rewrite a poisoned
    output to exactly the eager result on every replay (the append is idempotent);
    with programmatic dependent launches (the default) and without."""
    from cf_cute.timing import capture_graph
    S, B, L, paged, dtype, residual = case
    w, packed, hidden, res, data, table, positions, cos, sin = _gpu_inputs(*case)
    pos, tbl = positions.cuda(), (None if table is None else table.cuda())
    expect = mla_decode(hidden, packed, data.clone(), pos, cos, sin, residual=res, page_table=tbl, tuning=tuning)
    cache = data.clone()
    out = torch.empty_like(expect)
    g, _ = capture_graph(lambda: mla_decode(hidden, packed, cache, pos, cos, sin, residual=res, page_table=tbl,
                                            out=out, tuning=tuning))
    assert_replays_equal(g, out, expect)


@pytest.mark.gpu
@pytest.mark.parametrize("tuning", TUNINGS, ids=TUNING_IDS)
def test_fused_tunings_agree(tuning):
    """Other tunings give the torch step's result too, and agree with the default
    (the staged attention, ``mla_splits`` CTAs a request) up to rounding."""
    S, B, L, paged, dtype, residual = TUNING_CASE
    w, packed, hidden, res, data, table, positions, cos, sin = _gpu_inputs(*TUNING_CASE)
    tbl = None if table is None else table.cuda()
    expect = mla_decode_torch(hidden, packed, data.clone(), positions, cos, sin, residual=res, page_table=tbl)
    default = mla_decode(hidden, packed, data.clone(), positions, cos, sin, residual=res, page_table=tbl)
    cache = data.clone()
    got = mla_decode(hidden, packed, cache, positions, cos, sin, residual=res, page_table=tbl, tuning=tuning)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    tol = 1.5e-2 if dtype == torch.bfloat16 else 3e-3
    assert _rel(got, expect) < tol and _rel(default, expect) < tol
    assert _rel(got, default) < tol


@pytest.mark.gpu
def test_tiled_and_linear_weights_give_the_same_bits():
    """pack_mla's tiled order changes addresses only: the same output and cache, bit for bit."""
    case = GPU_CASES[1]
    w, packed, hidden, res, data, table, positions, cos, sin = _gpu_inputs(*case)
    tbl = None if table is None else table.cuda()
    outs, caches = [], []
    for p in (packed, pack_mla(w, case[0], scale=packed.scale, layout="linear")):
        cache = data.clone()
        outs.append(mla_decode(hidden, p, cache, positions, cos, sin, residual=res, page_table=tbl))
        caches.append(cache)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1]) and torch.equal(*caches)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [GPU_CASES[1], GPU_CASES[2]], ids=_case_id)
def test_fused_stages_match_torch(case):
    """Each launch against torch on the kernel's own inputs (the workspace after one
    step): a failure names the launch that is wrong."""
    from cf_cute import mla
    from cf_cute.reference import apply_rope
    S, B, L, paged, dtype, residual = case
    w, packed, hidden, res, data, table, positions, cos, sin = _gpu_inputs(*case)
    tbl = None if table is None else table.cuda()
    cache = data.clone()
    out = mla_decode(hidden, packed, cache, positions, cos, sin, residual=res, page_table=tbl)
    torch.cuda.synchronize()
    key = mla.mla_plan_key(hidden, packed, cache, cos, residual=res is not None, page_table=tbl)
    ws = mla._workspaces[(key, hidden.device)]
    packed = linear_mla(packed)             # torch below needs the weights in nn.Linear order
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    nq, nope, rank = S.num_heads * S.qk_head_dim, S.qk_nope_head_dim, S.kv_lora_rank
    # 1 front: y = rmsnorm(h) @ w_front.T (and h)
    h = hidden.float() + (res.float() if res is not None else 0)
    x = torch.nn.functional.rms_norm(h, (S.hidden,), packed.norm.float(), packed.eps).to(dtype)
    assert _rel(ws.y, x @ packed.w_front.T) < tol, "MLAFront"
    if res is not None:
        assert _rel(ws.h, h) < tol, "MLAFront (h)"
    # 2 absorb: qf = [W_UK q_nope | rope(q_pe)] from the kernel's y
    q = ws.y[:, :nq].view(B, S.num_heads, S.qk_head_dim)
    pos = positions.long().cuda()
    q_lat = torch.einsum("bhd,hrd->bhr", q[..., :nope], packed.w_uk)
    q_pe = apply_rope(q[..., nope:], cos[pos], sin[pos], "gptj").to(dtype)
    assert _rel(ws.qf[..., :rank], q_lat) < tol, "MLAAbsorb (q_lat)"
    assert _rel(ws.qf[..., rank:], q_pe) < tol, "MLAAbsorb (q_pe)"
    # 3 attention: the partials merged in torch against softmax(qf . lat) @ c, fp32, on the kernel's qf
    lat = cache[tbl.long()].flatten(1, 2) if paged else cache
    scores = torch.einsum("bhk,btk->bht", ws.qf.float(), lat.float()) * packed.scale
    t = torch.arange(lat.shape[1], device="cuda")
    scores = scores.masked_fill(t[None, None, :] > pos[:, None, None], float("-inf"))
    o_lat_ref = torch.einsum("bht,btr->bhr", scores.softmax(-1), lat[..., :rank].float())
    m, l = ws.part_ml[:, :, 0], ws.part_ml[:, :, 1]                      # [B, splits, heads]
    wgt = torch.where(m == float("-inf"), torch.zeros_like(m), torch.exp2(m - m.amax(1, keepdim=True)))
    o_lat = (wgt[..., None] * ws.part_o).sum(1) / (wgt * l).sum(1)[..., None]
    assert _rel(o_lat, o_lat_ref) < tol, "MLAAttention"
    # 4 out: o = W_UV o_lat (merged by the kernel, rounded to the dtype)
    o_ref = torch.einsum("bhr,hvr->bhv", o_lat.to(dtype), packed.w_uv).reshape(B, -1)
    assert _rel(ws.o, o_ref) < tol, "MLAOut"
    # 5 wo: out = h + o @ wo.T on the kernel's o
    assert _rel(out, (h + (ws.o @ packed.wo.T).float()).to(dtype)) < tol, "SplitKGemv (wo)"


def test_out_and_wo_fuse_where_the_shape_allows():
    """MLAOut and the wo GEMV are one launch when a cluster can take a head and then
    ``hidden / heads`` wo rows (a multiple of 16); otherwise the plan keeps two launches.
    Wider wo blocks than one 16-row tile a warp compile without the early loads."""
    def tail(S, B):
        key = _plan_key(S, B, 64, False, torch.bfloat16, True)
        return key, mla_kernels(key)[3:]
    for B in (1, 9, 16):
        key, k = tail(LITE, B)
        assert key.fused_out and [c.__name__ for c, _, _ in k] == ["MLAOutProj"] and k[0][1].early_loads
        key, k = tail(MLAShape(hidden=2048, num_heads=12), B)      # 2048 / 12 rows: not a whole block
        assert not key.fused_out and [c.__name__ for c, _, _ in k] == ["MLAOut", "SplitKGemv"]
    key, k = tail(LITE, 4)
    assert [c.__name__ for c, _, _ in mla_kernels(dataclasses.replace(key, tuning=MLATuning(fuse_out=False)))[3:]] \
        == ["MLAOut", "SplitKGemv"]
    key, k = tail(MLAShape(hidden=4096, num_heads=16), 16)          # 256-row wo blocks: 2 tiles a warp
    cls, cfg, specs = k[0]
    assert cls.__name__ == "MLAOutProj" and cfg.wo.block_m == 256 and not cfg.early_loads
    ptx = compile_for_inspection(cls, cfg, specs).__ptx__
    assert "atom.global.acq_rel.add.u32" in ptx and "st.async" in ptx
