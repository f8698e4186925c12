"""Split-KV decode attention over a cluster (the attention core of issue 3)."""

import math

import pytest
import torch

from conftest import make_kv_cache

from cf_cute.decode_attention import DecodeAttentionTuning, arg_specs, decode_attention
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


def test_default_grid_and_threads():
    """The automatic (cluster size, threads) of a 132-SM Hopper, measured best on an H200
    (benchmarks/RESULTS.md, session 12): GQA keeps its grid to one wave at two 128-thread
    CTAs an SM and takes 256 threads where one CTA an SM holds the grid; MHA 256 threads."""
    from cf_cute.decode_attention import decode_attention_config, default_cluster_size
    m = dict(device="meta", dtype=torch.bfloat16)

    def plan(B, heads, kv):
        c = default_cluster_size(B, kv, tensor_cores=heads > kv)
        k = torch.empty(B, 1024, kv, 128, **m)
        return c, decode_attention_config(torch.empty(B, heads, 128, **m), k, k, None, c).num_threads
    assert [plan(B, 32, 8) for B in (1, 2, 4, 6, 8, 16)] == [(16, 128), (8, 128), (4, 128), (4, 128), (2, 256),
                                                            (2, 128)]
    assert [plan(B, 32, 32) for B in (1, 2, 3, 4, 8, 16)] == [(8, 256), (4, 256), (4, 256), (2, 256), (2, 256),
                                                             (1, 256)]
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


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("heads,kv_heads,hd", [(32, 32, 128), (32, 8, 128), (8, 2, 64)])
@pytest.mark.parametrize("paged", [False, True])
def test_matches_reference(cluster, heads, kv_heads, hd, paged):
    B, L = 3, 1040
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
    B, L = 3, 1040
    lengths = torch.tensor([1, 6, 1037], dtype=torch.int32, device="cuda")
    q = torch.randn(B, heads, 128, device="cuda", dtype=torch.bfloat16)
    k, v, _ = make_kv_cache(B, L, kv_heads, 128, False)
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), lengths.cpu())
    table = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    for budget in (1, 2, 8, 32):
        cfg = DecodeAttentionConfig(batch=B, num_heads=heads, num_kv_heads=kv_heads, head_dim=128, max_len=L,
                                    cluster_size=2, unroll=8, fold_budget=budget, tensor_cores=False)
        fn = compile_kernel(DecodeAttention, cfg, arg_specs(cfg))
        outs = []
        for _ in range(2):
            out = torch.full_like(q, float("nan"))
            fn(q, k, v, table, lengths, out)
            outs.append(out)
        err = (outs[0].float().cpu() - ref).norm() / ref.norm()
        assert err < 1e-2, (budget, err)
        assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,hd,threads,cluster,paged,depth", [
    (32, 8, 128, 256, 1, False, 1),   # Llama-3-8B, one CTA a (request, KV head)
    (32, 8, 128, 128, 3, True, 2),    # a cluster size that is no power of two, paged, two steps in flight
    (24, 8, 128, 64, 16, False, 0),   # G = 3, two warps, 16 CTAs: most warps have no tokens; no loads ahead
    (16, 2, 64, 256, 2, True, 3),     # G = 8 (every column of P^T), head_dim 64, three steps in flight
    (8, 4, 64, 96, 4, False, 0),      # G = 2, three warps
])
def test_tensor_core_path_matches_the_reference(heads, kv_heads, hd, threads, cluster, paged, depth):
    """The GQA tensor-core kernel (``attend_mma``) against the fp32 reference and the
    CUDA-core kernel, at lengths around its 16-token steps; poisoned output; deterministic."""
    B, L = 7, 1056
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
