"""Split-KV decode attention over a cluster (the attention core of issue 3)."""

import dataclasses
import math

import pytest
import torch

from conftest import make_kv_cache

from cf_cute.decode_attention import DecodeAttentionTuning, arg_specs, decode_attention, split_state
from cf_cute.fused.decode_attention import DecodeAttention, DecodeAttentionConfig
from cf_cute.jit import compile_for_inspection
from cf_cute.reference import decode_attention as ref_attention


@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("heads,kv_heads,hd", [(32, 32, 128), (32, 8, 128), (8, 2, 64)])
@pytest.mark.parametrize("paged", [False, True])
def test_compiles(cluster, heads, kv_heads, hd, paged):
    cfg = DecodeAttentionConfig(batch=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, max_len=1024,
                                cluster_size=cluster, paged=paged, num_pages=200 if paged else 0)
    ptx = compile_for_inspection(DecodeAttention, cfg, arg_specs(cfg)).__ptx__
    assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx
    assert ("mma.sync.aligned.m16n8k16" in ptx) == (heads != kv_heads)     # GQA on tensor cores
    if cluster > 1:
        assert "mapa.shared::cluster" in ptx and "barrier.cluster" in ptx


@pytest.mark.parametrize("tensor_cores,splits,cluster", [(True, 4, 2), (True, 3, 1), (False, 2, 4)])
def test_splits_compile(tensor_cores, splits, cluster):
    """Clusters merged through global memory: one acquire-release integer atomic a CTA
    (the arrival counter), no float atomics, and the cluster gather over DSMEM."""
    cfg = DecodeAttentionConfig(batch=2, num_heads=32, num_kv_heads=8 if tensor_cores else 32, head_dim=128,
                                max_len=1024, cluster_size=cluster, splits=splits, num_threads=256)
    assert cfg.grid == 2 * cfg.num_kv_heads * splits * cluster
    assert cfg.work_elems == 2 * cfg.num_kv_heads * splits * (cfg.group * 128 + cluster * 2 * cfg.group)
    ptx = compile_for_inspection(DecodeAttention, cfg, arg_specs(cfg)).__ptx__
    atoms = [line for line in ptx.splitlines() if "atom." in line]
    assert len(atoms) == 1 and "acq_rel.add.u32" in atoms[0], atoms
    ops = {line.split()[0] for line in ptx.splitlines() if line.strip() and not line.startswith(("/", "$", "."))}
    assert "fence.acq_rel.gpu" in ptx
    assert not any(op.startswith("red.") or (op.startswith("atom.") and ".f" in op) for op in ops), ops
    assert cluster == 1 or "mapa.shared::cluster" in ptx


@pytest.mark.parametrize("splits", [1, 4])
def test_phase_timer_stamps_past_the_workspace(splits):
    """``phase_timer`` (bench_decode_attention.py --phases): %globaltimer_lo stamps in int32
    words past the split workspace, which grows by STAMPS a CTA; off, nothing is stamped."""
    from cf_cute.fused.decode_attention import PHASES
    base = DecodeAttentionConfig(batch=1, num_heads=32, num_kv_heads=8, head_dim=128, max_len=1024,
                                 cluster_size=2, splits=splits, num_threads=256)
    cfg = dataclasses.replace(base, phase_timer=True)
    assert cfg.work_elems == base.work_elems + len(PHASES) * cfg.grid and cfg.stamp_base == base.work_elems
    ptx = compile_for_inspection(DecodeAttention, cfg, arg_specs(cfg)).__ptx__
    assert ptx.count("%globaltimer_lo") == len(PHASES)
    assert "%globaltimer" not in compile_for_inspection(DecodeAttention, base, arg_specs(base)).__ptx__


