"""The fused int8 scan + top-k kernel (engine/kernels/native) against integer brute force and XLA's path."""

import os
import subprocess
import sys

import numpy as np
import pytest
from test_search import clustered

from engine.kernels import native
from engine.kernels import topk as topk_lib
from engine.store import Index, quantize_int8

pytestmark = pytest.mark.skipif(not native.available(), reason=native.status())


def _reference(q8, m8, scale, qmul, bias, k):
  """Rank by float32(dot) * scale * qmul + bias as the kernel does; ties to the lower row."""
  dot = q8.astype(np.int64) @ m8.astype(np.int64).T
  s = (dot.astype(np.float32) * scale[None]) * qmul[:, None] + bias[None]
  ids = np.full((len(q8), k), -1)
  vals = np.full((len(q8), k), -np.inf, np.float32)
  for j, row in enumerate(s):
    order = np.lexsort((np.arange(len(row)), -row))
    order = order[np.isfinite(row[order])][:k]
    ids[j, : len(order)] = order
    vals[j, : len(order)] = row[order]
  return vals, ids


def _kernel(q8, m8, scale, qmul, bias, k):
  import jax
  import jax.numpy as jnp

  out = (
    jax.ShapeDtypeStruct((len(q8), k), jnp.float32),
    jax.ShapeDtypeStruct((len(q8), k), jnp.int32),
  )
  call = jax.jit(lambda *a: jax.ffi.ffi_call(native.INT8_TOPK, out)(*a))
  return [np.asarray(a) for a in call(q8, m8, scale, qmul, bias)]


@pytest.mark.parametrize(
  "n,d,q,k",
  [
    (5000, 512, 1, 10),  # one query: the row-at-a-time loop
    (3001, 100, 3, 7),  # D not a multiple of 64: masked tail loads
    (4099, 64, 4, 20),
    (9000, 516, 8, 10),
    (9001, 516, 9, 10),  # one tile of 16 queries, 12 rows per step plus tail rows
    (2050, 128, 17, 3),  # two tiles
    (5000, 256, 100, 20),  # seven tiles in groups of four and three
    (100, 512, 40, 150),  # k above the valid rows: -inf / -1 padding
  ],
)
def test_kernel_equals_integer_brute_force(n, d, q, k):
  rng = np.random.default_rng(n + q)
  m8 = rng.integers(-127, 128, (n, d), dtype=np.int8)
  q8 = rng.integers(-127, 128, (q, d), dtype=np.int8)
  scale = rng.uniform(0.5, 1.5, n).astype(np.float32)
  qmul = rng.uniform(0.5, 1.5, q).astype(np.float32)
  bias = np.where(rng.random(n) < 0.1, -np.inf, 0.0).astype(np.float32)
  vals, ids = _kernel(q8, m8, scale, qmul, bias, k)
  ref_vals, ref_ids = _reference(q8, m8, scale, qmul, bias, k)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(vals, ref_vals)


def test_ties_go_to_the_lower_row_whatever_the_threads():
  # 20,000 identical rows: every score ties; the blocks are shared among threads in any order.
  n, d, k = 20000, 64, 25
  m8 = np.tile(np.arange(-32, 32, dtype=np.int8), (n, 1))
  q8 = np.ones((6, d), np.int8)
  ones = np.ones(n, np.float32)
  for _ in range(3):
    vals, ids = _kernel(q8, m8, ones, np.ones(6, np.float32), np.zeros(n, np.float32), k)
    np.testing.assert_array_equal(ids, np.tile(np.arange(k), (6, 1)))
    assert np.all(vals == vals[0, 0])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("q", [1, 2, 9, 33])
def test_topk_native_matches_xla_int8(metric, q):
  rng = np.random.default_rng(q)
  x = clustered(rng, 6000, 96, 50)
  m8, scale = quantize_int8(x)
  queries = x[rng.integers(0, len(x), q)] + 0.01 * rng.standard_normal((q, 96)).astype(np.float32)
  valid = rng.random(len(x)) > 0.3
  a = topk_lib.topk(queries, m8, 12, metric=metric, scales=scale, valid=valid, method="int8")
  b = topk_lib.topk(queries, m8, 12, metric=metric, scales=scale, valid=valid, method="int8-xla")
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  if metric == "cosine":  # the same float32 operations in the same order: bit-identical
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  else:
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-5)
  assert not np.isin(np.asarray(a[1]), np.flatnonzero(~valid)).any()


def test_index_search_uses_the_kernel_and_agrees_with_xla(tmp_path):
  rng = np.random.default_rng(7)
  x = clustered(rng, 20000, 128, 200)
  keys = [f"k{i}" for i in range(len(x))]
  idx = Index.create(str(tmp_path / "ix"), dim=128, dtype="int8")
  idx.add(x[:12000], keys[:12000])
  idx.add(x[12000:], keys[12000:])
  idx.delete(keys[::7])
  q = x[rng.integers(0, len(x), 24)]
  s1, k1 = idx.search(q, k=10)
  s2, k2 = idx.search(q, k=10, method="int8-xla")
  np.testing.assert_array_equal(k1, k2)
  np.testing.assert_array_equal(s1, s2)
  assert not set(k1.ravel()) & set(keys[::7])


def test_disabled_by_environment():
  env = dict(os.environ, VGG_RETRIEVAL_NATIVE="0")
  code = "from engine import native; print(native.available(), native.status())"
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
  ).stdout
  assert out.startswith("False") and "VGG_RETRIEVAL_NATIVE=0" in out


