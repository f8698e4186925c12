"""Shape rules shared by the attention kernels' configs (heads, head_dim,
batch, KV-cache layout), so every kernel accepts and rejects the same inputs
with the same messages."""

from __future__ import annotations

from cf_cute.primitives.plan import check_cluster_size

__all__ = ["AttnShape"]


class AttnShape:
    """Mixin for frozen config dataclasses with the fields batch, num_heads,
    num_kv_heads, head_dim, max_len, cluster_size, paged, page_size,
    num_pages and dtype."""

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def max_pages(self) -> int:
        return self.max_len // self.page_size

    @property
    def kv_shape(self) -> tuple:
        """Static shape of each KV cache tensor."""
        if self.paged:
            return (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        return (self.batch, self.max_len, self.num_kv_heads, self.head_dim)

    @property
    def table_shape(self) -> tuple:
        """Static shape of the page table ((1, 1) placeholder when contiguous)."""
        return (self.batch, self.max_pages) if self.paged else (1, 1)

    def validate_shape(self) -> None:
        check_cluster_size(self.cluster_size)
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be bfloat16 or float16, got {self.dtype!r}")
        if self.head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {self.head_dim}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.group > 8:
            raise ValueError(f"at most 8 query heads per KV head, got {self.group}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be in 1..16, got {self.batch}")
        n = 1
        for d in self.kv_shape:
            n *= d
        if n >= 2**31:
            raise ValueError(f"each KV cache holds {n} elements; caches of 2^31 elements or more need 64-bit "
                             f"indexing, which the kernels do not do yet (split the cache or the batch)")
        if self.paged:
            if self.page_size < 16 or self.page_size & (self.page_size - 1):
                raise ValueError(f"page_size must be a power of two >= 16, got {self.page_size}")
            if self.max_len % self.page_size or self.num_pages <= 0:
                raise ValueError("paged: max_len must be a multiple of page_size and num_pages > 0")
