"""Every top-k method against a float64 numpy brute force, at sizes that reach the two-stage
block selection of `_select` (N a multiple of _BLOCK with at least 4k blocks) and at sizes that
do not; scores are compared (ties allowed), and returned ids must re-score to returned values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from engine.kernels import streaming
from engine.kernels import topk as topk_lib
from engine.store import segments

D = 24
Q = 48


def _data(n, seed=0):
  rng = np.random.default_rng(seed)
  m = rng.standard_normal((n, D)).astype(np.float32)
  m /= np.linalg.norm(m, axis=1, keepdims=True)
  q = rng.standard_normal((Q, D)).astype(np.float32)
  return q, m


def _two_stage(n, k):
  return n % topk_lib._BLOCK == 0 and n // topk_lib._BLOCK >= 4 * k


# method -> (storage dtype, how the kernel sees the queries)
METHODS = {
  "f32": ("float32", "exact"),
  "f32-xla": ("float32", "exact"),
  "reduce": ("float32", "exact"),
  "reduce-bf16": ("bfloat16", "exact"),
  "reduce-int8": ("int8", "exact"),
  "f32-f16": ("float16", "exact"),
  "bf16": ("bfloat16", "bf16"),
  "bf16-xla": ("bfloat16", "bf16"),
  "bf16x2": ("bfloat16", "exact"),
  "int8": ("int8", "int8"),
  "int8-xla": ("int8", "int8"),
}


def _store(m, dtype):
  """(matrix to pass, scales, float64 dequantised rows)."""
  if dtype == "int8":
    q8, scale = segments.quantize_int8(m)
    return q8, scale, q8.astype(np.float64) * scale[:, None]
  if dtype == "bfloat16":
    b = m.astype(ml_dtypes.bfloat16)
    return b, None, b.astype(np.float64)
  if dtype == "float16":
    h = m.astype(np.float16)
    return h, None, h.astype(np.float64)
  return m, None, m.astype(np.float64)


def _seen_queries(q, how):
  if how == "bf16":
    return q.astype(ml_dtypes.bfloat16).astype(np.float64)
  if how == "int8":  # symmetric per-query, to nearest, written out independently
    scale = np.abs(q).max(1, keepdims=True) / np.float32(127)
    return np.rint(q / scale) * scale.astype(np.float64)
  return q.astype(np.float64)


def _reference(q, rows, metric, valid, q_exact=None):
  """Brute-force scores of the queries as the kernel sees them (`q`); for l2 the queries' own norm
  is the exact one (`q_exact`), as the kernel adds it after the product."""
  if metric == "cosine":
    s = q @ rows.T
  else:
    q_exact = q if q_exact is None else q_exact
    s = 2 * q @ rows.T - (rows * rows).sum(1)[None] - (q_exact * q_exact).sum(1)[:, None]
  if valid is not None:
    s = np.where(valid[None], s, -np.inf)
  return s


def _check(scores, ids, ref, k, tol):
  scores, ids = np.asarray(scores, np.float64), np.asarray(ids)
  assert scores.shape == ids.shape == (ref.shape[0], k)
  want = -np.sort(-ref, axis=1)[:, :k]
  if want.shape[1] < k:
    want = np.pad(want, ((0, 0), (0, k - want.shape[1])), constant_values=-np.inf)
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(scores), finite)
  np.testing.assert_allclose(scores[finite], want[finite], atol=tol, rtol=tol)
  assert (ids[~finite] == -1).all()
  assert (np.diff(np.where(finite, scores, -1e30), axis=1) <= 1e-6).all()  # best first
  for row in range(ref.shape[0]):
    got = ids[row][finite[row]]
    assert len(set(got.tolist())) == len(got)  # no row twice
    np.testing.assert_allclose(ref[row, got], scores[row][finite[row]], atol=tol, rtol=tol)


def _run(method, n, k, metric="cosine", valid=None, seed=0, nq=Q):
  dtype, how = METHODS[method]
  kernel = method.split("-")[0] if method in ("reduce-bf16", "reduce-int8", "f32-f16") else method
  if kernel == "bf16" and topk_lib._uses_native("bf16", ml_dtypes.bfloat16, nq):
    how = "exact"  # the native kernels take float32 queries (bf16 pairs, or widened rows)
  q, m = _data(n, seed)
  q = q[:nq]
  mat, scales, rows = _store(m, dtype)
  s, i = topk_lib.topk(q, mat, k, metric=metric, scales=scales, valid=valid, method=kernel)
  qq = q.astype(np.float64)
  if metric == "cosine":
    qq = qq / np.linalg.norm(qq, axis=1, keepdims=True)
  seen = _seen_queries(qq.astype(np.float32), how) if how != "exact" else qq
  tol = 2e-5 if metric == "cosine" else 1e-4
  _check(s, i, _reference(seen, rows, metric, valid, qq), k, tol)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_chunked_and_merged_equal_the_whole(dtype):
  q, m = _data(20000, 5)
  mat, scales, rows = _store(m, dtype)
  valid = np.random.default_rng(5).uniform(size=20000) < 0.7
  method = "int8-xla" if dtype == "int8" else None
  s, i = streaming.chunked_topk(
    q, mat, 10, scales=scales, valid=valid, chunk_rows=8192, method=method
  )
  seen = q / np.linalg.norm(q, axis=1, keepdims=True)
  if dtype == "int8":
    seen = _seen_queries(seen, "int8")
  _check(s, i, _reference(seen.astype(np.float64), rows, "cosine", valid), 10, 2e-5)
  # merge_topk of two halves' lists equals the top-k of the whole
  a = topk_lib.topk(q, m[:8192], 10, method="f32")
  b = topk_lib.topk(q, m[8192:], 10, method="f32")
  ms, mi = topk_lib.merge_topk(a[0], a[1], b[0], np.asarray(b[1]) + 8192, 10)
  _check(
    ms,
    mi,
    _reference(
      seen if dtype != "int8" else q / np.linalg.norm(q, axis=1, keepdims=True),
      m.astype(np.float64),
      "cosine",
      None,
    ),
    10,
    2e-5,
  )


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("n,k", [(8192, 16), (16384, 5), (8192, 1), (3000, 7)])
def test_methods_against_brute_force(method, n, k):
  if method.startswith("reduce") and n > 8192:
    pytest.skip("lax.map over queries: slow, one size is enough")
  _run(method, n, k, seed=n + k)


def test_two_stage_selection_is_reached():
  assert _two_stage(8192, 16) and _two_stage(16384, 5) and _two_stage(8192, 1)
  assert not _two_stage(3000, 7) and not _two_stage(8192, 17)


@pytest.mark.parametrize("method", ["f32", "bf16x2", "int8-xla", "int8", "bf16"])
def test_l2_metric(method):
  _run(method, 8192, 10, metric="l2", seed=3)


@pytest.mark.parametrize("method", ["f32", "int8-xla", "bf16-xla", "reduce"])
@pytest.mark.parametrize("n_valid", [3, 10, 12, 500])
def test_tombstones_and_k_near_the_valid_count(method, n_valid):
  n, k = 8192, 12
  rng = np.random.default_rng(n_valid)
  valid = np.zeros(n, bool)
  valid[rng.choice(n, n_valid, replace=False)] = True
  _run(method, n, k, valid=valid, seed=n_valid, nq=16)
  _run(method, n, k, metric="l2", valid=valid, seed=n_valid, nq=16)


@pytest.mark.parametrize("method", ["f32", "int8-xla"])
def test_k_above_n(method):
  _run(method, 256, 300, seed=9, nq=8)
  valid = np.arange(256) % 3 == 0
  _run(method, 256, 300, valid=valid, seed=9, nq=8)


def test_best_matches_clustered_in_one_block():
  # The top k all inside one block, the rest of that block poor: stresses the block pruning.
  q, m = _data(8192, 4)
  m[128 * 7 : 128 * 7 + 16] = q[0] / np.linalg.norm(q[0])
  m[128 * 7 + 16 : 128 * 8] = -m[128 * 7 + 16 : 128 * 8]
  s, i = topk_lib.topk(q, m, 16, method="f32")
  _check(
    s, i, _reference(q / np.linalg.norm(q, axis=1, keepdims=True), m, "cosine", None), 16, 2e-5
  )
  assert set(np.asarray(i)[0].tolist()) == set(range(128 * 7, 128 * 7 + 16))