def test_vmap_over_query_batches():
  import jax

  rng = np.random.default_rng(3)
  m8, scale = quantize_int8(clustered(rng, 3000, 64, 30))
  qs = rng.standard_normal((3, 5, 64)).astype(np.float32)
  s, i = jax.vmap(lambda q: topk_lib.topk(q, m8, 6, scales=scale))(qs)
  for b in range(3):
    sb, ib = topk_lib.topk(qs[b], m8, 6, scales=scale)
    np.testing.assert_array_equal(np.asarray(i[b]), np.asarray(ib))
    np.testing.assert_array_equal(np.asarray(s[b]), np.asarray(sb))


bf16_only = pytest.mark.skipif(not native.available("bfloat16"), reason=native.status())


def _bf16_kernel(q, mb, k):
  import jax
  import jax.numpy as jnp

  n = len(mb)
  out = (
    jax.ShapeDtypeStruct((len(q), k), jnp.float32),
    jax.ShapeDtypeStruct((len(q), k), jnp.int32),
  )
  call = jax.jit(lambda *a: jax.ffi.ffi_call(native.BF16_TOPK, out)(*a))
  ones = np.ones(n, np.float32)
  return [np.asarray(a) for a in call(q, mb, ones, np.ones(len(q), np.float32), 0 * ones)]


@bf16_only
@pytest.mark.parametrize("q,d", [(1, 512), (3, 130), (8, 64), (17, 96), (40, 512)])
def test_bf16_kernel_against_float64(q, d):
  import ml_dtypes

  rng = np.random.default_rng(q * d)
  x = clustered(rng, 5000, d, 40)
  mb = x.astype(ml_dtypes.bfloat16)
  queries = rng.standard_normal((q, d)).astype(np.float32)
  vals, ids = _bf16_kernel(queries, mb, 10)
  # Few queries run as bf16 high + low pairs (float32-accurate); batches round them to bf16.
  qref = queries if q <= 8 else queries.astype(ml_dtypes.bfloat16).astype(np.float32)
  exact = qref.astype(np.float64) @ mb.astype(np.float64).T
  tol = 1e-4 if q <= 8 else 1e-3
  np.testing.assert_allclose(vals, np.take_along_axis(exact, ids, 1), atol=tol)
  kth = -np.sort(-exact, axis=1)[:, 9]
  assert np.all(vals[:, -1] >= kth - tol)  # nothing better than the returned tenth was missed


@bf16_only
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_topk_native_bf16_matches_xla(metric):
  import ml_dtypes

  rng = np.random.default_rng(11)
  x = clustered(rng, 8000, 128, 80)
  mb = x.astype(ml_dtypes.bfloat16)
  queries = x[rng.integers(0, len(x), 4)] + 0.01 * rng.standard_normal((4, 128)).astype(np.float32)
  valid = rng.random(len(x)) > 0.3
  a = topk_lib.topk(queries, mb, 10, metric=metric, valid=valid, method="bf16")
  b = topk_lib.topk(queries, mb, 10, metric=metric, valid=valid, method="reduce")
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available("float16"), reason=native.status())
@pytest.mark.parametrize("q,d,metric", [(1, 512, "cosine"), (3, 100, "cosine"), (8, 64, "l2")])
def test_float16_rows_widened_exactly(q, d, metric):
  rng = np.random.default_rng(q + d)
  x = clustered(rng, 6000, d, 50)
  m16 = x.astype(np.float16)
  queries = rng.standard_normal((q, d)).astype(np.float32)
  valid = rng.random(len(x)) > 0.2
  a = topk_lib.topk(queries, m16, 10, metric=metric, valid=valid, method="f32")
  b = topk_lib.topk(queries, m16, 10, metric=metric, valid=valid, method="f32-xla")
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-5)
  qn = queries / np.linalg.norm(queries, axis=1, keepdims=True) if metric == "cosine" else queries
  xs = m16.astype(np.float64)
  exact = qn @ xs.T if metric == "cosine" else -((qn[:, None] - xs[None]) ** 2).sum(-1)
  got = np.take_along_axis(exact, np.asarray(a[1]), 1)
  np.testing.assert_allclose(np.asarray(a[0]), got, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available("float16"), reason=native.status())
def test_kernel_rejects_what_it_cannot_scan():
  import jax
  import jax.numpy as jnp

  def call(target, q, m, k=3):
    out = (
      jax.ShapeDtypeStruct((len(q), k), jnp.float32),
      jax.ShapeDtypeStruct((len(q), k), jnp.int32),
    )
    n = len(m)
    ones = np.ones(n, np.float32)
    return jax.ffi.ffi_call(target, out)(q, m, ones, np.ones(len(q), np.float32), 0 * ones)

  with pytest.raises(Exception, match="at most 8 queries"):
    jax.block_until_ready(
      call(native.F16_TOPK, np.ones((9, 64), np.float32), np.ones((50, 64), np.float16))
    )
  with pytest.raises(Exception, match="multiple of 4 bytes"):
    jax.block_until_ready(
      call(native.INT8_TOPK, np.ones((2, 6), np.int8), np.ones((50, 6), np.int8))
    )
  with pytest.raises(Exception, match=r"expected queries \[Q, D\]"):
    jax.block_until_ready(
      call(native.INT8_TOPK, np.ones((2, 8), np.int8), np.ones((50, 12), np.int8))
    )
