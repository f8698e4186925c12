"""Compile once, cache in memory and on disk, call with raw torch tensors.

Every kernel of the package goes through :func:`compile_kernel`:

* the kernel object (static configuration in a frozen dataclass) is compiled
  against *fake* tensors (``cute.runtime.make_fake_compact_tensor``) with
  TVM-FFI enabled and the stream taken from the caller's environment (torch's
  current stream), for ``sm_90a`` -- so compiling needs no GPU;
* the result is keyed by :class:`CacheKey` -- kernel class, GPU arch, the
  config dataclass, the argument specs (dtype, static shape, alignment), the
  DSL version and a fingerprint of the kernel module's source and of the package
  modules it imports (``source_fingerprint``) -- and kept in a
  process-wide dict;
* it is also exported as an object file (``export_to_c``) under
  ``$CF_CUTE_CACHE_DIR`` (default ``~/.cache/cf_cute``); a later process
  reloads it with ``cute.runtime.load_module`` in milliseconds instead of
  re-tracing. ``CF_CUTE_DISK_CACHE=0`` turns the disk cache off.

The returned callable is a ``tvm_ffi.Function``: call it with torch tensors
(and Python ints for scalar arguments) in the order of the fake arguments,
stream omitted; it launches on ``torch.cuda.current_stream()``, so it works
on side streams and under CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = [
    "TensorSpec",
    "ScalarSpec",
    "compile_for_inspection",
    "CacheKey",
    "compile_kernel",
    "target_arch",
    "dsl_version",
    "source_fingerprint",
    "cache_dir",
    "clear_memory_cache",
    "cache_files",
]

_DTYPE_NAMES = ("bfloat16", "float16", "float32", "int32", "int64", "uint8", "int8")


@dataclass(frozen=True)
class TensorSpec:
    """A fake tensor: dtype name, static shape, row-major unless ``stride_order``
    (CuTe convention: 0 = fastest mode) says otherwise, base alignment in bytes."""

    dtype: str
    shape: tuple[int, ...]
    align: int = 16
    stride_order: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {self.dtype!r}")

    def fake(self):
        import cutlass.cute as cute
        order = self.stride_order or tuple(range(len(self.shape) - 1, -1, -1))
        return cute.runtime.make_fake_compact_tensor(
            _cutlass_dtype(self.dtype), self.shape, stride_order=order, assumed_align=self.align)


def _cutlass_dtype(name: str):
    import cutlass
    return {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16, "float32": cutlass.Float32,
            "int32": cutlass.Int32, "int64": cutlass.Int64, "uint8": cutlass.Uint8,
            "int8": cutlass.Int8}[name]


@dataclass(frozen=True)
class ScalarSpec:
    """A scalar argument (Int32 or Float32), passed as a Python number."""

    dtype: str = "int32"


@dataclass(frozen=True)
class CacheKey:
    kernel: str                 # module.qualname of the kernel class
    arch: str                   # e.g. "sm_90a"
    config: tuple               # sorted (field, value) pairs of the frozen config
    args: tuple                 # TensorSpec / ScalarSpec per argument
    dsl: str                    # nvidia-cutlass-dsl version
    source: str                 # fingerprint of cf_cute's sources

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def dsl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nvidia-cutlass-dsl")
    except PackageNotFoundError:       # bundle on PYTHONPATH without metadata
        import cutlass
        return getattr(cutlass, "__version__", "unknown")


def _package_modules(root: str) -> list:
    """``root`` and every package module it reaches through its globals (modules,
    and functions or classes defined in package modules), transitively."""
    import sys
    import types
    seen, todo = {}, [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in sys.modules:
            continue
        mod = sys.modules[name]
        seen[name] = mod
        for v in vars(mod).values():
            dep = v.__name__ if isinstance(v, types.ModuleType) else getattr(v, "__module__", None)
            if isinstance(dep, str) and dep.startswith("cf_cute.") and dep not in seen:
                todo.append(dep)
    return [seen[n] for n in sorted(seen)]


@functools.lru_cache(maxsize=None)
def source_fingerprint(module: str = "cf_cute.fused") -> str:
    """Hash of the source of ``module`` and of every package module it depends on
    (its imports, transitively), plus this file: the code that shapes a kernel's
    device code. Editing a host-side wrapper, or another kernel, keeps the disk
    cache of this one valid."""
    from pathlib import Path as _P
    h = hashlib.sha256()
    files = {_P(__file__)}
    for mod in _package_modules(module):
        f = getattr(mod, "__file__", None)
        if f:
            files.add(_P(f))
    for p in sorted(files):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def target_arch() -> str:
    """``sm_90a`` -- the only target. With a GPU present, it must be Hopper."""
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if (major, minor) != (9, 0):
                raise RuntimeError(
                    f"cf_cute kernels need a Hopper GPU (sm_90); this is "
                    f"{torch.cuda.get_device_name()} (sm_{major}{minor})")
    except ImportError:
        pass
    return "sm_90a"


def cache_dir() -> Path | None:
    if os.environ.get("CF_CUTE_DISK_CACHE", "1") == "0":
        return None
    root = os.environ.get("CF_CUTE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cf_cute")
    return Path(root) / dsl_version()


_memory: dict[CacheKey, Any] = {}
_lock = threading.Lock()
_files: list[Path] = []     # disk-cache entries this process loaded or wrote, in order


def cache_files() -> list[Path]:
    """The disk-cache entries this process has loaded or written, in order (for shipping
    only the entries a run needs, e.g. ``benchmarks/prebuild.py --pick``)."""
    return list(_files)


def clear_memory_cache() -> None:
    with _lock:
        _memory.clear()


def _config_items(cfg) -> tuple:
    if dataclasses.is_dataclass(cfg):
        return tuple(sorted((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)))
    raise TypeError(f"kernel config must be a frozen dataclass, got {type(cfg).__name__}")


def make_key(kernel_cls: type, cfg, args: Sequence) -> CacheKey:
    return CacheKey(
        kernel=f"{kernel_cls.__module__}.{kernel_cls.__qualname__}",
        arch=target_arch(),
        config=_config_items(cfg),
        args=tuple(args),
        dsl=dsl_version(),
        source=source_fingerprint(kernel_cls.__module__),
    )


def _fake_args(args: Sequence):
    import cutlass
    out = []
    for a in args:
        if isinstance(a, TensorSpec):
            out.append(a.fake())
        elif isinstance(a, ScalarSpec):
            out.append(cutlass.Int32(0) if a.dtype == "int32" else cutlass.Float32(0.0))
        else:
            raise TypeError(f"argument spec must be TensorSpec or ScalarSpec, got {a!r}")
    return out


def _compile(kernel_obj, args: Sequence):
    import cutlass.cute as cute
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(kernel_obj, *_fake_args(args), stream,
                        options=f"--gpu-arch {target_arch()} --enable-tvm-ffi")


_modules: list = []     # loaded object modules stay alive as long as their functions


def _disk_load(path: Path, fname: str):
    import cutlass.cute as cute
    module = cute.runtime.load_module(str(path), enable_tvm_ffi=True)
    _modules.append(module)
    return getattr(module, fname)


def compile_kernel(kernel_cls: type, cfg, args: Sequence, *, disk: bool = True) -> Callable:
    """The compiled TVM-FFI function for ``kernel_cls(cfg)`` over ``args``
    (TensorSpec / ScalarSpec, in call order, the stream excluded)."""
    key = make_key(kernel_cls, cfg, args)
    fn = _memory.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _memory.get(key)
        if fn is not None:
            return fn
        digest = key.digest()
        fname = f"cf_cute_{digest[:16]}"
        root = cache_dir() if disk else None
        path = root / f"{digest}.o" if root is not None else None
        if path is not None and path.exists():
            try:
                fn = _disk_load(path, fname)
            except Exception:       # stale or truncated entry: rebuild it
                fn = None
        if fn is None:
            compiled = _compile(kernel_cls(cfg), args)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".o", dir=path.parent)
                os.close(fd)
                compiled.export_to_c(object_file_path=tmp, function_name=fname)
                os.replace(tmp, path)
                fn = _disk_load(path, fname)
            else:
                fn = compiled
        if path is not None:
            _files.append(path)
        _memory[key] = fn
        return fn


@functools.lru_cache(maxsize=1)
def _dump_dir() -> str:
    """A process-wide scratch folder for kept PTX (the DSL otherwise writes it
    into the current directory); removed at exit."""
    import atexit
    import shutil
    d = tempfile.mkdtemp(prefix="cf_cute_ptx_")
    atexit.register(shutil.rmtree, d, True)
    return d


def compile_for_inspection(kernel_cls: type, cfg, args: Sequence):
    """Compile (no cache) keeping PTX: returns the DSL's compiled object, whose
    ``__ptx__`` holds the PTX text. For tests and for reading the code."""
    import cutlass.cute as cute
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(kernel_cls(cfg), *_fake_args(args), stream,
                        options=f"--gpu-arch {target_arch()} --enable-tvm-ffi --keep-ptx --dump-dir {_dump_dir()}")
