"""Fused decode kernels composed from the cluster primitives (``cf_cute.fused``)."""
__all__: list[str] = []