def test_default_grid_and_threads():
    """The automatic (cluster size, splits, threads) of a 132-SM Hopper, measured best on an
    H200 (benchmarks/RESULTS.md, sessions 12 and 13): GQA runs 128 CTAs of 256 threads in
    clusters of 2 (split further while the pairs are few) up to batch 8, then keeps its grid
    to one wave at two 128-thread CTAs an SM; MHA 256 threads, no splits."""
    from cf_cute.decode_attention import decode_attention_config
    m = dict(device="meta", dtype=torch.bfloat16)

    def plan(B, heads, kv, cluster=None):
        k = torch.empty(B, 1024, kv, 128, **m)
        cfg = decode_attention_config(torch.empty(B, heads, 128, **m), k, k, None, cluster)
        return cfg.cluster_size, cfg.splits, cfg.num_threads
    assert [plan(B, 32, 8) for B in (1, 2, 4, 6, 8, 16)] == [(2, 8, 256), (2, 4, 256), (2, 2, 256), (2, 1, 256),
                                                            (2, 1, 256), (2, 1, 128)]
    assert [plan(B, 32, 32) for B in (1, 2, 3, 4, 8, 16)] == [(8, 1, 256), (4, 1, 256), (4, 1, 256), (2, 1, 256),
                                                             (2, 1, 256), (1, 1, 256)]
    assert plan(1, 32, 8, 16) == (16, 1, 128)      # a forced cluster size: splits only while a wave holds them
    assert plan(2, 32, 8, 1) == (1, 8, 256)
    k = torch.empty(8, 1024, 8, 128, **m)                    # an explicit thread count is kept
    assert decode_attention_config(torch.empty(8, 32, 128, **m), k, k, None, 2,
                                   DecodeAttentionTuning(num_threads=128)).num_threads == 128


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="head_dim"):
        DecodeAttentionConfig(batch=1, num_heads=4, num_kv_heads=4, head_dim=96, max_len=16).validate()
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DecodeAttentionConfig(batch=1, num_heads=6, num_kv_heads=4, head_dim=64, max_len=16).validate()
    with pytest.raises(ValueError, match="at most 256 threads"):
        DecodeAttentionConfig(batch=1, num_heads=8, num_kv_heads=4, head_dim=64, max_len=16,
                              num_threads=512).validate()
    DecodeAttentionConfig(batch=1, num_heads=8, num_kv_heads=8, head_dim=64, max_len=16, num_threads=512).validate()
    with pytest.raises(ValueError, match="splits"):
        DecodeAttentionConfig(batch=1, num_heads=8, num_kv_heads=4, head_dim=64, max_len=16, splits=0).validate()
    with pytest.raises(ValueError, match="mma_depth"):
        DecodeAttentionConfig(batch=1, num_heads=8, num_kv_heads=4, head_dim=64, max_len=16, mma_depth=4).validate()
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 32, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="k_cache must be bfloat16"):
        decode_attention(q, k.half(), k, torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 32\]"):
        decode_attention(q, k, k, torch.tensor([3, 33], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 32\]"):
        decode_attention(q, k, k, torch.tensor([0, 3], dtype=torch.int32))
    pages = torch.randn(8, 16, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="page_table entries"):
        decode_attention(q, pages, pages, torch.tensor([3, 4], dtype=torch.int32),
                         page_table=torch.tensor([[0, 8], [1, 2]], dtype=torch.int32))


def _reference(q, k, v, lengths, table=None):
    outs = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        if table is None:
            kb, vb = k[b, :n], v[b, :n]
        else:
            P = k.shape[1]
            pages = table[b, : (n + P - 1) // P].long()
            kb, vb = k[pages].flatten(0, 1)[:n], v[pages].flatten(0, 1)[:n]
        outs.append(ref_attention(q[b], kb, vb, 1 / math.sqrt(q.shape[-1])))
    return torch.stack(outs)


# the GPU tests' shapes (gpu_test_configs() lists every kernel they compile, for benchmarks/prebuild.py)
MATCH_B, MATCH_L = 3, 1040
MATCH_SHAPES = [(32, 32, 128), (32, 8, 128), (8, 2, 64)]
TC_B, TC_L = 7, 1056
TC_CASES = [
    (32, 8, 128, 256, 1, False, 1),   # Llama-3-8B, one CTA a (request, KV head)
    (32, 8, 128, 128, 3, True, 2),    # a cluster size that is no power of two, paged, two steps in flight
    (24, 8, 128, 64, 16, False, 0),   # G = 3, two warps, 16 CTAs: most warps have no tokens; no loads ahead
    (16, 2, 64, 256, 2, True, 3),     # G = 8 (every column of P^T), head_dim 64, three steps in flight
    (8, 4, 64, 96, 4, False, 0),      # G = 2, three warps
]
SPLIT_B, SPLIT_L = 5, 1056
SPLIT_CASES = [
    (32, 8, 128, 2, 4, 256, False),   # Llama-3-8B: tensor cores, clusters of 2, four of them a pair
    (32, 8, 128, 1, 3, 128, True),    # no cluster, three splits (no power of two), paged
    (16, 2, 64, 4, 5, 96, False),     # G = 8, head_dim 64, three warps, 20 CTAs a pair
    (32, 32, 128, 2, 2, 256, True),   # MHA on CUDA cores
]


def _fold_cfg(heads, kv_heads, budget):
    return DecodeAttentionConfig(batch=MATCH_B, num_heads=heads, num_kv_heads=kv_heads, head_dim=128,
                                 max_len=MATCH_L, cluster_size=2, unroll=8, fold_budget=budget, tensor_cores=False)


def gpu_test_configs() -> list:
    """Every DecodeAttentionConfig the GPU tests below compile (planned on meta tensors
    as ``decode_attention`` plans them on a 132-SM GPU)."""
    from cf_cute.decode_attention import decode_attention_config

    def cfg(B, L, heads, kv_heads, hd, paged, cluster, tuning=DecodeAttentionTuning()):
        k, _, table = make_kv_cache(B, L, kv_heads, hd, paged, device="meta")
        return decode_attention_config(torch.empty(B, heads, hd, device="meta", dtype=torch.bfloat16), k, k,
                                       table, cluster, tuning)
    out = [cfg(MATCH_B, MATCH_L, *shape, paged, c) for c in (1, 2, 4, 8, 16) for shape in MATCH_SHAPES
           for paged in (False, True)]
    out += [_fold_cfg(heads, kv, b) for heads, kv in ((32, 8), (32, 32)) for b in (1, 2, 8, 32)]
    out += [cfg(TC_B, TC_L, heads, kv, hd, paged, c, DecodeAttentionTuning(tensor_cores=tc, num_threads=t,
                                                                            mma_depth=d))
            for heads, kv, hd, t, c, paged, d in TC_CASES for tc in (True, False)]
    out += [cfg(SPLIT_B, SPLIT_L, heads, kv, hd, paged, c, DecodeAttentionTuning(num_threads=t, splits=s))
            for heads, kv, hd, c, s, t, paged in SPLIT_CASES]
    return list(dict.fromkeys(out))


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("heads,kv_heads,hd", MATCH_SHAPES)
@pytest.mark.parametrize("paged", [False, True])
def test_matches_reference(cluster, heads, kv_heads, hd, paged):
    B, L = MATCH_B, MATCH_L
    lengths = torch.tensor([1, 7, 1037], dtype=torch.int32)          # 1, fewer than C, odd long
    q = torch.randn(B, heads, hd, device="cuda", dtype=torch.bfloat16)
    k, v, table = make_kv_cache(B, L, kv_heads, hd, paged)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, v, lengths, page_table=table, cluster_size=cluster, out=out)
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), lengths, table)
    err = (out.float().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, err
    again = decode_attention(q, k, v, lengths.cuda(), page_table=None if table is None else table.cuda(),
                             cluster_size=cluster)
    assert torch.equal(again, out)                                       # deterministic, device inputs


def _cfg(heads=32, kv_heads=8, unroll=4, fold_budget=16, cluster=1):
    return DecodeAttentionConfig(batch=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=128, max_len=1024,
                                 cluster_size=cluster, unroll=unroll, fold_budget=fold_budget, tensor_cores=False)


def test_tokens_folded_per_softmax_rescale():
    """``fold``: the largest divisor of the load group with fold x G <= fold_budget, at
    least one token; the PTX has one rescale exp2 per fold instead of one per token."""
    assert DecodeAttention(_cfg()).fold == 4                                  # G = 4, 4 tokens a group
    assert DecodeAttention(_cfg(unroll=8, fold_budget=8)).fold == 2
    assert DecodeAttention(_cfg(heads=24, unroll=8, fold_budget=8)).fold == 2  # G = 3: a divisor of 8
    assert DecodeAttention(_cfg(heads=8, kv_heads=8, unroll=8, fold_budget=1)).fold == 1
    assert DecodeAttention(_cfg(heads=32, kv_heads=4, fold_budget=4)).fold == 1    # G = 8 > the budget
    exp2 = {b: compile_for_inspection(DecodeAttention, _cfg(fold_budget=b), arg_specs(_cfg(fold_budget=b)))
            .__ptx__.count("ex2.approx") for b in (1, 16)}
    G, U, F = 4, 4, 4
    assert exp2[1] - exp2[16] == G * (U - U // F)                             # the rescales saved


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32)])
def test_folded_rescales_match_the_reference(heads, kv_heads):
    """Every fold size gives the reference's result (rounding apart) and is deterministic."""
    from cf_cute.jit import compile_kernel
    B, L = MATCH_B, MATCH_L
    lengths = torch.tensor([1, 6, 1037], dtype=torch.int32, device="cuda")
    q = torch.randn(B, heads, 128, device="cuda", dtype=torch.bfloat16)
    k, v, _ = make_kv_cache(B, L, kv_heads, 128, False)
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), lengths.cpu())
    table = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    for budget in (1, 2, 8, 32):
        cfg = _fold_cfg(heads, kv_heads, budget)
        fn = compile_kernel(DecodeAttention, cfg, arg_specs(cfg))
        outs = []
        for _ in range(2):
            out = torch.full_like(q, float("nan"))
            fn(q, k, v, table, lengths, out, *split_state(cfg, q.device))
            outs.append(out)
        err = (outs[0].float().cpu() - ref).norm() / ref.norm()
        assert err < 1e-2, (budget, err)
        assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,hd,threads,cluster,paged,depth", TC_CASES)
