"""The attention block from torch against the fp32 reference (GPU), and its
input checks (CPU)."""

import dataclasses
import math

import pytest
import torch

from conftest import assert_replays_equal, make_kv_cache

from cf_cute.attention import arg_specs, attention_block, attention_block_unfused, pack_attention
from cf_cute.tiles import linear_weight
from cf_cute.fused.attention_block import AttentionBlock, AttentionBlockConfig
from cf_cute.jit import compile_for_inspection
from cf_cute.reference import AttentionWeights, ContiguousKV, PagedKV, rope_tables
from cf_cute.reference import attention_block as reference_block
from cf_cute.timing import capture_graph


def _weights(H, heads, kv_heads, hd, device, dtype):
    s = 1 / math.sqrt(H)
    return AttentionWeights(norm=(1 + 0.1 * torch.randn(H, device=device)).to(dtype),
                            wq=(torch.randn(heads * hd, H, device=device) * s).to(dtype),
                            wk=(torch.randn(kv_heads * hd, H, device=device) * s).to(dtype),
                            wv=(torch.randn(kv_heads * hd, H, device=device) * s).to(dtype),
                            wo=(torch.randn(H, heads * hd, device=device) / math.sqrt(heads * hd)).to(dtype))


def test_positions_past_the_cache_are_rejected_and_nothing_is_written():
    H, heads, kv, hd, B, L = 1024, 8, 2, 64, 2, 64
    w = pack_attention(_weights(H, heads, kv, hd, "cpu", torch.bfloat16), num_heads=heads, num_kv_heads=kv)
    kc = torch.zeros(B, L, kv, hd, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    cos, sin = rope_tables(L, hd)
    with pytest.raises(ValueError, match="positions must lie"):
        attention_block(torch.randn(B, H, dtype=torch.bfloat16), w, kc, vc,
                        torch.tensor([5, L], dtype=torch.int32), cos, sin)
    assert torch.count_nonzero(kc) == 0 and torch.count_nonzero(vc) == 0


# (heads, kv_heads, head_dim, hidden, batch, cluster, paged, residual, rope): Llama-2-7B, Llama-3-8B,
# Llama-3.2-1B and -3B shapes; the GPU tests run exactly these (benchmarks/prebuild.py compiles them)
FUSED_CASES = [
    (32, 32, 128, 4096, 1, 4, False, True, "neox"),
    (32, 32, 128, 4096, 5, 4, True, False, "neox"),
    (32, 32, 128, 4096, 16, None, False, True, "neox"),      # not resident at once: 3 launches
    (32, 8, 128, 4096, 1, 16, True, True, "neox"),
    (32, 8, 128, 4096, 16, 8, False, False, "neox"),
    (32, 8, 64, 2048, 3, 16, False, True, "gptj"),
    (24, 8, 128, 3072, 2, 8, True, True, "neox"),
]


def fused_config(heads, kv_heads, hd, H, batch, cluster, paged, residual, rope, L=1024, layout="tiled", **knobs):
    """The config ``attention_block`` plans for these operands (weights as pack_attention gives
    them; ``knobs``: AttentionTuning's fields)."""
    return AttentionBlockConfig(batch=batch, hidden=H, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                                max_len=L, max_positions=L, cluster_size=cluster or 4, paged=paged,
                                num_pages=batch * L // 16 + 5 if paged else 0, rope_style=rope,
                                has_residual=residual, w_layout=layout, **knobs)


@pytest.mark.parametrize("case", FUSED_CASES[:2] + FUSED_CASES[3:4])
def test_fused_compiles_with_dsmem_and_grid_barrier(case):
    cfg = fused_config(*case)
    assert not cfg.l2_prefetch                                   # off by default (measured slower)
    ptx = compile_for_inspection(AttentionBlock, dataclasses.replace(cfg, l2_prefetch=True), arg_specs(cfg)).__ptx__
    assert "st.async.shared::cluster" in ptx and "mma.sync.aligned.m16n8k16" in ptx
    assert "cp.async.bulk.prefetch.L2" in ptx
    if cfg.grid_sync == "barrier":                               # MHA
        assert "atom.global.acq_rel.add" in ptx                  # the grid barrier, integers only
    else:                                                        # GQA: per-head counters
        assert cfg.grid_sync == "flags" and "atom.global.release.add.u32" in ptx and "ld.acquire.gpu" in ptx
    assert "atom.global.add.f" not in ptx and "red.global.add.f" not in ptx
    assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")   # PDL: wait before any read
    assert "griddepcontrol.launch_dependents" in ptx


@pytest.mark.parametrize("case_index", [0, 5])
def test_head_o_proj_compiles_without_the_grid_barrier(case_index):
    """``o_proj="head"``: each cluster's W_o slice, partials combined by warp arrival
    counters: integer atomics only, no grid-barrier spin, the DSMEM merge as before."""
    cfg = fused_config(*FUSED_CASES[case_index], o_proj="head")
    specs = arg_specs(cfg)
    assert specs[13].shape == (cfg.partials_offset + cfg.num_kv_heads * cfg.batch * cfg.hidden,)
    assert cfg.partials_offset % 4 == 0 and cfg.partials_offset >= 2 + cfg.counter_words
    ptx = compile_for_inspection(AttentionBlock, cfg, specs).__ptx__
    assert "st.async.shared::cluster" in ptx and "mma.sync.aligned.m16n8k16" in ptx
    assert "atom.global.acq_rel.add.u32" in ptx and "ld.acquire" not in ptx
    assert "atom.global.add.f" not in ptx and "red.global.add.f" not in ptx


@pytest.mark.parametrize("case_index", [0, 1, 3])
def test_grid_flags_compile_to_per_head_polls_after_the_first_w_loads(case_index):
    """``grid_sync="flags"``: no grid barrier (no acq_rel atomic); one release-add a CTA on its
    head's counter, then each warp's first block of W_o loads before its acquire polls, and
    the counters (one a KV head) in the workspace past the barrier's two words."""
    cfg = fused_config(*FUSED_CASES[case_index], o_proj="grid", grid_sync="flags")
    specs = arg_specs(cfg)
    assert specs[13].shape == (2 + cfg.num_kv_heads,)
    ptx = compile_for_inspection(AttentionBlock, cfg, specs).__ptx__
    assert "atom.global.acq_rel" not in ptx and ptx.count("atom.global.release.add.u32") == 1
    assert "atom.global.add.f" not in ptx and "red.global.add.f" not in ptx
    add = ptx.index("atom.global.release.add.u32")
    poll = ptx.index("ld.acquire.gpu", add)
    assert ptx.count("ld.global.v4", add, poll) >= 2 * min(cfg.unroll, cfg.o_k // (cfg.num_threads // 32) // 32)
    assert ptx.index("bar.warp.sync", poll) < ptx.index("griddepcontrol.launch_dependents", poll)


def test_head_o_proj_config_errors():
    with pytest.raises(ValueError, match="o_proj must be"):
        fused_config(*FUSED_CASES[0], o_proj="rows").validate()
    with pytest.raises(ValueError, match="belong to o_proj='grid'"):
        fused_config(*FUSED_CASES[0], o_proj="head", early_phase_b=True).validate()
    with pytest.raises(ValueError, match="grid_sync must be"):
        fused_config(*FUSED_CASES[0], grid_sync="spin").validate()
    with pytest.raises(ValueError, match="early_phase_b belongs to grid_sync='barrier'"):
        fused_config(*FUSED_CASES[0], grid_sync="flags", early_phase_b=True).validate()


def test_tiled_weights_compile_to_the_same_loads():
    """The tiled order changes addresses only: the same 16-byte loads, MMAs and L2 prefetches."""
    counts = {}
    for layout in ("linear", "tiled"):
        cfg = dataclasses.replace(fused_config(*FUSED_CASES[0], layout=layout), l2_prefetch=True)
        ptx = compile_for_inspection(AttentionBlock, cfg, arg_specs(cfg)).__ptx__
        counts[layout] = [ptx.count(s) for s in ("ld.global.v4", "mma.sync", "cp.async.bulk.prefetch.L2")]
    assert counts["tiled"] == counts["linear"] and min(counts["tiled"]) > 0


@pytest.mark.parametrize("case_index", [0, 3, 5])
def test_phase_timer_compiles_to_globaltimer_stamps(case_index):
    """Every stamp bench_phases.py reads (0-12: the QKV stage and the merge split in three
    each) is written, with the grid barrier (MHA), the per-head flags (GQA) and
    o_proj="head" (GQA up to hidden 2048)."""
    cfg = dataclasses.replace(fused_config(*FUSED_CASES[case_index]), phase_timer=True)
    assert (cfg.o_proj, cfg.grid_sync) == {0: ("grid", "barrier"), 3: ("grid", "flags"), 5: ("head", "flags")}[case_index]
    specs = arg_specs(cfg)
    if cfg.o_proj == "grid":                                    # barrier state + 16 stamp words per CTA (+ flags)
        assert specs[13].shape == (2 + 16 * cfg.grid + (cfg.num_kv_heads if cfg.grid_sync == "flags" else 0),)
    ptx = compile_for_inspection(AttentionBlock, cfg, specs).__ptx__
    assert ptx.count("%globaltimer_lo") >= 13


def test_fused_config_errors():
    with pytest.raises(ValueError, match="at most 8 query heads"):
        fused_config(64, 4, 128, 4096, 1, 4, False, False, "neox").validate()
    with pytest.raises(ValueError, match="multiple of cluster_size"):
        AttentionBlock(fused_config(32, 32, 128, 4000, 1, 4, False, False, "neox"))
    with pytest.raises(ValueError, match="64-bit indexing"):            # 16 x 32769 x 32 x 128 >= 2^31
        fused_config(32, 32, 128, 4096, 16, 4, False, False, "neox", L=32769).validate()
    with pytest.raises(ValueError, match="does not fit"):              # (at the default 128 threads it fits)
        AttentionBlock(fused_config(32, 8, 128, 4096, 16, 1, False, False, "neox", num_threads=256))


def test_fused_config_threads_default():
    """128 threads a CTA when the attention runs on tensor cores (GQA), else 256; resolved in
    the config itself, so the torch API, the tests and the prebuild plan the same kernel."""
    from cf_cute.attention import AttentionTuning, attention_block_config
    assert fused_config(*FUSED_CASES[3]).num_threads == 128                            # GQA
    assert fused_config(*FUSED_CASES[3], attn_tensor_cores=False).num_threads == 256   # GQA on CUDA cores
    assert fused_config(*FUSED_CASES[0]).num_threads == 256                            # MHA
    assert fused_config(*FUSED_CASES[3], num_threads=256).num_threads == 256
    # one more step of K / V loads in flight a warp where 128 threads leave the registers for it
    assert fused_config(*FUSED_CASES[3]).attn_mma_depth == 1
    assert fused_config(*FUSED_CASES[3], num_threads=256).attn_mma_depth == 0
    assert fused_config(*FUSED_CASES[0]).attn_mma_depth == 0
    # the QKV stage's row tiles as one load pipeline at batch 1 where no 128-register cap holds
    assert fused_config(*FUSED_CASES[3]).pipeline_tiles is True
    assert fused_config(*FUSED_CASES[3], num_threads=256).pipeline_tiles is False
    assert fused_config(*FUSED_CASES[0]).pipeline_tiles is False
    assert fused_config(*FUSED_CASES[6]).pipeline_tiles is False                     # batch 2
    assert AttentionTuning().num_threads is None and AttentionTuning().pipeline_tiles is None
    heads, kv_heads, hd, H, batch, cluster, paged, residual, rope = FUSED_CASES[3]
    packed = pack_attention(_weights(H, heads, kv_heads, hd, "cpu", torch.bfloat16), num_heads=heads,
                            num_kv_heads=kv_heads, rope_style=rope)
    kc, _, table = make_kv_cache(batch, 1024, kv_heads, hd, paged, "cpu", torch.bfloat16)
    for tuning in (None, AttentionTuning(attn_tensor_cores=False)):
        cfg = attention_block_config(torch.empty(batch, H, dtype=torch.bfloat16), packed, kc,
                                     rope_tables(1024, hd, 500000.0)[0], table, cluster_size=cluster,
                                     has_residual=residual, tuning=tuning)
        assert cfg == fused_config(*FUSED_CASES[3], **dataclasses.asdict(tuning or AttentionTuning()))


def _run_case(case, fn, L=1024, positions=None, **extra):
    heads, kv_heads, hd, H, batch, cluster, paged, residual, rope = case
    dev, dt = "cuda", torch.bfloat16
    wts = _weights(H, heads, kv_heads, hd, dev, dt)
    packed = pack_attention(wts, num_heads=heads, num_kv_heads=kv_heads, rope_style=rope)
    hidden = torch.randn(batch, H, device=dev, dtype=dt)
    res = torch.randn(batch, H, device=dev, dtype=dt) if residual else None
    if positions is None:
        positions = torch.randint(0, L, (batch,), dtype=torch.int32)
        positions[0] = 0                                   # context of one token
        positions[-1] = L - 1 if batch > 1 else positions[-1]   # the whole cache
    cos, sin = rope_tables(L, hd, 500000.0)
    kc, vc, table = make_kv_cache(batch, L, kv_heads, hd, paged, dev, dt)
    ref_cache = (PagedKV(kc.float().cpu(), vc.float().cpu(), table) if paged
                 else ContiguousKV(kc.float().cpu(), vc.float().cpu()))
    cpu_w = AttentionWeights(*(t.float().cpu() for t in (wts.norm, wts.wq, wts.wk, wts.wv, wts.wo)))
    ref = reference_block(hidden.cpu(), cpu_w, ref_cache, positions, cos, sin, num_heads=heads,
                          num_kv_heads=kv_heads, residual=None if res is None else res.cpu(), rope_style=rope)
    args = (hidden, packed, kc, vc, positions, cos.to(dev), sin.to(dev))
    out = fn(*args, residual=res, page_table=table, cluster_size=cluster, **extra)
    return out, ref, kc, vc, ref_cache, args, dict(residual=res, page_table=table, cluster_size=cluster)


@pytest.mark.gpu
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_matches_reference(case):
    out, ref, kc, vc, ref_cache, _, _ = _run_case(case, attention_block)
    assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    torch.testing.assert_close(kc.float().cpu(), ref_cache.k, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(vc.float().cpu(), ref_cache.v, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_fused_is_deterministic_graph_capturable_and_writes_every_output():
    case = FUSED_CASES[1]
    out, ref, kc, vc, _, args, kw = _run_case(case, attention_block)
    hidden, packed, _, _, positions, cos, sin = args
    positions = positions.cuda()                       # device positions and table: no host sync
    if kw["page_table"] is not None:
        kw["page_table"] = kw["page_table"].cuda()
    k2, v2 = kc.clone(), vc.clone()                    # the append rewrites the same slots
    poisoned = torch.full_like(out, float("nan"))
    again = attention_block(hidden, packed, k2, v2, positions, cos, sin, out=poisoned, **kw)
    assert torch.equal(again, out) and torch.equal(k2, kc) and torch.equal(v2, vc)
    static_out = torch.full_like(out, float("nan"))
    g, _ = capture_graph(lambda: attention_block(hidden, packed, k2, v2, positions, cos, sin, out=static_out, **kw))
    assert_replays_equal(g, static_out, out)


# (function, case) run with the weights in both memory orders (cf_cute.tiles)
LAYOUT_CASES = [("fused", 1), ("unfused", None)]
LAYOUT_UNFUSED_CASE = (32, 8, 128, 4096, 16, None, True, True, "neox")


@pytest.mark.gpu
@pytest.mark.parametrize("path,case_index", LAYOUT_CASES)
def test_tiled_and_linear_weights_give_the_same_bits(path, case_index):
    """Only the addresses of the weights differ: the same outputs and cache appends, bit for bit."""
    case = FUSED_CASES[case_index] if case_index is not None else LAYOUT_UNFUSED_CASE
    fn = attention_block if path == "fused" else attention_block_unfused
    out, _, kc, vc, _, args, kw = _run_case(case, fn)
    hidden, packed, k0, v0, positions, cos, sin = args
    assert packed.layout == "tiled"
    wq, wk, wv = (w.cuda() for w in _split_qkv(packed))
    linear = pack_attention(AttentionWeights(packed.norm, wq, wk, wv, linear_weight(packed.wo, "tiled")),
                            num_heads=packed.num_heads, num_kv_heads=packed.num_kv_heads,
                            rope_style=packed.rope_style, layout="linear")
    k2, v2 = kc.clone(), vc.clone()                    # the append rewrites the same slots
    again = fn(hidden, linear, k2, v2, positions, cos, sin, out=torch.full_like(out, float("nan")), **kw)
    assert torch.isfinite(out).all() and torch.equal(again, out) and torch.equal(k2, kc) and torch.equal(v2, vc)


def _split_qkv(packed):
    """nn.Linear wq, wk, wv back from a packed (tiled) w_qkv."""
    w = linear_weight(packed.w_qkv, packed.layout)
    G = packed.num_heads // packed.num_kv_heads
    hd = w.shape[1] // (G + 2)
    H = w.shape[2]
    return (w[:, :G * hd].reshape(-1, H), w[:, G * hd:(G + 1) * hd].reshape(-1, H),
            w[:, (G + 1) * hd:].reshape(-1, H))


@pytest.mark.gpu
def test_fused_with_512_threads_matches_reference():
    from cf_cute.attention import AttentionTuning
    case = FUSED_CASES[1][:5] + (2,) + FUSED_CASES[1][6:]        # batch 5, paged, one CTA of 512 per SM
    out, ref, kc, vc, ref_cache, _, _ = _run_case(case, attention_block, tuning=AttentionTuning(num_threads=512))
    assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    torch.testing.assert_close(kc.float().cpu(), ref_cache.k, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("case_index", [3, 5])
def test_gqa_attention_knobs(case_index):
    """GQA blocks: loads in flight change speed, never bits (the attention's depth, W_o's
    first loads before the merge or the grid barrier, the QKV tiles' pipeline); the CUDA-core attention
    (``attn_tensor_cores=False``), 256-thread CTAs (eight warps: another split-K order in the
    QKV phase) and the output projection over the grid (``o_proj="grid"``: another sum order)
    match the reference too."""
    from cf_cute.attention import AttentionTuning
    case = FUSED_CASES[case_index]
    out, ref, kc, vc, ref_cache, args, kw = _run_case(case, attention_block)
    hidden, packed, k0, v0, positions, cos, sin = args
    threads = fused_config(*case).num_threads
    default = fused_config(*case)
    for tuning in (AttentionTuning(attn_mma_depth=0), AttentionTuning(o_early_loads=False),
                   AttentionTuning(pipeline_tiles=False),
                   AttentionTuning(o_proj="grid"), AttentionTuning(o_proj="grid", early_phase_b=True),
                   AttentionTuning(attn_tensor_cores=False), AttentionTuning(num_threads=256)):
        k2, v2 = kc.clone(), vc.clone()                # the append rewrites the same slots
        again = attention_block(hidden, packed, k2, v2, positions, cos, sin, out=torch.full_like(out, float("nan")),
                                tuning=tuning, **kw)
        same_threads = fused_config(*case, attn_tensor_cores=tuning.attn_tensor_cores,
                                    num_threads=tuning.num_threads).num_threads == threads
        same_o = fused_config(*case, **dataclasses.asdict(tuning)).o_proj == default.o_proj
        if tuning.attn_tensor_cores and same_threads and same_o:
            assert torch.equal(again, out), tuning
        else:
            assert (again.float().cpu() - ref).norm() / ref.norm() < 1e-2, tuning
        if same_threads:                               # the same QKV sums: the same appended bits
            assert torch.equal(k2, kc) and torch.equal(v2, vc)
        else:
            torch.testing.assert_close(k2.float().cpu(), ref_cache.k, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(v2.float().cpu(), ref_cache.v, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("case_index", [0, 1, 3, 5, 6])
def test_head_o_proj_matches_reference_and_is_deterministic(case_index):
    """``o_proj="head"`` against the fp32 reference (MHA, GQA, batch 1-5, paged, residual);
    the same bits again into a poisoned output, without the early W_o loads, with the QKV
    stage's first loads under the norm (``early_loads``), with W_o tiles staged in shared memory
    (``o_stage_tiles``), and in CUDA-graph replays (the arrival counters reset themselves)."""
    from cf_cute.attention import AttentionTuning
    head = AttentionTuning(o_proj="head")
    case = FUSED_CASES[case_index]
    out, ref, kc, vc, ref_cache, args, kw = _run_case(case, attention_block, tuning=head)
    assert torch.isfinite(out).all() and (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    torch.testing.assert_close(kc.float().cpu(), ref_cache.k, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(vc.float().cpu(), ref_cache.v, rtol=2e-2, atol=2e-2)
    hidden, packed, _, _, positions, cos, sin = args
    positions = positions.cuda()
    if kw["page_table"] is not None:
        kw["page_table"] = kw["page_table"].cuda()
    k2, v2 = kc.clone(), vc.clone()                    # the append rewrites the same slots
    for tuning in (head, AttentionTuning(o_proj="head", o_early_loads=False),
                   AttentionTuning(o_proj="head", early_loads=True), AttentionTuning(o_proj="head", o_stage_tiles=2)):
        again = attention_block(hidden, packed, k2, v2, positions, cos, sin, out=torch.full_like(out, float("nan")),
                                tuning=tuning, **kw)
        assert torch.equal(again, out) and torch.equal(k2, kc) and torch.equal(v2, vc), tuning
    static_out = torch.full_like(out, float("nan"))
    g, _ = capture_graph(lambda: attention_block(hidden, packed, k2, v2, positions, cos, sin, out=static_out,
                                                 tuning=head, **kw))
    assert_replays_equal(g, static_out, out)


@pytest.mark.gpu
@pytest.mark.parametrize("case_index", [0, 1, 3])
def test_grid_flags_give_the_grid_barrier_bits(case_index):
    """``grid_sync="flags"`` waits per head instead of at a grid barrier and streams a CTA's W_o
    tiles in one pipeline: the same sums in the same order, so the grid barrier's bits
    (MHA batch 1 and 5 paged, GQA with ``o_proj="grid"``), launch after launch and in CUDA-graph
    replays (the counters advance by C a launch and are never reset), into poisoned outputs."""
    from cf_cute.attention import AttentionTuning
    barrier = AttentionTuning(o_proj="grid", grid_sync="barrier")
    flags = AttentionTuning(o_proj="grid", grid_sync="flags")
    case = FUSED_CASES[case_index]
    out, ref, kc, vc, _, args, kw = _run_case(case, attention_block, tuning=barrier)
    assert torch.isfinite(out).all() and (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    hidden, packed, _, _, positions, cos, sin = args
    positions = positions.cuda()
    if kw["page_table"] is not None:
        kw["page_table"] = kw["page_table"].cuda()
    k2, v2 = kc.clone(), vc.clone()                    # the append rewrites the same slots
    for _ in range(3):
        again = attention_block(hidden, packed, k2, v2, positions, cos, sin, out=torch.full_like(out, float("nan")),
                                tuning=flags, **kw)
        assert torch.equal(again, out) and torch.equal(k2, kc) and torch.equal(v2, vc)
    static_out = torch.full_like(out, float("nan"))
    g, _ = capture_graph(lambda: attention_block(hidden, packed, k2, v2, positions, cos, sin, out=static_out,
                                                 tuning=flags, **kw))
    assert_replays_equal(g, static_out, out)


@pytest.mark.gpu
def test_grid_barrier_needs_every_cta_resident_at_once():
    """MHA in clusters of 8: 256 CTAs whose registers allow two an SM. The residency check
    must count them at two an SM (it counted eight by shared memory, and the grid barrier
    hung on the H200); o_proj="head" has no grid barrier and runs whatever the residency."""
    from cf_cute.attention import AttentionTuning, _resident_ctas, sm_count
    case = (32, 32, 128, 4096, 1, 8, False, True, "neox")
    cfg = fused_config(*case)
    assert AttentionBlock(cfg).ctas_per_sm == 2
    assert _resident_ctas(cfg, torch.cuda.current_device()) <= 2 * sm_count(torch.device("cuda"))
    try:
        out, ref, *_ = _run_case(case, attention_block)
        assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    except ValueError as e:
        assert "resident at once" in str(e)
    out, ref, *_ = _run_case(case, attention_block, tuning=AttentionTuning(o_proj="head"))
    assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2


def test_single_launch_policy():
    """attention_block's automatic path, as measured on an H200 (benchmarks/RESULTS.md, sessions
    13 and 16): MHA one launch up to batch 2; GQA one launch at batch 1 up to Llama-3-8B's
    hidden size and at batch 2 for Llama-3.2-1B, else three launches."""
    from cf_cute.attention import single_launch_pays
    assert [single_launch_pays(b, 4096, 32, 32) for b in (1, 2, 3)] == [True, True, False]
    shapes = ((2048, 32), (3072, 24), (4096, 32))
    assert [single_launch_pays(1, H, heads, 8) for H, heads in shapes] == [True, True, True]
    assert not single_launch_pays(1, 8192, 64, 8)                      # unmeasured: Llama-3-70B's shape
    assert [single_launch_pays(2, H, heads, 8) for H, heads in shapes] == [True, False, False]
    assert not single_launch_pays(3, 512, 8, 2)


def test_unfused_plan_sizes_divide_the_shapes():
    from cf_cute.attention import UnfusedPlan, unfused_plan
    # the sizes measured fastest on an H200 (benchmarks/RESULTS.md, session 5)
    assert unfused_plan(16, 4096, 32, 32, 128) == UnfusedPlan(qkv=None, attn=1, wo=8, wo_block_m=128)
    assert unfused_plan(16, 4096, 32, 32, 80).qkv == 8      # head_dim 80: no grid-wide QKV
    # GQA takes the tensor-core kernel: clusters of 2 (split further below batch 8, session 13),
    # then a power of two, one wave at two CTAs an SM (session 12)
    assert [unfused_plan(B, 4096, 32, 8, 128).attn for B in (1, 2, 4, 8, 16)] == [2, 2, 2, 2, 2]
    # MHA on CUDA cores: about two CTAs an SM or more, one a pair from three CTAs an SM on
    assert [unfused_plan(B, 4096, 32, 32, 128).attn for B in (1, 2, 3, 4, 8, 16)] == [8, 4, 4, 2, 2, 1]
    for B, H, heads, kv, hd in ((1, 2080, 13, 1, 160), (16, 3072, 24, 8, 128), (3, 512, 8, 2, 64)):
        p = unfused_plan(B, H, heads, kv, hd)
        assert (p.qkv is None or H % (32 * p.qkv) == 0) and (heads * hd) % (32 * p.wo) == 0 and H % p.wo_block_m == 0
        assert 1 <= p.attn <= 16 and (p.attn & (p.attn - 1)) == 0
        assert p.attn * B * kv <= 2 * 132 or p.attn == 1            # GQA: one wave at two CTAs an SM


@pytest.mark.gpu
def test_unfused_planned_matches_reference():
    """Batch 16 GQA, paged, residual: the path attention_block takes above FUSED_MAX_BATCH,
    each launch at its planned cluster size."""
    case = (32, 8, 128, 4096, 16, None, True, True, "neox")
    out, ref, kc, vc, ref_cache, _, _ = _run_case(case, attention_block_unfused)
    assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    torch.testing.assert_close(kc.float().cpu(), ref_cache.k, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(vc.float().cpu(), ref_cache.v, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_unfused_matches_reference():
    out, ref, kc, vc, ref_cache, _, _ = _run_case(FUSED_CASES[1], attention_block_unfused)
    assert (out.float().cpu() - ref).norm() / ref.norm() < 1e-2
    torch.testing.assert_close(kc.float().cpu(), ref_cache.k, rtol=2e-2, atol=2e-2)
