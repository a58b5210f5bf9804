"""Top-k over host matrices larger than a kernel call: memory-mapped rows streamed in fixed-shape
chunks through `topk`, with a running `merge_topk`, so memory beyond the page cache stays at one
chunk and each chunk shape compiles once."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from engine.kernels import topk as topk_lib
from engine.kernels.topk import _choose_method, _uses_native, empty_topk, merge_topk, topk


@functools.partial(jax.jit, static_argnames=("k", "metric", "method"))
def scan_chunk(
  queries: jax.Array,
  matrix: jax.Array,
  scales: jax.Array | None,
  valid: jax.Array | None,
  offset: jax.Array,
  best_scores: jax.Array,
  best_ids: jax.Array,
  query_offset: jax.Array | None = None,
  row_weight: jax.Array | None = None,
  *,
  k: int,
  metric: str,
  method: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One step of a streamed search: top-k of a chunk, ids shifted by `offset`, merged into the best."""
  s, i = topk(
    queries,
    matrix,
    k,
    metric=metric,
    scales=scales,
    valid=valid,
    method=method,
    query_offset=query_offset,
    row_weight=row_weight,
  )
  i = jnp.where(i >= 0, i + offset, -1)
  return merge_topk(best_scores, best_ids, s, i, k)


# Share of an accelerator's free memory one streamed call may take (two chunks are in flight: the
# one computing and the next one being copied; XLA's own buffers need the rest).
DEVICE_BUDGET_FRACTION = 0.25
# Hosts: a fixed share of RAM, capped (CPU chunks alias the page cache: this bounds the scores).
HOST_BUDGET_FRACTION = 1 / 16
HOST_BUDGET_CAP = 1 << 30


def memory_budget(device: jax.Device | None = None) -> int:
  """Bytes one streamed kernel call may use on `device` (default: the first local device).

  Accelerators report their memory (`memory_stats()["bytes_limit"]`): a fixed share of what is free.
  CPUs report none: a fixed share of the host's RAM, at most HOST_BUDGET_CAP.
  """
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError, AttributeError):
    stats = None
  if stats and stats.get("bytes_limit"):
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return max(0, int(free * DEVICE_BUDGET_FRACTION))
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    ram = 8 << 30
  return min(int(ram * HOST_BUDGET_FRACTION), HOST_BUDGET_CAP)


def call_bytes(q: int, rows: int, d: int, dtype) -> int:
  """Device bytes of one streamed call over `rows` rows: the rows, scales and mask twice (the next
  chunk is copied while this one is scored), the [Q, rows] float32 scores with one more pass of
  them, and the float32 rows widened at a time (`topk.WIDEN_BLOCK_BYTES`)."""
  per_row = 2 * (d * np.dtype(dtype).itemsize + 4 + 1) + 2 * 4 * q
  return rows * per_row + topk_lib.WIDEN_BLOCK_BYTES


def chunk_rows_for(
  q: int,
  chunk_rows: int | None = None,
  dtype=None,
  method: str | None = None,
  *,
  d: int | None = None,
  budget: int | None = None,
) -> int:
  """Default rows per kernel call: sized in bytes when D is known.

  The native kernels keep only [Q, k] per call and read the rows where they lie (page cache), so
  they take 1M-row chunks (fewer calls: +4% at Q = 100 over 256K), at most `budget` bytes of rows.
  Otherwise: big chunks for one query, smaller ones for batches so the [Q, rows] float32 scores
  stay around 32-64 MB, and a power of two of rows whose `call_bytes` fit in `budget` (default
  `memory_budget()`), at least 128 rows.
  """
  if chunk_rows:
    return int(chunk_rows)
  native_path = dtype is not None and _uses_native(method or _choose_method(q, dtype, d), dtype, q)
  rows = 1 << 20 if native_path else (262144 if q <= 1 else 65536)
  if d is None or dtype is None:
    return rows
  budget = memory_budget() if budget is None else int(budget)
  if native_path:
    fit = budget // max(1, d * np.dtype(dtype).itemsize)
  else:
    fit = (budget - topk_lib.WIDEN_BLOCK_BYTES) // max(
      1, call_bytes(q, 1, d, dtype) - topk_lib.WIDEN_BLOCK_BYTES
    )
  fit = 1 << max(0, int(fit).bit_length() - 1) if fit > 0 else 0
  return max(topk_lib._BLOCK, min(rows, fit))


MIN_CHUNK_ROWS = 4096


