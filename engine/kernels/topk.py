"""The brute-force top-k search kernel: pure, jit-compiled and mergeable.

`topk(queries, matrix, k)` scores every row of `matrix` against every query and returns the k best
per query. It is a pure function of fixed-shape arrays, so it composes with other JAX code, and its
results merge: the top-k of a union is `merge_topk` of the per-part top-ks. That one property lets
the same kernel serve a whole in-RAM matrix, chunks of memory-mapped segments streamed with a
running merge (`kernels.streaming`) and a matrix sharded over a device mesh (`kernels.sharded`).

Scores are "higher is better" everywhere:
  * `metric="cosine"`: the inner product of the L2-normalised query with the stored rows (rows are
    expected to be L2-normalised already; the store normalises on `add`).
  * `metric="l2"`: minus the squared euclidean distance, so the same max-top-k and merge apply.
    Negate it to get distances.

Storage dtypes: float32, float16, bfloat16 and int8 (symmetric, one float32 scale per row, passed as
`scales`). Each (dtype, Q) has a default method (`_choose_method`); where the CPU has the
instructions for it, the native fused scan + top-k of `engine.kernels.native` runs instead of
XLA's product (`_uses_native`) and never writes the [Q, N] scores. The measurements behind these
choices, per CPU, are in BUILD.md. Scales, tombstones and filters are folded into one pass over
the scores (a per-row scale and a per-row 0/-inf bias), a per-query int8 scale is applied after
the selection, and the selection is an exact two-stage block-max top-k: elementwise XLA loops over
the [Q, N] scores are slow next to the products.

Rows with `valid == False` (tombstones, filters, padding) never appear in the output. When fewer than
k rows are valid, the missing columns hold score -inf and id -1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from engine.kernels import native

METRICS = ("cosine", "l2")
# Row blocks for the exact two-stage selection: block maxima, top-k blocks, then top-k of their rows.
_BLOCK = 128

_DN = (((1,), (1,)), ((), ()))  # contract the feature axis of [Q, D] with [N, D]
# The AVX-512 bfloat16 and float16 kernels serve only the memory-bound few-query loop: vdpbf16ps ran
# at 76 GOP/s per core on the project's CPU (vpdpbusd: 760), below XLA's product on widened rows.
# Their AVX2 loops widen the rows once and run float32 FMA for any number of queries.
_NATIVE_FEW_Q = 8
# Rows widened to float32 at a time by the XLA products of float16 rows (see `_widened_dot`).
WIDEN_BLOCK_BYTES = 32 << 20
_NARROW = (jnp.float16, jnp.bfloat16, jnp.int8)


def _bits_to_f32(u32: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(u32, jnp.float32)


def decode(matrix: jax.Array) -> jax.Array:
  """Widens a storage-dtype matrix to float32 (int8 without its scales).

  Args:
    matrix: [N, D] float32, float16, bfloat16 or int8.

  Returns:
    [N, D] float32, exact (every storage value is representable in float32).
  """
  dt = matrix.dtype
  if dt == jnp.float32:
    return matrix
  if dt == jnp.bfloat16:
    u = lax.bitcast_convert_type(matrix, jnp.uint16).astype(jnp.uint32)
    return _bits_to_f32(u << 16)
  if dt == jnp.float16:
    # Rebias the exponent with integer ops (exact for normal halves); subnormal halves are
    # mantissa * 2**-24, computed in float so a denormals-are-zero CPU mode cannot flush them.
    u = lax.bitcast_convert_type(matrix, jnp.uint16).astype(jnp.uint32)
    normal = _bits_to_f32(((u & 0x7FFF) << 13) + (112 << 23))
    sub = (u & 0x3FF).astype(jnp.float32) * jnp.float32(2.0**-24)
    mag = jnp.where((u & 0x7C00) == 0, sub, normal)
    sign = (u & 0x8000) << 16
    return _bits_to_f32(lax.bitcast_convert_type(mag, jnp.uint32) | sign)
  if dt == jnp.int8:
    return matrix.astype(jnp.float32)
  raise TypeError(f"unsupported storage dtype {dt}")


def _choose_method(q: int, dtype, d: int | None) -> str:
  # XLA's fused convert-multiply-reduce streams int8 and bfloat16 rows faster than its dot with one
  # query; float32 takes the library matrix product; the native kernels win where they run
  # (BUILD.md has the measurements per CPU).
  if dtype == jnp.float32 or dtype == jnp.float16:
    return "f32"  # float16: the native kernel where `_uses_native` says so
  if dtype == jnp.int8:
    return "int8"  # the native kernel where available; XLA pads one query to two
  if _uses_native("bf16", dtype, q, d):
    return "bf16"  # the native kernel, float32-accurate queries
  return "reduce" if q == 1 else "bf16"


def _quantize_queries(q: jax.Array) -> tuple[jax.Array, jax.Array]:
  amax = jnp.max(jnp.abs(q), axis=1, keepdims=True)
  qscale = jnp.where(amax > 0, amax / 127.0, 1.0)
  return jnp.round(q / qscale).astype(jnp.int8), qscale


def _widen(matrix: jax.Array) -> jax.Array:
  # A plain convert keeps int8/bfloat16 inside the fast fused reduce; float16 needs the bit decode.
  if matrix.dtype in (jnp.int8, jnp.bfloat16):
    return matrix.astype(jnp.float32)
  return decode(matrix)


def _f32_dot(queries: jax.Array, rows: jax.Array) -> jax.Array:
  return lax.dot_general(
    queries, rows, _DN, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
  )


def _by_row_blocks(fn, matrix: jax.Array, widened=(jnp.float16,)) -> jax.Array:
  """`fn(matrix)` for an `fn` of [n, D] rows -> [..., n], computed over blocks of rows whose float32
  copies hold at most WIDEN_BLOCK_BYTES, for a matrix of one of the `widened` dtypes.

  XLA materialises the widened copy of a float16 matrix (the bit decode) before a product or a
  reduction, and of any storage dtype before a product or a loop over queries: on an accelerator,
  a whole chunk of device memory. A single reduction of int8 or bfloat16 widens inside its loop.
  """
  n, d = matrix.shape
  block = max(_BLOCK, 1 << max(0, (WIDEN_BLOCK_BYTES // (4 * d)).bit_length() - 1))
  nb = n // block
  if matrix.dtype not in widened or nb <= 1:
    return fn(matrix)
  head = lax.map(fn, matrix[: nb * block].reshape(nb, block, d))  # [nb, ..., block]
  head = jnp.moveaxis(head, 0, -2)
  head = head.reshape(*head.shape[:-2], nb * block)
  if nb * block < n:
    head = jnp.concatenate([head, fn(matrix[nb * block :])], axis=-1)
  return head


def inner_products(
  queries: jax.Array,
  matrix: jax.Array,
  scales: jax.Array | None,
  method: str,
  row_bias: jax.Array | None = None,
  defer_query_scale: bool = False,
):
  """[Q, D] float32 x [N, D] storage -> [Q, N] float32 inner products with the dequantised rows.

  Methods: "reduce" streams the matrix once per query (2-D multiply-reduce; a 3-D broadcast form of
  the same thing was 100x slower); "f32" widens to float32 and runs a float32 product; "bf16" (for a
  bfloat16 matrix) rounds the queries to bf16 and runs the bf16 product with float32 accumulation
  (scores carry the queries' rounding, ~1e-3); "bf16x2" splits each query into bf16 high and low
  parts (two products, accurate to ~1e-5); "int8" quantises the queries to int8 (scores then carry the
  queries' rounding error, ~1e-3) and runs the int8 x int8 product with int32 accumulation
  ("int8-xla" is the same; in `topk`, "int8" runs the native CPU kernel where it is available).
  """
  if method == "reduce":
    if queries.shape[0] == 1:
      s = _by_row_blocks(lambda rows: jnp.sum(_widen(rows) * queries[0], axis=1), matrix)[None]
    else:
      # XLA hoists the loop-invariant widening out of the loop: block the rows.
      s = _by_row_blocks(
        lambda rows: lax.map(lambda q: jnp.sum(_widen(rows) * q, axis=1), queries),
        matrix,
        _NARROW,
      )
  elif method in ("f32", "f32-xla"):
    s = _by_row_blocks(lambda rows: _f32_dot(queries, _widen(rows)), matrix, _NARROW)
  elif method in ("bf16", "bf16-xla"):
    if matrix.dtype != jnp.bfloat16:
      raise ValueError(f"method={method!r} needs a bfloat16 matrix")
    qb = queries.astype(jnp.bfloat16)
    if qb.shape[0] == 1:  # XLA's bf16 product with one query widens the whole matrix first
      qb = jnp.concatenate([qb, jnp.zeros_like(qb)])
    s = lax.dot_general(qb, matrix, _DN, preferred_element_type=jnp.float32)
    s = s[: queries.shape[0]]
  elif method == "bf16x2":
    if matrix.dtype != jnp.bfloat16:
      raise ValueError("method='bf16x2' needs a bfloat16 matrix")
    hi = queries.astype(jnp.bfloat16)
    lo = (queries - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    both = jnp.concatenate([hi, lo], axis=0)
    s2 = lax.dot_general(both, matrix, _DN, preferred_element_type=jnp.float32)
    s = s2[: queries.shape[0]] + s2[queries.shape[0] :]
  elif method in ("int8", "int8-xla"):
    if matrix.dtype != jnp.int8:
      raise ValueError(f"method={method!r} needs an int8 matrix")
    q8, qscale = _quantize_queries(queries)
    if q8.shape[0] == 1:  # XLA's int8 product with one query runs at 0.9 GB/s; with two at ~11
      q8 = jnp.concatenate([q8, jnp.zeros_like(q8)])
    s = lax.dot_general(q8, matrix, _DN, preferred_element_type=jnp.int32).astype(jnp.float32)
    s = s[: queries.shape[0]]
  else:
    raise ValueError(f"unknown method {method!r}")
  # One elementwise pass over the [Q, N] scores: XLA's own (non-library) loops ran at only ~1 GB/s
  # on this CPU, so every extra pass over the scores costs about as much as the product itself.
  if scales is not None:
    s = s * scales[None, :]
  if row_bias is not None:
    s = s + row_bias[None, :]
  if method in ("int8", "int8-xla"):
    if defer_query_scale:
      return s, qscale  # a positive per-query factor: apply it after the selection
    s = s * qscale
  return (s, None) if defer_query_scale else s


def _sq_norms(matrix: jax.Array, scales: jax.Array | None) -> jax.Array:
  def norms(rows):
    x = _widen(rows)
    return jnp.sum(x * x, axis=1)

  n = _by_row_blocks(norms, matrix)
  if scales is not None:
    n = n * (scales * scales)
  return n


def _select(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k along the last axis; [Q, N] -> [Q, k] (k <= N)."""
  q, n = scores.shape
  nblocks = n // _BLOCK
  if n % _BLOCK or nblocks < 4 * k:
    return lax.top_k(scores, k)
  # Every member of the top k lies in a block whose maximum is among the k largest block maxima, so
  # the two-stage selection is exact; it reads the scores once instead of running top_k over all.
  blocks = scores.reshape(q, nblocks, _BLOCK)
  _, bi = lax.top_k(jnp.max(blocks, axis=-1), k)
  cand = jnp.take_along_axis(blocks, bi[:, :, None], axis=1).reshape(q, k * _BLOCK)
  v, j = lax.top_k(cand, k)
  ids = jnp.take_along_axis(bi, j // _BLOCK, axis=1) * _BLOCK + j % _BLOCK
  return v, ids


def _pad_k(scores: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  short = k - scores.shape[1]
  if short <= 0:
    return scores, ids
  q = scores.shape[0]
  return (
    jnp.concatenate([scores, jnp.full((q, short), -jnp.inf, scores.dtype)], axis=1),
    jnp.concatenate([ids, jnp.full((q, short), -1, ids.dtype)], axis=1),
  )


@functools.partial(jax.jit, static_argnames=("k", "metric", "method"))
def topk(
  queries: ArrayLike,
  matrix: ArrayLike,
  k: int,
  *,
  metric: str = "cosine",
  scales: ArrayLike | None = None,
  valid: ArrayLike | None = None,
  method: str | None = None,
  query_offset: ArrayLike | None = None,
  row_weight: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The k best rows of `matrix` for each query.

  Args:
    queries: [Q, D] float; normalised here for `metric="cosine"`.
    matrix: [N, D] float32, float16, bfloat16 or int8 (rows L2-normalised for cosine).
    k: number of results per query (static); may exceed N.
    metric: "cosine" (inner product with the normalised query) or "l2" (minus squared distance).
    scales: [N] float32 per-row scales of an int8 matrix (row = int8 * scale); None for floats.
    valid: [N] bool, False for rows that must not be returned (tombstones, filters, padding).
    method: "reduce", "f32", "bf16", "bf16x2", "int8", or "f32-xla" / "bf16-xla" / "int8-xla" (see
      `inner_products`; "int8", and "bf16" / "f32" on bfloat16 / float16 rows (Q <= 8, or any Q
      on the AVX2 path), run the native fused kernels where `engine.kernels.native` has them, the
      "-xla" forms never); None picks the fastest measured for Q and the dtype.
    query_offset, row_weight: [Q] and [N] float32, given together (cosine only): every score
      gains `query_offset[q] * row_weight[r]`, added to the scores of the normalised queries (a
      rank-one term: collection statistics, `engine.store.statistics`), in the native kernels
      as in XLA's products.

  Returns:
    scores: [Q, k] float32, best first (-inf where fewer than k rows are valid).
    ids: [Q, k] int32 row numbers into `matrix` (-1 with a -inf score).
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  if (query_offset is None) != (row_weight is None) or (
    query_offset is not None and metric != "cosine"
  ):
    raise ValueError("query_offset and row_weight go together, with metric='cosine'")
  queries = jnp.asarray(queries, jnp.float32)
  matrix = jnp.asarray(matrix)
  if queries.ndim != 2 or matrix.ndim != 2 or queries.shape[1] != matrix.shape[1]:
    raise ValueError(f"shapes {queries.shape} and {matrix.shape}: expected [Q, D] and [N, D]")
  if metric == "cosine":
    norm = jnp.linalg.norm(queries, axis=1, keepdims=True)
    queries = queries / jnp.where(norm > 0, norm, 1.0)
  method = method or _choose_method(queries.shape[0], matrix.dtype, matrix.shape[1])
  n = matrix.shape[0]
  if n == 0:
    return _pad_k(
      jnp.zeros((queries.shape[0], 0), jnp.float32), jnp.zeros((queries.shape[0], 0), jnp.int32), k
    )
  valid = None if valid is None else jnp.asarray(valid, bool)
  offsets = None
  if query_offset is not None:
    offsets = (jnp.asarray(query_offset, jnp.float32), jnp.asarray(row_weight, jnp.float32))
  if _uses_native(method, matrix.dtype, queries.shape[0], matrix.shape[1]):
    # The fused kernel runs on CPUs; other platforms lower XLA's product (same ranking).
    return lax.platform_dependent(
      queries,
      matrix,
      scales,
      valid,
      offsets,
      cpu=functools.partial(_topk_native, k=k, metric=metric),
      default=functools.partial(_topk_xla, k=k, metric=metric, method=f"{method}-xla"),
    )
  return _topk_xla(queries, matrix, scales, valid, offsets, k=k, metric=metric, method=method)


def _topk_xla(queries, matrix, scales, valid, offsets=None, *, k, metric, method):
  n = matrix.shape[0]
  # Tombstones and filters become a per-row additive -inf, folded into the scores' single pass.
  bias = None if valid is None else jnp.where(valid, 0.0, -jnp.inf)
  if offsets is not None:
    s = inner_products(queries, matrix, scales, method, bias)
    s = s + offsets[0][:, None] * offsets[1][None, :]
    post = None
  elif metric == "l2":
    s = inner_products(queries, matrix, scales, method)
    qn = jnp.sum(queries * queries, axis=1, keepdims=True)
    sq = _sq_norms(matrix, scales)
    s = 2.0 * s - (sq if bias is None else sq - bias)[None, :] - qn
    post = None
  else:
    s, post = inner_products(queries, matrix, scales, method, bias, defer_query_scale=True)
  scores, ids = _select(s, min(k, n))
  if post is not None:
    scores = scores * post
  ids = jnp.where(scores == -jnp.inf, -1, ids.astype(jnp.int32))
  return _pad_k(scores, ids, k)


# method -> the storage dtype its native kernel scans
_NATIVE = {"int8": "int8", "bf16": "bfloat16", "f32": "float16"}


def _uses_native(method: str, dtype, q: int, d: int | None = None) -> bool:
  """Whether `method` over rows of `dtype` (D = `d`, if known) with `q` queries runs a native scan
  kernel (engine.kernels.native) on a CPU."""
  kernel = _NATIVE.get(method)
  if kernel is None or np.dtype(dtype) != np.dtype(jnp.dtype(kernel)):
    return False
  if kernel != "int8" and q > _NATIVE_FEW_Q and native.isa(kernel) != "avx2":
    return False  # vdpbf16ps batches lose to XLA; AVX2 batches of widened rows beat it
  if d is not None and ((d * np.dtype(dtype).itemsize) % 4 or d > 65536):
    return False
  return native.available(kernel, q)


def _topk_native(queries, matrix, scales, valid, offsets=None, *, k, metric):
  """The fused scan + top-k of `engine/kernels/native/scan_topk.cc`: no [Q, N] scores in memory.

  The kernel ranks dot(query, row) * scale * qmul + bias (+ query_offset * row_weight, the
  rank-one term of collection statistics, for any number of queries). int8 queries are quantised exactly as in
  the XLA "int8" method, so cosine scores are bit-identical to it on every path; bfloat16 takes
  the float32 queries (AVX2: rows widened exactly, float32 FMA; AVX-512: a bf16 high + low pair
  for Q <= 8, accurate to ~1e-5, rounded to bf16 above, ~1e-3); float16 rows are widened exactly
  and meet the float32 queries.
  """
  n = matrix.shape[0]
  int8 = matrix.dtype == jnp.int8
  if int8:
    q_in, qscale = _quantize_queries(queries)
  else:
    q_in, qscale = queries, jnp.ones((queries.shape[0], 1), jnp.float32)
  scales = jnp.ones((n,), jnp.float32) if scales is None else scales.astype(jnp.float32)
  bias = jnp.zeros((n,), jnp.float32) if valid is None else jnp.where(valid, 0.0, -jnp.inf)
  if offsets is not None:  # the query scale inside, as XLA's path has it before the term
    qmul = qscale[:, 0]
  elif metric == "l2":
    bias = bias - _sq_norms(matrix, scales if int8 else None)
    qmul = 2.0 * qscale[:, 0]
  else:
    qmul = jnp.ones((queries.shape[0],), jnp.float32)
  query_offset, row_weight = (None, None) if offsets is None else offsets
  scores, ids = native.scan_topk(
    q_in, matrix, scales, qmul, bias, min(k, n), query_offset=query_offset, row_weight=row_weight
  )
  if metric == "l2":
    scores = scores - jnp.sum(queries * queries, axis=1, keepdims=True)
  elif int8 and offsets is None:
    scores = scores * qscale
  ids = jnp.where(scores == -jnp.inf, -1, ids)
  return _pad_k(scores, ids, k)


@functools.partial(jax.jit, static_argnames=("k",))
def merge_topk(
  scores_a: ArrayLike, ids_a: ArrayLike, scores_b: ArrayLike, ids_b: ArrayLike, k: int
) -> tuple[jax.Array, jax.Array]:
  """Merges two top-k lists of the same queries: [Q, ka], [Q, kb] -> [Q, k], best first.

  Ids must already be global (unique across the two parts); -1 ids carry -inf scores and sort last.
  """
  s = jnp.concatenate([jnp.asarray(scores_a), jnp.asarray(scores_b)], axis=1)
  i = jnp.concatenate([jnp.asarray(ids_a), jnp.asarray(ids_b)], axis=1)
  kk = min(k, s.shape[1])
  v, j = lax.top_k(s, kk)
  return _pad_k(v, jnp.take_along_axis(i, j, axis=1), k)


def empty_topk(q: int, k: int) -> tuple[jax.Array, jax.Array]:
  """The identity of `merge_topk`: [Q, k] of -inf scores and -1 ids."""
  return jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32)
