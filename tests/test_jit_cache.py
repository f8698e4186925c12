"""The compile cache: in memory, on disk, keyed by everything that changes the code."""

import dataclasses

import pytest

import cf_cute.jit as jit
from cf_cute.fused.splitk_gemv import SplitKGemv, SplitKGemvConfig
from cf_cute.gemv import arg_specs
from cf_cute.jit import TensorSpec

CFG = SplitKGemvConfig(m=128, k=2048, batch=1, cluster_size=8)
ARGS = arg_specs(CFG)


def test_disk_cache_reloads_without_recompiling(tmp_path, monkeypatch):
    monkeypatch.setenv("CF_CUTE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CF_CUTE_DISK_CACHE", "1")
    jit.clear_memory_cache()
    seen = len(jit.cache_files())
    f1 = jit.compile_kernel(SplitKGemv, CFG, ARGS)
    files = list(tmp_path.rglob("*.o"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert jit.cache_files()[seen:] == files                       # the entry written is recorded
    assert jit.compile_kernel(SplitKGemv, CFG, ARGS) is f1         # memory hit
    jit.clear_memory_cache()

    def no_compile(*a, **k):
        raise AssertionError("recompiled although the disk cache had the kernel")
    monkeypatch.setattr(jit, "_compile", no_compile)
    f2 = jit.compile_kernel(SplitKGemv, CFG, ARGS)                 # disk hit
    assert callable(f2) and f2 is not f1
    assert jit.cache_files()[seen:] == files * 2                   # the entry loaded is recorded too


def test_key_changes_with_config_args_and_version(monkeypatch):
    k = jit.make_key(SplitKGemv, CFG, ARGS)
    assert jit.make_key(SplitKGemv, CFG, ARGS) == k
    assert jit.make_key(SplitKGemv, dataclasses.replace(CFG, cluster_size=4), ARGS) != k
    assert jit.make_key(SplitKGemv, CFG, ARGS[:3] + [TensorSpec("bfloat16", (1, 128), align=8)]) != k
    assert k.arch == "sm_90a" and k.dsl == jit.dsl_version() and len(k.source) == 16
    assert jit.make_key(SplitKGemv, CFG, ARGS).digest() == k.digest()


def test_corrupt_disk_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CF_CUTE_CACHE_DIR", str(tmp_path))
    jit.clear_memory_cache()
    jit.compile_kernel(SplitKGemv, CFG, ARGS)
    (obj,) = list(tmp_path.rglob("*.o"))
    obj.write_bytes(b"not an object file")
    jit.clear_memory_cache()
    assert callable(jit.compile_kernel(SplitKGemv, CFG, ARGS))
    assert obj.stat().st_size > 100


def test_config_must_be_a_dataclass():
    with pytest.raises(TypeError, match="frozen dataclass"):
        jit.make_key(SplitKGemv, {"m": 1}, ARGS)


def test_fingerprint_follows_the_kernels_imports_only():
    import cf_cute.fused.attention_block  # noqa: F401
    import cf_cute.fused.splitk_gemv  # noqa: F401
    from cf_cute.jit import _package_modules, source_fingerprint
    gemv = {m.__name__ for m in _package_modules("cf_cute.fused.splitk_gemv")}
    block = {m.__name__ for m in _package_modules("cf_cute.fused.attention_block")}
    assert "cf_cute.primitives.cluster_reduce" in gemv and "cf_cute.fused.attention_block" not in gemv
    assert {"cf_cute.fused.qkv_rope", "cf_cute.fused.decode_attention", "cf_cute.fused.rmsnorm_slice",
            "cf_cute.primitives.grid_barrier"} <= block
    assert not any(n in gemv | block for n in ("cf_cute.attention", "cf_cute.mlp", "cf_cute.runner"))
    assert source_fingerprint("cf_cute.fused.splitk_gemv") != source_fingerprint("cf_cute.fused.attention_block")
