"""The pure top-k kernel against a float64 numpy brute force."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from engine.kernels import streaming
from engine.kernels import topk as topk_lib
from engine.store import quantize_int8


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(rng, n, d, clusters, spread=0.35):
  """Tightly clustered unit vectors: neighbours differ by more than int8 noise, unlike isotropic noise."""
  centers = rng.standard_normal((clusters, d))
  x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))
  return _unit(x).astype(np.float32)


def brute(q, m, k, metric="cosine", valid=None):
  q = q.astype(np.float64)
  m = m.astype(np.float64)
  s = _unit(q) @ m.T if metric == "cosine" else -((q[:, None, :] - m[None, :, :]) ** 2).sum(-1)
  if valid is not None:
    s = np.where(valid[None], s, -np.inf)
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), order, s


@pytest.mark.parametrize("method", ["reduce", "f32"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_float32_matches_float64_brute_force(method, metric):
  rng = np.random.default_rng(1)
  m = _unit(rng.standard_normal((3000, 48))).astype(np.float32)
  q = rng.standard_normal((5, 48)).astype(np.float32)
  if metric == "l2":
    q = _unit(q).astype(np.float32)  # compare distances on the same scale as the rows
  s, i = topk_lib.topk(q, m, 10, metric=metric, method=method)
  s, i = np.asarray(s), np.asarray(i)
  ref_s, _, full = brute(q, m, 10, metric)
  np.testing.assert_allclose(s, ref_s, atol=1e-5)
  # Every returned id re-scores to its returned value (ids may differ from numpy only on ties).
  np.testing.assert_allclose(np.take_along_axis(full, i, 1), s, atol=1e-5)
  assert (np.diff(s, axis=1) <= 0).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_scores_the_stored_values(dtype):
  rng = np.random.default_rng(2)
  m = _unit(rng.standard_normal((2048, 32))).astype(np.float32)
  m[0, :4] = [1e-6, -3e-7, 6e-5, 0.0]  # float16 subnormals must not be flushed
  md = m.astype(np.float16 if dtype == "float16" else ml_dtypes.bfloat16)
  stored = md.astype(np.float32)
  np.testing.assert_array_equal(np.asarray(topk_lib.decode(jnp.asarray(md))), stored)
  q = rng.standard_normal((3, 32)).astype(np.float32)
  methods = ("reduce", "f32", "bf16x2", "bf16") if dtype == "bfloat16" else ("reduce", "f32")
  for method in methods:
    s, i = topk_lib.topk(q, md, 7, method=method)
    ref_s, _, full = brute(q, stored, 7)
    tol = 1e-2 if method == "bf16" else 1e-5  # "bf16" also rounds the queries to bf16
    np.testing.assert_allclose(np.asarray(s), ref_s, atol=tol)
    np.testing.assert_allclose(np.take_along_axis(full, np.asarray(i), 1), s, atol=tol)


def test_ties_return_equal_scores_and_distinct_ids():
  rng = np.random.default_rng(3)
  base = _unit(rng.standard_normal((4, 16))).astype(np.float32)
  m = np.repeat(base, 300, axis=0)  # 300 identical copies of each of 4 rows
  q = base[:1] + 0.01 * rng.standard_normal((1, 16)).astype(np.float32)
  s, i = topk_lib.topk(q, m, 20)
  s, i = np.asarray(s)[0], np.asarray(i)[0]
  assert np.unique(i).size == 20
  assert (i // 300 == 0).all()
  np.testing.assert_allclose(s, s[0], atol=1e-6)


def test_k_larger_than_n_pads_with_minus_inf():
  rng = np.random.default_rng(4)
  m = _unit(rng.standard_normal((5, 8))).astype(np.float32)
  s, i = topk_lib.topk(rng.standard_normal((2, 8)), m, 9)
  s, i = np.asarray(s), np.asarray(i)
  assert s.shape == i.shape == (2, 9)
  assert np.isfinite(s[:, :5]).all() and (s[:, 5:] == -np.inf).all()
  assert (i[:, 5:] == -1).all() and sorted(i[0, :5]) == list(range(5))


def test_valid_mask_excludes_rows():
  rng = np.random.default_rng(5)
  m = _unit(rng.standard_normal((4096, 24))).astype(np.float32)
  q = m[:3] + 0.0
  valid = rng.random(4096) < 0.3
  valid[:3] = False  # the exact matches are filtered out
  s, i = topk_lib.topk(q, m, 10, valid=valid)
  ref_s, _, _ = brute(q, m, 10, valid=valid)
  np.testing.assert_allclose(np.asarray(s), ref_s, atol=1e-5)
  assert valid[np.asarray(i)].all()
  # Fewer valid rows than k.
  few = np.zeros(4096, bool)
  few[[7, 9]] = True
  s, i = topk_lib.topk(q, m, 5, valid=few)
  assert set(np.asarray(i)[0, :2]) == {7, 9} and (np.asarray(i)[:, 2:] == -1).all()


def test_int8_scores_dequantised_rows_and_recall():
  rng = np.random.default_rng(6)
  m = clustered(rng, 20000, 128, clusters=200)
  q = _unit(m[rng.choice(20000, 100, replace=False)] + 0.15 * rng.standard_normal((100, 128)))
  q8, scale = quantize_int8(m)
  deq = q8.astype(np.float64) * scale[:, None]
  _, exact, _ = brute(q, m, 10)
  recalls = {}
  for method in ("reduce", "int8", "f32"):
    qq = q
    s, i = topk_lib.topk(qq, q8, 10, scales=scale, method=method)
    s, i = np.asarray(s), np.asarray(i)
    # Returned ids re-score (against the dequantised rows) to the returned values.
    tol = 2e-5 if method != "int8" else 1e-2  # the int8 product also quantises the queries
    full = _unit(qq.astype(np.float64)) @ deq.T
    np.testing.assert_allclose(np.take_along_axis(full, i, 1), s, atol=tol)
    hits = [len(set(a) & set(b)) for a, b in zip(i, exact[: len(qq)], strict=True)]
    recalls[method] = np.mean(hits) / 10
  print("int8 recall@10:", recalls)
  assert min(recalls.values()) >= 0.97, recalls


def test_l2_int8_with_scales():
  rng = np.random.default_rng(7)
  m = _unit(rng.standard_normal((2048, 32))).astype(np.float32)
  q8, scale = quantize_int8(m)
  deq = q8.astype(np.float64) * scale[:, None]
  q = _unit(rng.standard_normal((6, 32))).astype(np.float32)
  s, i = topk_lib.topk(q, q8, 5, metric="l2", scales=scale, method="f32")
  ref_s, _, full = brute(q, deq, 5, "l2")
  np.testing.assert_allclose(np.asarray(s), ref_s, atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(full, np.asarray(i), 1), s, atol=1e-5)


def test_merge_of_chunks_equals_whole():
  rng = np.random.default_rng(8)
  m = _unit(rng.standard_normal((6000, 16))).astype(np.float32)
  q = rng.standard_normal((4, 16)).astype(np.float32)
  whole_s, _ = topk_lib.topk(q, m, 10)
  best = topk_lib.empty_topk(4, 10)
  for start in range(0, 6000, 1024):
    part = np.zeros((1024, 16), np.float32)
    n = min(1024, 6000 - start)
    part[:n] = m[start : start + n]
    valid = np.arange(1024) < n
    best = streaming.scan_chunk(q, part, None, valid, np.int32(start), *best, k=10, metric="cosine")
  np.testing.assert_allclose(np.asarray(best[0]), np.asarray(whole_s), atol=1e-6)
  full = _unit(q.astype(np.float64)) @ m.T.astype(np.float64)
  np.testing.assert_allclose(np.take_along_axis(full, np.asarray(best[1]), 1), best[0], atol=1e-5)


def test_no_recompilation_for_the_same_shapes():
  rng = np.random.default_rng(9)
  m = jnp.asarray(_unit(rng.standard_normal((4096, 32))).astype(np.float32))
  q = rng.standard_normal((8, 32)).astype(np.float32)
  jax.block_until_ready(topk_lib.topk(q, m, 5))
  before = topk_lib.topk._cache_size()
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **kw: compiles.append(name) if "backend_compile" in name else None
  )
  try:
    for _ in range(3):
      jax.block_until_ready(topk_lib.topk(rng.standard_normal((8, 32)).astype(np.float32), m, 5))
  finally:
    jax.monitoring.clear_event_listeners()
  assert topk_lib.topk._cache_size() == before
  assert not compiles, compiles


def test_usable_inside_other_jax_code():
  rng = np.random.default_rng(10)
  m = _unit(rng.standard_normal((1000, 8))).astype(np.float32)

  @jax.jit
  def f(q, m):
    s, i = topk_lib.topk(q * 2.0, m, 3)
    return s.sum(), i

  s, i = f(rng.standard_normal((2, 8)).astype(np.float32), m)
  assert i.shape == (2, 3) and np.isfinite(float(s))