def host_aligned(array: np.ndarray, align: int = 64) -> np.ndarray:
  """`array` itself if C-contiguous and `align`-byte aligned, else an aligned copy.

  On CPU, `jax.device_put` of aligned host memory aliases it instead of copying (measured: 15 chunks
  of 32 MB in 1 ms versus 270 ms with `jnp.asarray`); numpy's own allocations are only 16-byte
  aligned, memory maps of .npy files are page + 128-byte aligned.
  """
  if array.flags.c_contiguous and array.ctypes.data % align == 0:
    return array
  buf = np.empty(array.nbytes + align, np.uint8)
  off = (-buf.ctypes.data) % align
  out = buf[off : off + array.nbytes].view(array.dtype).reshape(array.shape)
  out[...] = array
  return out


def plan_chunks(n: int, chunk_rows: int) -> list[tuple[int, int, int]]:
  """Splits n rows into kernel calls: [(start, rows, padded_rows)].

  Full chunks of `chunk_rows`, then the tail as descending powers of two down to MIN_CHUNK_ROWS, all
  passed without a copy; only the last < MIN_CHUNK_ROWS rows are copied into a padded buffer. So a
  search compiles at most log2(chunk_rows / MIN_CHUNK_ROWS) + 1 shapes and never copies a segment.
  """
  out = []
  start = 0
  while n - start >= chunk_rows:
    out.append((start, chunk_rows, chunk_rows))
    start += chunk_rows
  size = chunk_rows // 2
  while size >= MIN_CHUNK_ROWS:
    if n - start >= size:
      out.append((start, size, size))
      start += size
    size //= 2
  if n - start > 0:
    rest = n - start
    out.append((start, rest, max(1 << (rest - 1).bit_length(), min(MIN_CHUNK_ROWS, 1024))))
  return out


def chunked_topk(
  queries: ArrayLike,
  matrix,
  k: int,
  *,
  metric: str = "cosine",
  scales=None,
  valid=None,
  chunk_rows: int | None = None,
  method: str | None = None,
  offset: int = 0,
  best: tuple[jax.Array, jax.Array] | None = None,
  query_offset=None,
  row_weight=None,
) -> tuple[jax.Array, jax.Array]:
  """`topk` over a host matrix (numpy or memory-mapped) streamed in fixed-size chunks.

  Full chunks are handed to the kernel without a copy (`jax.device_put` aliases 64-byte-aligned host
  memory on CPU, where `jnp.asarray` copies); the tail is zero-padded to the same shape and masked,
  so one compiled program serves every chunk. Peak extra memory is one chunk of scores. Chunks
  without a valid row are skipped.

  Args:
    queries: [Q, D] float.
    matrix: [N, D] host array in a storage dtype.
    k: results per query.
    metric, scales, valid, method: as in `topk` (`valid` as a host bool array).
    chunk_rows: rows per kernel call; default `chunk_rows_for` (sized in bytes for the device).
    offset: added to the returned ids (the global row of `matrix[0]`).
    best: a running [Q, k] top-k to merge into (several matrices streamed one after another).
    query_offset, row_weight: [Q] and [N] (host): the rank-one term of `topk`.

  Returns:
    scores [Q, k] float32 and ids [Q, k] int32 as `topk` (ids: rows of `matrix` plus `offset`).
  """
  q = jnp.asarray(queries, jnp.float32)
  qo = None if query_offset is None else jnp.asarray(query_offset, jnp.float32)
  n, d = matrix.shape
  if best is None:
    best = empty_topk(q.shape[0], k)
  rows_per_call = chunk_rows_for(q.shape[0], chunk_rows, matrix.dtype, method, d=d)
  for start, rows, padded in plan_chunks(n, rows_per_call):
    stop = start + rows
    va = np.ones(rows, bool) if valid is None else np.asarray(valid[start:stop], bool)
    if not va.any():
      continue
    m = matrix[start:stop]
    sc = None if scales is None else scales[start:stop]
    rw = None if row_weight is None else row_weight[start:stop]
    if padded > rows:
      m = np.concatenate([np.asarray(m), np.zeros((padded - rows, d), m.dtype)])
      sc = (
        None
        if sc is None
        else np.concatenate([np.asarray(sc), np.zeros(padded - rows, np.float32)])
      )
      va = np.concatenate([va, np.zeros(padded - rows, bool)])
      if rw is not None:
        rw = np.concatenate([np.asarray(rw), np.zeros(padded - rows, np.float32)])
    m = jax.device_put(np.asarray(m))
    sc = None if sc is None else jax.device_put(np.asarray(sc))
    rw = None if rw is None else jax.device_put(np.asarray(rw, np.float32))
    va = None if va.all() else va  # the no-mask variant is faster (bfloat16: 10x at Q = 1)
    off = np.int32(offset + start)
    best = scan_chunk(q, m, sc, va, off, *best, qo, rw, k=k, metric=metric, method=method)
  return best
