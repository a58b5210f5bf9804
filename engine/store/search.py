"""Search over an index's segments: every segment streamed through the top-k kernels, then the
candidates of compressed storage re-scored exactly from the stored rows.

Memory beyond the page cache is one chunk of rows per kernel call (`kernels.topk.chunked_topk`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax
import numpy as np

from engine.kernels import streaming
from engine.kernels import topk as topk_lib
from engine.store.errors import IndexCorruptError, IndexMismatchError, QueryMismatchError
from engine.store.segments import CHUNK_ROWS, normalize_rows

# Compressed storage: the kernel returns this many times k candidates for exact re-scoring.
CANDIDATE_FACTOR = 2
QUERY_BATCH = 256


def search(
  index,
  queries: np.ndarray,
  k: int = 10,
  metric: str = "cosine",
  allowed_keys: Iterable[str] | None = None,
  rerank: int = 0,
  *,
  chunk_rows: int | None = None,
  method: str | None = None,
  statistics: str | None = None,
  scan=None,
) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest live vectors of each query in `index` (an open `engine.store.Index`).

  Args:
    index: the index.
    queries: [Q, dim] or [dim] float.
    k: results per query.
    metric: "cosine" (scores are cosine similarities, descending) or "l2" (scores are squared
      euclidean distances, ascending).
    allowed_keys: if given, only these keys can be returned (unknown keys are ignored).
    rerank: if > k, fetch this many candidates and re-score them exactly from the float32 copy
      (needs keep_float32=True unless the storage dtype is float32).
    chunk_rows: rows per kernel call (fixed shape: compiled once per query bucket); default
      `engine.kernels.streaming.chunk_rows_for(Q, dtype=...)`.
    method: kernel method override, see `engine.kernels.topk.topk`.
    statistics: on an index with collection statistics (`Index.learn_statistics`), None scores
      with them (the cosine of the centred / whitened query and row, `engine.store.statistics`),
      "none" without them (the raw cosine), and a statistics id (`Index.statistics.id`) insists
      on that set: IndexMismatchError if the index now holds another. Queries are always the raw
      descriptors, as extracted: the index applies its statistics itself.
    scan: the step that finds the candidates, `scan(segments, valid, queries, kk, metric)`
      (with collection statistics also `query_offset=` [Q] and `factors=`, per segment its
      (scales, row weights): the rank-one term of `engine.kernels.topk.topk`) ->
      ([Q, kk] float32 kernel scores, [Q, kk] int64 global rows, -1 for none); default: every
      segment streamed through one device (`engine.store.sharded` has a mesh and a multi-process
      one).

  Returns:
    scores: [Q, m] float32 and keys: [Q, m] object array of str, best first, where
    m = min(k, number of searchable rows): columns are never padded. With compressed storage
    the scores are exact (float64) for the stored vectors; with `rerank`, for the float32 copy.
  """
  if metric not in topk_lib.METRICS:
    raise ValueError(f"metric must be one of {topk_lib.METRICS}, got {metric!r}")
  q = np.asarray(queries, dtype=np.float32)
  squeeze = q.ndim == 1
  if squeeze:
    q = q[None]
  stats = _statistics_for(index, statistics, metric)
  if q.ndim == 2 and stats is not None and q.shape[1] == stats.out_dim != index.dim:
    raise QueryMismatchError(
      f"queries are {q.shape[1]}-d, the dimension of index {index.path}'s {stats.kind} output: "
      f"pass the raw {index.dim}-d descriptors, the index applies its statistics to them itself"
    )
  if q.ndim != 2 or q.shape[1] != index.dim:
    raise QueryMismatchError(
      f"queries must be [Q, {index.dim}] for index {index.path}, got {np.shape(queries)}"
    )
  if not np.isfinite(q).all():
    raise ValueError("queries contain inf or nan")
  if k <= 0:
    raise ValueError(f"k must be positive, got {k}")
  segs = index.segments
  allowed = None
  if allowed_keys is not None:
    allowed = np.zeros(sum(s.rows for s in segs), bool)
    live = index.live_rows()
    allowed[[live[key] for key in allowed_keys if key in live]] = True
  valid = [_valid_mask(s, allowed) for s in segs]
  n_valid = sum(int(v.sum()) for v in valid)
  m = min(k, n_valid)
  if metric == "cosine" or index.normalizes:
    # Stored vectors of a normalising index live on the unit sphere: so do its queries.
    q = normalize_rows(q)
  nq = q.shape[0]
  if m == 0:
    out = np.zeros((nq, 0), np.float32), np.empty((nq, 0), object)
    return (out[0][0], out[1][0]) if squeeze else out
  use_rerank = rerank > k and index.dtype != "float32"
  if use_rerank and not index.keep_float32:
    raise ValueError(f"rerank needs an index created with keep_float32=True ({index.path})")
  # Compressed storage: the kernel's candidates are re-scored in float64 from the stored rows, so
  # returned scores are exact for the stored vectors (the kernel quantises int8 queries too) and a
  # little recall lost to that rounding comes back.
  if use_rerank:
    kk = min(rerank, n_valid)
  elif index.dtype != "float32":
    kk = min(max(m, CANDIDATE_FACTOR * k), n_valid)
  else:
    kk = m
  if stats is not None:
    kk = min(max(kk, CANDIDATE_FACTOR * k), n_valid)
    q_scan, q_offset = stats.prepare_queries(q)
    # The kernel normalises its queries: scale the offsets alike (a positive factor per query).
    qn = np.linalg.norm(q_scan, axis=1)
    qn = np.where(qn > 0, qn, 1.0)
    q_scan, q_offset = q_scan / qn[:, None], q_offset / qn
    factors = _row_factors(index, stats)
  else:
    q_scan, q_offset, factors = q, None, None
  scores = np.empty((nq, kk), np.float32)
  grows = np.empty((nq, kk), np.int64)
  for start in range(0, nq, QUERY_BATCH):
    stop = start + QUERY_BATCH
    qo = None if q_offset is None else q_offset[start:stop]
    qb = q_scan[start:stop]
    if scan is None:
      s, g = _scan(segs, valid, qb, kk, metric, chunk_rows, method, qo, factors)
    elif factors is None:
      s, g = scan(segs, valid, qb, kk, metric)
    else:
      s, g = scan(segs, valid, qb, kk, metric, query_offset=qo, factors=factors)
    scores[start:stop] = s
    grows[start:stop] = g
  if use_rerank or index.dtype != "float32" or stats is not None:
    scores, grows = _rescore(index, q, grows, metric, m, float32_copy=use_rerank, stats=stats)
  else:
    scores, grows = scores[:, :m], grows[:, :m]
  _check_scores(index, scores, grows, metric)
  keys = _keys_of(index, grows)
  if metric == "l2":
    scores = np.maximum(-scores, 0.0)
  return (scores[0], keys[0]) if squeeze else (scores, keys)


