"""Warp-level GEMV core on tensor cores: ``acc[b, row] += x[b, :] . W[row, :]``
for a 16-row tile of ``W`` and up to 16 requests, streaming ``W`` from global
memory at full bandwidth.

Decode GEMVs are bandwidth-bound; what matters is how many bytes of ``W`` each
SM keeps in flight and that every byte is used once. One ``mma.sync.m16n8k16``
(bf16/fp16 in, fp32 accumulate) takes a 16 x 16 tile of ``W`` (rows on M) and
16 x 8 of ``x`` (requests on N); the dot product does not care about the order
of ``k``, so each lane loads 16 contiguous bytes of a row and the *same*
permutation of ``k`` is applied to ``x``::

    step s (32 columns of k, 1 KB of W per warp), lane l = 4 * r + c:
        w0 = W[row0 + r,     k0 + 32 s + 8 c : +8]        16-byte global load
        w1 = W[row0 + r + 8, k0 + 32 s + 8 c : +8]        16-byte global load
        xv = sX[n,           32 s + 8 c : +8]   n = r (+ 8 for the 2nd n-tile)
        mma j = 0, 1:  A = (w0[4j:4j+2], w1[4j:4j+2], w0[4j+2:4j+4], w1[4j+2:4j+4])
                       B = (xv[4j:4j+2], xv[4j+2:4j+4])
    accumulator (per n-tile, 4 fp32):  (row0 + r, 2c), (row0 + r, 2c + 1),
                                       (row0 + r + 8, 2c), (row0 + r + 8, 2c + 1)

so ``W`` stays in its nn.Linear layout (a warp instruction reads 8 rows x 64
contiguous bytes: whole sectors) and needs no packing. Loads are issued in
blocks of ``unroll`` steps, the next block before the current one is
multiplied, so each thread has up to ``4 * unroll`` 16-byte loads in flight.

``x`` lives in shared memory as ``[n_tiles * 8, k_len + 32]`` (bf16/fp16,
rows past the batch zero): the 64-byte row padding makes the per-lane
16-byte reads conflict-free (a quarter warp touches two rows).

Weight layouts. The core indexes ``W`` only through its ``(row, k)`` layout,
so the same code streams two memory orders (:func:`weight_view`):

* ``"linear"``: nn.Linear's row-major ``[M, K]``. A warp instruction reads
  8 rows x 64 bytes, half of eight 128-byte lines.
* ``"tiled"``: each warp step's 1 KB is contiguous, in lane order::

      element (row, k), row = 16 t + 8 h + r, k = 32 s + 8 c + e
      offset = ((t * K/32 + s) * 2 + h) * 256 + (4 r + c) * 8 + e

  (``cf_cute.tiles.tile_weight`` packs it once from nn.Linear order). A 16-row
  tile's K range is one contiguous run, so an L2 prefetch of it is too.
  Measured (H200, a 12288 x 4096 GEMV over 128 CTAs, one load pipeline a
  warp): 86% of the read bandwidth against 58-72% for ``"linear"``, and
  4 steps in flight a warp are as fast as 8 (benchmarks/RESULTS.md, session 7).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync
from cutlass.experimental.primitives import cp_async_bulk_prefetch

__all__ = ["X_PAD", "WEIGHT_LAYOUTS", "check_weight_layout", "tiled_layout", "weight_view", "x_smem_layout",
           "mma_atom", "new_acc", "warp_gemv_tile", "warp_gemv_tiles", "warp_gemv_each", "warp_gemv_rows",
           "warp_gemv_tiles_shared_x", "acc_coords", "store_acc", "prefetch_rows_l2", "stage_tile", "batch_reduce",
           "reduce_scatter_rows"]

# ``x_rows``: with x in global memory (``warp_gemv_tile(..., x_rows=B)``), x is
# read from ``mX [B, K]`` (L2-resident activations) in the same blocks as W,
# rows >= B read as zero; with ``x_rows=0`` it comes from the shared buffer.

X_PAD = 32          # elements of row padding in the x buffer (64 bytes)
WEIGHT_LAYOUTS = ("linear", "tiled")


def tiled_layout(m: int, k: int, groups: int = 0):
    """``(row, k)`` -> offset of the ``"tiled"`` weight order (module docstring);
    ``m`` a multiple of 16, ``k`` of 32. ``groups > 0``: ``(group, row, k)`` over
    ``groups`` such matrices one after the other (e.g. the QKV weight per KV head,
    the same memory as tiling the ``[groups * m, k]`` matrix)."""
    if m % 16 or k % 32:
        raise ValueError(f"a tiled weight needs M % 16 == 0 and K % 32 == 0, got {m} x {k}")
    rows, cols = ((8, 2, m // 16), (32, 256, 16 * k)), ((8, 4, k // 32), (1, 8, 512))
    if groups:
        return cute.make_layout((groups, rows[0], cols[0]), stride=(m * k, rows[1], cols[1]))
    return cute.make_layout((rows[0], cols[0]), stride=(rows[1], cols[1]))


def weight_view(mW: cute.Tensor, layout: str) -> cute.Tensor:
    """``mW`` (a row-major ``[M, K]`` or ``[G, M, K]`` tensor over the weight's memory)
    as the GEMV core indexes it: itself for ``"linear"``, the same memory through
    :func:`tiled_layout` for ``"tiled"``. Call it in the host ``@cute.jit`` before the
    launch."""
    check_weight_layout(layout)
    if layout == "linear":
        return mW
    r = cute.rank(mW)
    m, k = cute.size(mW, mode=[r - 2]), cute.size(mW, mode=[r - 1])
    return cute.make_tensor(mW.iterator, tiled_layout(m, k, cute.size(mW, mode=[0]) if r == 3 else 0))


def check_weight_layout(layout: str, name: str = "w_layout") -> None:
    """``layout`` (the argument or field called ``name``) names one of :data:`WEIGHT_LAYOUTS`."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"{name} must be one of {WEIGHT_LAYOUTS}, got {layout!r}")


def batch_reduce(batch: int, rows: int, max_batch: int, cluster_size: int, num_threads: int, **kw):
    """``(ClusterReduce, frag_batch)`` for a reduce-scatter of ``batch x rows`` fp32 partial
    sums (requests on the MMA's N side): when ``batch * rows`` values do not lay over the
    threads (e.g. 9 x 128 over 256 threads; 10 x 128 do), the fragment grows by zero rows of
    padding requests up to ``max_batch`` (the n-tiles' 8 a tile); the caller leaves them
    zero and never writes them out."""
    from cf_cute.primitives import ClusterReduce
    frag_batch = batch
    while True:
        try:
            return ClusterReduce(frag_batch * rows, cluster_size, num_threads, op="sum", scatter=True, **kw), frag_batch
        except ValueError:
            if frag_batch >= max_batch:
                raise
            frag_batch += 1


@cute.jit
def reduce_scatter_rows(red, bufs, sPart: cute.Tensor, batch: cutlass.Constexpr[int],
                        frag_batch: cutlass.Constexpr[int], rows: cutlass.Constexpr[int], round_idx: Int32,
                        wait_cluster: cutlass.Constexpr[bool], put):
    """Reduce-scatter the fp32 partial sums ``sPart[b, row]`` over the cluster (``red``,
    ``bufs``: a :func:`batch_reduce` reduce and its buffers; fragment position
    ``p = b * rows + row``, padding requests ``b >= batch`` read as zero), then
    ``put(b, row, value)`` for every reduced position of a real request this CTA owns.
    ``wait_cluster``: the cluster wait pairing the caller's relaxed arrive, just before
    the first DSMEM transfer. Called by all threads of the reduce."""
    tidx = cute.arch.thread_idx()[0]
    V = red.per_thread
    frag = red.make_fragment()
    p0 = red.thread_offset(tidx)
    for v in cutlass.range_constexpr(V):
        if const_expr(frag_batch == batch):
            frag[v] = sPart[(p0 + v) // rows, (p0 + v) % rows]
        else:
            val = Float32(0.0)
            if (p0 + v) // rows < batch:
                val = sPart[(p0 + v) // rows, (p0 + v) % rows]
            frag[v] = val
    if const_expr(wait_cluster):
        cute.arch.cluster_wait()
    res = red.reduce_scatter(bufs, frag, round_idx)
    if red.owns(tidx):
        for v in cutlass.range_constexpr(V):
            p = tidx * V + v
            if const_expr(frag_batch == batch):
                put(p // rows, p % rows, res[v])
            elif p // rows < batch:
                put(p // rows, p % rows, res[v])


def _is_tiled(mW: cute.Tensor) -> bool:
    return not isinstance(mW.layout.shape[0], int)


def x_smem_layout(n_tiles: int, k_len: int):
    """Layout of the shared x buffer: ``(n_tiles * 8, k_len)`` rows padded by ``X_PAD``."""
    return cute.make_layout((n_tiles * 8, k_len), stride=(k_len + X_PAD, 1))


def mma_atom(dtype):
    return cute.make_mma_atom(cute.nvgpu.warp.MmaF16BF16Op(dtype, Float32, (16, 8, 16)))


@cute.jit
def new_acc(n_tiles: cutlass.Constexpr[int]) -> cute.Tensor:
    """Zeroed accumulators, ``n_tiles`` fragments of 4 fp32 (see module docstring)."""
    acc = cute.make_rmem_tensor(cute.make_layout((4, n_tiles)), Float32)
    acc.fill(0.0)
    return acc


@cute.jit
def acc_coords(lane: Int32, nt: cutlass.Constexpr[int], i: cutlass.Constexpr[int]):
    """(row within the 16-row tile, request) of accumulator value ``i`` of n-tile ``nt``."""
    return lane // 4 + 8 * (i // 2), nt * 8 + 2 * (lane % 4) + i % 2


@cute.jit
def store_acc(acc: cute.Tensor, dst: cute.Tensor, row0: Int32, lane: Int32, n_tiles: cutlass.Constexpr[int],
              batch: cutlass.Constexpr[int]):
    """Write this lane's accumulator values of one 16-row tile to ``dst[b, row0 + row]``
    (requests ``b >= batch``, the zero rows of the last n-tile, are skipped)."""
    for nt in cutlass.range_constexpr(n_tiles):
        for i in cutlass.range_constexpr(4):
            rl, b = acc_coords(lane, nt, i)
            if b < batch:
                dst[b, row0 + rl] = acc[i, nt]


@cute.jit
def _load_w(mW: cute.Tensor, row0: Int32, kv0: Int32, lane: Int32, s: cutlass.Constexpr[int], dst: cute.Tensor,
            slot: cutlass.Constexpr[int], mX: cute.Tensor, xdst: cute.Tensor, x_rows: cutlass.Constexpr[int],
            n_tiles: cutlass.Constexpr[int]):
    r = lane // 4
    kv = kv0 + 4 * s + lane % 4
    dst[None, 0, slot].store(cute.local_tile(mW, (1, 8), (row0 + r, kv)).load().reshape((8,)))
    dst[None, 1, slot].store(cute.local_tile(mW, (1, 8), (row0 + r + 8, kv)).load().reshape((8,)))
    if const_expr(x_rows > 0):
        _load_x(kv0, lane, s, slot, mX, xdst, x_rows, n_tiles)


@cute.jit
def _load_x(kv0: Int32, lane: Int32, s: cutlass.Constexpr[int], slot: cutlass.Constexpr[int], mX: cute.Tensor,
            xdst: cute.Tensor, x_rows: cutlass.Constexpr[int], n_tiles: cutlass.Constexpr[int]):
    """The x fragments of MMA step s (``mX [x_rows, K]`` global) into ``xdst[:, :, slot]``."""
    r = lane // 4
    kv = kv0 + 4 * s + lane % 4
    for nt in cutlass.range_constexpr(n_tiles):
        n = nt * 8 + r
        if n < x_rows:
            xdst[None, nt, slot].store(cute.local_tile(mX, (1, 8), (n, kv)).load().reshape((8,)))
        else:
            xdst[None, nt, slot].fill(0.0)


@cute.jit
def _mma_step(atom, acc: cute.Tensor, w: cute.Tensor, slot: cutlass.Constexpr[int], sX: cute.Tensor,
              lane: Int32, s: cutlass.Constexpr[int], n_tiles: cutlass.Constexpr[int], xbuf: cute.Tensor,
              x_rows: cutlass.Constexpr[int]):
    dt = w.element_type
    for nt in cutlass.range_constexpr(n_tiles):
        xr = cute.make_rmem_tensor(8, dt)
        if const_expr(x_rows > 0):
            xr.store(xbuf[None, nt, slot].load())
        else:
            xr.store(cute.local_tile(sX, (1, 8), (nt * 8 + lane // 4, 4 * s + lane % 4)).load().reshape((8,)))
        for j in cutlass.range_constexpr(2):
            a = cute.make_rmem_tensor(cute.make_layout(((2, 2, 2), 1, 1)), dt)
            b = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), dt)
            for e in cutlass.range_constexpr(2):
                a[e] = w[4 * j + e, 0, slot]
                a[2 + e] = w[4 * j + e, 1, slot]
                a[4 + e] = w[4 * j + 2 + e, 0, slot]
                a[6 + e] = w[4 * j + 2 + e, 1, slot]
                b[e] = xr[4 * j + e]
                b[2 + e] = xr[4 * j + 2 + e]
            c = acc[None, nt]
            cv = cute.make_rmem_tensor(cute.make_layout(((2, 2), 1, 1)), Float32)
            for e in cutlass.range_constexpr(4):
                cv[e] = c[e]
            cute.gemm(atom, cv, a, b, cv)
            for e in cutlass.range_constexpr(4):
                acc[e, nt] = cv[e]


@cute.jit
def warp_gemv_tile(atom, mW: cute.Tensor, row0: Int32, k0: Int32, sX: cute.Tensor, acc: cute.Tensor,
                   lane: Int32, k_steps: cutlass.Constexpr[int], n_tiles: cutlass.Constexpr[int],
                   unroll: cutlass.Constexpr[int], x_rows: cutlass.Constexpr[int] = 0, front=None):
    """``acc += W[row0:row0+16, k0:k0+32*k_steps] x X[:, k0:k0+32*k_steps]^T`` for one warp.

    ``mW`` is the whole ``[M, K]`` weight in global memory (row-major, 16-byte
    aligned rows), ``k0`` a multiple of 8, ``acc`` from :func:`new_acc`.
    ``x_rows == 0``: ``sX`` is the shared x buffer (``x_smem_layout``) whose
    column 0 is ``k0``. ``x_rows = B > 0``: ``sX`` is the global ``[B, K]``
    activation itself, read alongside W.
    ``front``: a Python callable traced right after the first block of W loads is
    issued and before anything reads x, e.g. the RMSNorm that fills ``sX``, or the grid
    barrier after which a global x (``x_rows > 0``) is complete: the first HBM round
    trip then runs under it (see :func:`_stream`).
    """
    _stream(atom, mW, [row0], [acc], k0 // 8, sX, lane, k_steps, n_tiles, unroll, x_rows, front=front)


@cute.jit
def prefetch_rows_l2(mW: cute.Tensor, row0: Int32, n_rows: cutlass.Constexpr[int], k0: Int32,
                     k_len: cutlass.Constexpr[int], lane: Int32):
    """Lanes ``0 .. n_rows-1`` of a warp ask L2 for ``W[row0 + lane, k0:k0+k_len]``
    (``cp.async.bulk.prefetch.L2``, one instruction per row, nothing waits): the
    HBM reads of a later tile start while the warp does something else. A tiled
    weight (``n_rows == 16``, ``row0`` and ``k0`` tile-aligned) is one contiguous run:
    lane i asks for its i-th sixteenth."""
    if lane < n_rows:
        if const_expr(_is_tiled(mW)):
            assert n_rows == 16, "a tiled weight is prefetched a whole 16-row tile at a time"
            off = cute.crd2idx((row0, k0), mW.layout) + lane * k_len
        else:
            off = (row0 + lane) * cute.size(mW, mode=[1]) + k0
        cp_async_bulk_prefetch(mW.iterator + off, k_len * mW.element_type.width // 8)


@cute.jit
def stage_tile(mW: cute.Tensor, row0: Int32, k0: Int32, sW: cute.Tensor, srow0: Int32, lane: Int32,
               k_steps: cutlass.Constexpr[int]):
    """Copy a warp's 16-row tile ``W[row0:row0+16, k0:k0+32*k_steps]`` into rows
    ``srow0..`` of the shared tensor ``sW`` (same ``(row, k)`` indexing, e.g. a
    :func:`tiled_layout` over shared memory) with ``cp.async``: no registers held while
    the bytes travel. Each lane copies exactly the 16-byte pieces that it reads later
    (:func:`_load_w` with ``sW`` as the weight, ``k0 = 0``), so ``cp_async_commit_group``
    then ``cp_async_wait_group(0)`` in the same lane is all the synchronisation needed."""
    atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), mW.element_type,
                               num_bits_per_copy=128)
    r = lane // 4
    for s in cutlass.range_constexpr(k_steps):
        for h in cutlass.range_constexpr(2):
            src = cute.local_tile(mW, (1, 8), (row0 + r + 8 * h, k0 // 8 + 4 * s + lane % 4))
            dst = cute.local_tile(sW, (1, 8), (srow0 + r + 8 * h, 4 * s + lane % 4))
            cute.copy(atom, cute.make_tensor(src.iterator, cute.make_layout(8)),
                      cute.make_tensor(dst.iterator, cute.make_layout(8)))


@cute.jit
def warp_gemv_tiles(atom, mW: cute.Tensor, first_tile: Int32, tile_stride: cutlass.Constexpr[int],
                    total_tiles: cutlass.Constexpr[int], count: cutlass.Constexpr[int], k0: Int32,
                    sX: cute.Tensor, lane: Int32, k_steps: cutlass.Constexpr[int], n_tiles: cutlass.Constexpr[int],
                    unroll: cutlass.Constexpr[int], x_rows: cutlass.Constexpr[int] = 0, front=None) -> cute.Tensor:
    """:func:`warp_gemv_tile` over ``count`` 16-row tiles ``first_tile + j * tile_stride``
    of ``W`` as one load pipeline: the first block of tile j+1 is loaded while tile
    j's last block is multiplied, so the warp never waits for a cold start between
    tiles. Tiles past ``total_tiles`` repeat the last tile (the caller ignores
    them). Returns the accumulators ``acc[4, n_tiles, count]`` (fp32). ``front`` as in
    :func:`warp_gemv_tile`."""
    acc = cute.make_rmem_tensor(cute.make_layout((4, n_tiles, count)), Float32)
    acc.fill(0.0)
    rows = [cutlass.min(first_tile + j * tile_stride, Int32(total_tiles - 1)) * 16 for j in range(count)]
    _stream(atom, mW, rows, [acc[None, None, j] for j in range(count)], k0 // 8, sX, lane, k_steps, n_tiles,
            unroll, x_rows, front=front)
    return acc


@cute.jit
def warp_gemv_each(atom, mW: cute.Tensor, count: cutlass.Constexpr[int], row_of, store, k0: Int32,
                   sX: cute.Tensor, lane: Int32, k_steps: cutlass.Constexpr[int], n_tiles: cutlass.Constexpr[int],
                   unroll: cutlass.Constexpr[int], front=None):
    """:func:`warp_gemv_tile` over ``count`` tiles one after the other (a dynamic loop,
    one tile's registers; each tile starts its pipeline cold): tile p starts at row
    ``row_of(p)`` and its accumulator goes to ``store(acc, p)``. With ``front`` the first
    tile is peeled off and ``front`` is traced inside it, as in :func:`warp_gemv_tile`."""
    first = 0
    if const_expr(front is not None):
        acc0 = new_acc(n_tiles)
        warp_gemv_tile(atom, mW, row_of(0), k0, sX, acc0, lane, k_steps, n_tiles, unroll, front=front)
        store(acc0, 0)
        first = 1
    for p in cutlass.range(first, count, unroll=1):
        acc = new_acc(n_tiles)
        warp_gemv_tile(atom, mW, row_of(p), k0, sX, acc, lane, k_steps, n_tiles, unroll)
        store(acc, p)


def warp_gemv_rows(atom, mW: cute.Tensor, rows: list, k0: Int32, sX: cute.Tensor, lane: Int32,
                   k_steps: cutlass.Constexpr[int], n_tiles: cutlass.Constexpr[int],
                   unroll: cutlass.Constexpr[int], front=None, done=None, staged=None, x_rows: int = 0) -> list:
    """:func:`warp_gemv_tiles` for 16-row tiles at arbitrary first rows ``rows`` (a Python
    list of row indices, any order): one load pipeline across them, x from the shared
    buffer (``x_rows = B > 0``: ``sX`` is the global ``[B, K]`` x, read alongside W as in
    :func:`warp_gemv_tile`, once per tile). Returns one accumulator per tile. ``front`` as in
    :func:`warp_gemv_tile`.
    ``done(j, acc)``, when given, is traced as soon as tile j's last MMA is issued (e.g. to
    store it), so that only the tiles in flight keep accumulator registers. ``staged``: a dict
    ``{j: (sW, srow)}`` of tiles already copied to shared memory (:func:`stage_tile`; waited
    for by ``front``), read from there at row ``srow``; tile 0 may not be staged (its loads
    run before ``front``)."""
    accs = [new_acc(n_tiles) for _ in rows]
    _stream(atom, mW, rows, accs, k0 // 8, sX, lane, k_steps, n_tiles, unroll, x_rows, front=front, done=done,
            staged=staged)
    return accs


def warp_gemv_tiles_shared_x(atom, mW: cute.Tensor, rows: list, k0: Int32, mX: cute.Tensor, lane: Int32,
                             k_steps: cutlass.Constexpr[int], n_tiles: cutlass.Constexpr[int],
                             unroll: cutlass.Constexpr[int], x_rows: cutlass.Constexpr[int], front=None) -> list:
    """:func:`warp_gemv_tile` over the 16-row tiles starting at ``rows`` (a Python list of
    row indices) in lock-step: each MMA step loads W of every tile but x (from global,
    ``x_rows`` requests) once, so a CTA that owns several tiles reads its x slice once
    instead of once per tile, and every tile's first HBM reads start at once. Measured
    (H200, the MLP's W_down, two tiles a CTA): 2% faster at batch 1, 4% slower at batch
    16, where the register blocks per tile must be halved. Returns one accumulator per tile.
    ``front`` as in :func:`warp_gemv_tile` (after every tile's first block of W loads)."""
    accs = [new_acc(n_tiles) for _ in rows]
    _stream(atom, mW, rows, accs, k0 // 8, mX, lane, k_steps, n_tiles, unroll, x_rows, lockstep=True, front=front)
    return accs


def _stream(atom, mW: cute.Tensor, rows: list, accs: list, kv0: Int32, sX: cute.Tensor, lane: Int32,
            k_steps: int, n_tiles: int, unroll: int, x_rows: int, lockstep: bool = False, front=None, done=None,
            staged=None):
    """The load pipeline behind every entry point (traced inline, all of it static):
    the tiles ``rows[j]`` one after the other (``lockstep``: all of them together,
    x loaded once per step), in blocks of ``unroll`` MMA steps over two register
    buffers, block i+1 loaded before block i is multiplied into ``accs[j]``. ``front()``,
    when given, is traced between the first block's W loads and the first MMA; a global x
    (``x_rows > 0``) of the first block is loaded after it. ``done(j, acc)`` after tile j's
    last block (not with ``lockstep``)."""
    dt = mW.element_type
    n_blocks = (k_steps + unroll - 1) // unroll
    groups = [list(range(len(rows)))] if lockstep else [[j] for j in range(len(rows))]
    seq = [(g, blk) for g in groups for blk in range(n_blocks)]
    wbufs = [cute.make_rmem_tensor(cute.make_layout((8, 2, 2 * unroll)), dt) for _ in groups[0]]
    xbuf = cute.make_rmem_tensor(cute.make_layout((8, n_tiles if x_rows > 0 else 1, 2 * unroll)), dt)

    staged = staged or {}
    assert 0 not in staged or front is None, "tile 0's first loads run before the front: it cannot be staged"

    def load(i: int, slot0: int, with_x: bool = True):
        g, blk = seq[i]
        for u in range(min(unroll, k_steps - blk * unroll)):
            for w, j in enumerate(g):        # x with the group's first tile only
                src, row, kv = (staged[j][0], staged[j][1], 0) if j in staged else (mW, rows[j], kv0)
                _load_w(src, row, kv, lane, blk * unroll + u, wbufs[w], slot0 + u, sX, xbuf,
                        x_rows if w == 0 and with_x else 0, n_tiles)

    load(0, 0, with_x=front is None)
    if front is not None:
        front()
        if x_rows > 0:                       # x may be written by the front (e.g. before a grid barrier)
            for u in range(min(unroll, k_steps)):
                _load_x(kv0, lane, u, u, sX, xbuf, x_rows, n_tiles)
    for i, (g, blk) in enumerate(seq):
        if i + 1 < len(seq):
            load(i + 1, ((i + 1) % 2) * unroll)
        for u in range(min(unroll, k_steps - blk * unroll)):
            for w, j in enumerate(g):
                _mma_step(atom, accs[j], wbufs[w], (i % 2) * unroll + u, sX, lane, blk * unroll + u, n_tiles, xbuf,
                          x_rows)
        if done is not None and blk == n_blocks - 1:
            assert not lockstep, "done() is per tile: not with lockstep"
            done(g[0], accs[g[0]])
