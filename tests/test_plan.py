"""Static plans and compile-time validation of the cluster collectives (no GPU)."""

import pytest

from cf_cute.primitives import ClusterGather, ClusterReduce, check_grid
from cf_cute.primitives.plan import plan_fragment

import cutlass


@pytest.mark.parametrize("n,t,c,split", [(1, 128, 4, False), (4, 128, 16, False), (256, 128, 4, False),
                                         (4096, 128, 16, True), (96, 64, 3, True), (6, 32, 2, False)])
def test_fragment_plan_covers_every_word_once(n, t, c, split):
    p = plan_fragment(n, t, c, split)
    assert p is not None
    assert p.active * p.per_thread == n
    assert p.active <= t and p.per_thread % p.vec == 0
    if split:
        assert p.active % c == 0 and p.group * c == p.active


def test_reduce_auto_picks_direct_for_small_and_split_for_large():
    assert ClusterReduce(4, 16, 128).plan.algorithm == "direct"
    assert ClusterReduce(256, 4, 128).plan.algorithm == "direct"
    assert ClusterReduce(4096, 16, 128).plan.algorithm == "split"
    assert ClusterReduce(4096, 1, 128).plan.algorithm == "identity"
    assert ClusterReduce(4096, 1, 128).smem_bytes == 0


@pytest.mark.parametrize("c", [0, 17, -1, 2.0])
def test_bad_cluster_size_is_rejected(c):
    with pytest.raises(ValueError, match="cluster size"):
        ClusterReduce(256, c, 128)
    with pytest.raises(ValueError, match="cluster size"):
        ClusterGather(cutlass.Float32, 256, c, 128)


def test_grid_must_divide_by_cluster():
    check_grid(32, 16)
    with pytest.raises(ValueError, match="not divisible"):
        check_grid(12, 8)


def test_too_large_for_shared_memory_is_rejected():
    with pytest.raises(ValueError, match="shared memory"):
        ClusterReduce(4096, 16, 128, algorithm="direct")      # 16 x 16 KB x 2 stages
    with pytest.raises(ValueError, match="shared memory"):
        ClusterGather(cutlass.Float32, 4096, 16, 128)        # 16 tiles of 16 KB cannot fit
    with pytest.raises(ValueError, match="shared memory"):
        ClusterGather(cutlass.Float32, 4096, 8, 128, stages=2)
    # the same sizes fit with the split algorithm / a single stage of 8 tiles
    ClusterReduce(4096, 16, 128, algorithm="split")
    assert ClusterGather(cutlass.Float32, 4096, 8, 128).plan.stages == 1
    assert ClusterGather(cutlass.Float32, 4096, 4, 128).plan.stages == 2


def test_unlayable_fragment_is_rejected():
    with pytest.raises(ValueError, match="cannot be laid"):
        ClusterReduce(4 * 128 + 4, 2, 128)
    with pytest.raises(ValueError, match="whole number of 4-byte words"):
        ClusterGather(cutlass.BFloat16, 3, 2, 128)
    with pytest.raises(ValueError, match="reduce-scatter"):
        ClusterReduce(4, 16, 128, scatter=True)


def test_bad_op_threads_stages():
    with pytest.raises(ValueError, match="op must be"):
        ClusterReduce(256, 4, 128, op="prod")
    with pytest.raises(ValueError, match="num_threads"):
        ClusterReduce(256, 4, 100)
    with pytest.raises(ValueError, match="stages"):
        ClusterReduce(256, 4, 128, stages=3)
