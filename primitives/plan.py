"""Static plans for the cluster collectives: pure Python, no GPU, no DSL.

A plan fixes, at compile time, how a per-CTA fragment of ``num_words`` 32-bit
words is spread over the ``num_threads`` calling threads, how wide each
``st.async`` is, which algorithm moves it, and how much shared memory the
ring of receive buffers takes. Every limit that can be checked before tracing
is checked here, with an error that names the offending value.

Thread ``t`` (``t < active``) holds words ``[t * per_thread, (t + 1) * per_thread)``
of the fragment; threads ``t >= active`` hold none and read the result of
thread ``t % active``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_CLUSTER_SIZE",
    "SMEM_LIMIT_BYTES",
    "MAX_WORDS_PER_THREAD",
    "FragmentPlan",
    "plan_fragment",
    "check_cluster_size",
    "check_grid",
]

MAX_CLUSTER_SIZE = 16          # 16 is non-portable on H100; the DSL sets the attribute
SMEM_LIMIT_BYTES = 232448      # 227 KB of dynamic shared memory per CTA on sm_90
MAX_WORDS_PER_THREAD = 64      # register budget for one fragment


def check_cluster_size(cluster_size: int) -> None:
    if not isinstance(cluster_size, int) or not 1 <= cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(
            f"cluster size must be an integer in 1..{MAX_CLUSTER_SIZE}, got {cluster_size!r}"
        )


def check_grid(grid_ctas: int, cluster_size: int) -> None:
    """The grid's CTA count along the cluster dimension must be a multiple of
    the cluster size (otherwise the launch fails far from the cause)."""
    check_cluster_size(cluster_size)
    if grid_ctas <= 0 or grid_ctas % cluster_size:
        raise ValueError(
            f"grid of {grid_ctas} CTAs is not divisible by the cluster size {cluster_size}"
        )


@dataclass(frozen=True)
class FragmentPlan:
    """How one fragment is laid over the threads (see module docstring)."""

    num_words: int        # 32-bit words per CTA
    num_threads: int      # threads that call the collective
    cluster_size: int
    vec: int              # words per st.async (1, 2 or 4)
    per_thread: int       # words held by each active thread (a multiple of vec)
    active: int           # threads holding words

    @property
    def group(self) -> int:
        """Active threads per owner group in the split (reduce-scatter) layout."""
        return self.active // self.cluster_size

    @property
    def slice_words(self) -> int:
        """Words of the fragment owned by one CTA after a reduce-scatter."""
        return self.num_words // self.cluster_size


def plan_fragment(num_words: int, num_threads: int, cluster_size: int, split: bool) -> FragmentPlan | None:
    """Widest layout of ``num_words`` over ``num_threads``; with ``split`` the
    active threads must also divide evenly into ``cluster_size`` owner groups
    (so each CTA owns ``num_words / cluster_size`` words). None if impossible."""
    for vec in (4, 2, 1):
        if num_words % vec:
            continue
        if num_words // vec <= num_threads:
            per_thread, active = vec, num_words // vec
        elif num_words % (num_threads * vec) == 0:
            per_thread, active = num_words // num_threads, num_threads
        else:
            continue
        if per_thread > MAX_WORDS_PER_THREAD:
            continue
        if split and active % cluster_size:
            continue
        return FragmentPlan(num_words, num_threads, cluster_size, vec, per_thread, active)
    return None


def check_threads(num_threads: int) -> None:
    if not isinstance(num_threads, int) or num_threads <= 0 or num_threads % 32 or num_threads > 1024:
        raise ValueError(
            f"num_threads must be a multiple of 32 in 32..1024 (whole warps call the "
            f"collective), got {num_threads!r}"
        )


def check_smem(what: str, nbytes: int, limit: int = SMEM_LIMIT_BYTES) -> None:
    if nbytes > limit:
        raise ValueError(
            f"{what} needs {nbytes} B of shared memory per CTA, over the {limit} B limit "
            f"(use fewer stages, a smaller fragment, or the split algorithm)"
        )
