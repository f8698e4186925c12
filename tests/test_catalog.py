"""`python -m cf_cute compile-all`: every shipped kernel compiles for sm_90a
and its PTX holds the cluster instructions the design relies on."""

from cf_cute.__main__ import compile_all, main
from cf_cute.catalog import entries


def test_catalog_covers_every_cluster_size_and_kind():
    es = list(entries())
    assert {getattr(e.cfg, 'cluster_size', 1) for e in es} == set(range(1, 17))
    assert any(e.name.startswith('qkv_project') for e in es) and any(e.name.startswith('mla ') for e in es)
    assert {e.ptx_kind for e in es} >= {"st_async", "bulk", "global", "grid", None}
    assert len({e.name for e in es}) == len(es)
    # the blocks and the MLA step are listed as the torch API launches them: tiled weights
    blocks = [e for e in es if e.name.startswith(("attention_block", "mlp_block", "qkv_project", "mla "))]
    assert blocks and all(getattr(e.cfg, "w_layout", "tiled") == "tiled" for e in blocks)


def test_compile_all_passes(capsys):
    assert compile_all(verbose=False) == 0
    assert "kernels for sm_90a" in capsys.readouterr().out


def test_bench_without_gpu_says_so(capsys, monkeypatch):
    import cf_cute.__main__ as m
    monkeypatch.setattr(m, "_has_hopper", lambda: False)
    assert main(["bench"]) == 2
    assert "needs a Hopper" in capsys.readouterr().out