def _valid_mask(seg, allowed: np.ndarray | None) -> np.ndarray:
  v = ~seg.deleted
  if allowed is not None:
    v = v & allowed[seg.base : seg.base + seg.rows]
  return v


def _statistics_for(index, statistics: str | None, metric: str):
  """The statistics a search applies: the index's, none, or the named set (or an error)."""
  stats = index.statistics
  if statistics == "none":
    return None
  if statistics is not None and (stats is None or stats.id != statistics):
    have = "none" if stats is None else f"{stats.kind} {stats.id[:12]}"
    raise IndexMismatchError(
      f"the queries were prepared for statistics {statistics[:12]} but index {index.path} now "
      f"holds {have} (re-learned since): extract or prepare them again"
    )
  if stats is not None and metric != "cosine":
    raise ValueError(
      f"collection statistics score cosines: metric={metric!r} needs statistics='none'"
    )
  return stats


def _row_factors(index, stats) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per segment, (scales, row weights) that make the kernel score raw rows with `stats`.

  For a stored row x (dequantised: int8 times its scale s, with norm n), its unit row x / n and
  r = 1 / |P^T (x / n - mu)|: scales s * r / n (1 * r / n for float rows) and row weight -r, so the
  kernel's `q~ . x * scales + offset * weight` is (q~ . x/n - q~ . mu) * r. Computed once per segment
  and statistics set, cached on the handle (a merge renames segments, re-learning changes the id).
  """
  cache = index._stat_factors
  out = []
  for seg in index.segments:
    key = (seg.name, seg.files["vectors"]["sha256"], stats.id)
    if key not in cache:
      scale = np.empty(seg.rows, np.float32)
      weight = np.empty(seg.rows, np.float32)
      for a in range(0, seg.rows, CHUNK_ROWS):
        b = min(seg.rows, a + CHUNK_ROWS)
        x = seg.dequantize(slice(a, b))
        n = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        n = np.where(n > 0, n, 1.0)
        r = stats.row_factors(x, n)
        s = 1.0 if seg.scales is None else np.asarray(seg.scales[a:b], np.float64)
        scale[a:b] = s * r / n
        weight[a:b] = -r
      cache[key] = (scale, weight)
    out.append(cache[key])
  live = {(s.name, s.files["vectors"]["sha256"], stats.id) for s in index.segments}
  for key in [key for key in cache if key not in live]:
    del cache[key]
  return out


def _scan(segs, valid, q, kk, metric, chunk_rows, method, q_offset=None, factors=None):
  """Streams every segment through the kernel with one running top-k: [Q, kk] global rows."""
  nq = q.shape[0]
  # Bucket Q (powers of two up to 8, then multiples of 8): few compiled shapes, little padding.
  qpad = 1 << max(0, (nq - 1).bit_length()) if nq <= 8 else -(-nq // 8) * 8
  qj = jax.device_put(np.concatenate([q, np.zeros((qpad - nq, q.shape[1]), np.float32)]))
  qo = None
  if q_offset is not None:
    qo = jax.device_put(np.concatenate([q_offset, np.zeros(qpad - nq, np.float32)]))
  best = topk_lib.empty_topk(qpad, kk)
  for i, (seg, v) in enumerate(zip(segs, valid, strict=True)):
    scales, weight = (seg.scales, None) if factors is None else factors[i]
    best = streaming.chunked_topk(
      qj,
      seg.vectors,
      kk,
      metric=metric,
      scales=scales,
      valid=v,
      chunk_rows=chunk_rows,
      method=method,
      offset=seg.base,
      best=best,
      query_offset=qo,
      row_weight=weight,
    )
  s, i = jax.device_get(best)
  return s[:nq], i[:nq].astype(np.int64)


def _rescore(index, q, grows, metric, m, float32_copy, stats=None):
  """Exact float64 re-scoring of candidates, [Q, kk] -> [Q, m]: from the float32 copy, or from
  the stored rows (dequantised; on a normalising cosine index, scaled back to unit length, so a
  score is the cosine to the stored direction and never exceeds 1); with `stats`, the statistics
  cosine of the unit query and unit rows."""
  nq, kk = grows.shape
  flat = grows.ravel()
  which = index.locate(flat)
  segs = index.segments
  x = np.empty((flat.size, index.dim), np.float32)
  for i in np.unique(which):
    sel = np.flatnonzero(which == i)
    sg = segs[int(i)]
    rows = flat[sel] - sg.base
    order = np.argsort(rows)  # ascending reads from the memory map
    if float32_copy:
      x[sel[order]] = sg.float32[rows[order]]
    else:
      x[sel[order]] = sg.dequantize(rows[order])
  x64 = x.reshape(nq, kk, index.dim).astype(np.float64)
  q64 = q.astype(np.float64)
  # Contractions, not broadcasts: no [Q, kk, D] temporaries.
  dots = np.einsum("qkd,qd->qk", x64, q64)
  if stats is not None:
    n = np.sqrt(np.einsum("qkd,qkd->qk", x64, x64))
    s = stats.scores(q64, x64 / np.where(n > 0, n, 1.0)[:, :, None])
  elif metric == "cosine":
    s = dots
    if not float32_copy and index.normalizes:
      n = np.sqrt(np.einsum("qkd,qkd->qk", x64, x64))
      s = dots / np.where(n > 0, n, 1.0)
  else:
    s = 2.0 * dots - np.einsum("qkd,qkd->qk", x64, x64) - np.einsum("qd,qd->q", q64, q64)[:, None]
  order = np.argsort(-s, axis=1, kind="stable")[:, :m]
  return np.take_along_axis(s, order, 1).astype(np.float32), np.take_along_axis(grows, order, 1)


def _check_scores(index, scores: np.ndarray, grows: np.ndarray, metric: str) -> None:
  """Refuses impossible scores (a damaged segment) instead of returning them."""
  lo, hi = -np.inf, np.inf
  if index.normalizes:  # unit vectors, with room for quantisation error
    lo, hi = (-1.05, 1.05) if metric == "cosine" else (-4.2, 0.05)
  bad = ~np.isfinite(scores) | (scores < lo) | (scores > hi)
  if bad.any():
    grow = int(grows[bad][0])
    seg = index.segments[int(index.locate(np.int64(grow)))]
    files = ", ".join(os.path.join(index.path, f["file"]) for f in seg.files.values())
    raise IndexCorruptError(
      f"segment {seg.name} ({files}) gives an impossible score {float(scores[bad][0])} at row "
      f"{grow - seg.base}: a file is damaged (Index.verify() checks every checksum)"
    )


def _keys_of(index, grows: np.ndarray) -> np.ndarray:
  which = index.locate(grows)
  segs = index.segments
  keys = np.empty(grows.shape, object)
  for i in np.unique(which):
    sel = which == i
    sg = segs[int(i)]
    keys[sel] = sg.keys[grows[sel] - sg.base]
  return keys