def test_tensor_core_path_matches_the_reference(heads, kv_heads, hd, threads, cluster, paged, depth):
    """The GQA tensor-core kernel (``attend_mma``) against the fp32 reference and the
    CUDA-core kernel, at lengths around its 16-token steps; poisoned output; deterministic."""
    B, L = TC_B, TC_L
    lengths = torch.tensor([1, 15, 16, 17, 255, 1037, 1056], dtype=torch.int32)
    q = torch.randn(B, heads, hd, device="cuda", dtype=torch.bfloat16)
    k, v, table = make_kv_cache(B, L, kv_heads, hd, paged)
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), lengths, table)
    outs = {}
    for tc in (True, True, False):
        out = torch.full_like(q, float("nan"))
        tuning = DecodeAttentionTuning(tensor_cores=tc, num_threads=threads, mma_depth=depth)
        decode_attention(q, k, v, lengths, page_table=table, cluster_size=cluster, out=out, tuning=tuning)
        if tc in outs:
            assert torch.equal(out, outs[tc])                                # deterministic
        outs[tc] = out
    for tc, out in outs.items():
        err = (out.float().cpu() - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert err.max() < 1e-2, (tc, err.max())
    assert (outs[True].float() - outs[False].float()).abs().max() < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,hd,cluster,splits,threads,paged", SPLIT_CASES)
def test_splits_match_the_reference(heads, kv_heads, hd, cluster, splits, threads, paged):
    """Clusters merged through global memory (``last_arrival``) against the fp32 reference at
    lengths where most parts are empty (1, 15) or ragged; poisoned output; the same bits on
    every call (the counters reset themselves) and in CUDA-graph replays."""
    B, L = SPLIT_B, SPLIT_L
    lengths = torch.tensor([1, 15, 257, 1037, 1056], dtype=torch.int32)
    q = torch.randn(B, heads, hd, device="cuda", dtype=torch.bfloat16)
    k, v, table = make_kv_cache(B, L, kv_heads, hd, paged)
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), lengths, table)
    tuning = DecodeAttentionTuning(num_threads=threads, splits=splits)
    dev_len = lengths.cuda()
    dev_table = None if table is None else table.cuda()
    outs = []
    for _ in range(3):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k, v, dev_len, page_table=dev_table, cluster_size=cluster, out=out, tuning=tuning)
        outs.append(out)
    err = (outs[0].float().cpu() - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert err.max() < 1e-2, err.max()
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    out = torch.full_like(q, float("nan"))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        decode_attention(q, k, v, dev_len, page_table=dev_table, cluster_size=cluster, out=out, tuning=tuning)
    for _ in range(2):
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, outs[0])
    from cf_cute.decode_attention import decode_attention_config    # "cuda" names the same workspace
    cfg = decode_attention_config(q, k, v, dev_table, cluster, tuning)
    assert split_state(cfg, "cuda")[0] is split_state(cfg, q.device)[0]
