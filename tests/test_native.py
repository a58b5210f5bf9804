"""The native scan + top-k kernels (engine/kernels/native): every instruction-set path this CPU runs
against integer / float64 brute force and XLA, and the build, cache-trust and fallback rules.

The kernel tests build the library in a fixture (never at collection) and skip, with the reason,
where this machine runs no path of the kernel; the build, trust and fallback tests run everywhere.
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from test_search import clustered

from engine.kernels import native, streaming
from engine.kernels import topk as topk_lib
from engine.store import Index, quantize_int8

INT8_PATHS = ["amx-int8", "avx512-vnni", "avx-vnni", "avx2"]
BF16_PATHS = ["avx512-bf16", "avx2"]
F16_PATHS = ["avx512", "avx2"]


@pytest.fixture(scope="module")
def built():
  """Builds the library (a no-op when a verified one exists) or skips with the reason."""
  try:
    native.build()
  except RuntimeError as e:
    pytest.skip(f"native kernels not built here: {e}")


def _need(dtype, isa=None, queries=1):
  if isa is not None and isa not in native.paths(dtype):
    pytest.skip(f"this CPU does not run the {isa} path of the {dtype} kernel ({native.status()})")
  if isa is not None and native.pick_path(dtype, queries, [isa]) is None:
    pytest.skip(f"the {isa} path of the {dtype} kernel does not take {queries} queries")
  if not native.available(dtype, queries):
    pytest.skip(native.status())


def _call(q, m, scale, qmul, bias, k, isa=None):
  fn = jax.jit(lambda *a: native.scan_topk(*a, k=k, isa=isa))
  return [np.asarray(a) for a in fn(q, m, scale, qmul, bias)]


def _reference(s, k):
  """Top-k of float32 scores [Q, N]: best first, ties to the lower row, -inf rows dropped."""
  ids = np.full((len(s), k), -1)
  vals = np.full((len(s), k), -np.inf, np.float32)
  for j, row in enumerate(s):
    order = np.lexsort((np.arange(len(row)), -row))
    order = order[np.isfinite(row[order])][:k]
    ids[j, : len(order)] = order
    vals[j, : len(order)] = row[order]
  return vals, ids


def _int8_reference(q8, m8, scale, qmul, bias, k):
  """Rank by float32(dot) * scale * qmul + bias as the kernel does."""
  dot = q8.astype(np.int64) @ m8.astype(np.int64).T
  return _reference((dot.astype(np.float32) * scale[None]) * qmul[:, None] + bias[None], k)


@pytest.mark.parametrize("isa", INT8_PATHS)
@pytest.mark.parametrize(
  "n,d,q,k",
  [
    (5000, 512, 1, 10),  # one query: the row-at-a-time loop, three blocks of rows
    (3001, 100, 3, 7),  # D not a multiple of 32 or 64: masked tail loads
    (4099, 64, 4, 20),
    (9000, 516, 8, 10),
    (9001, 516, 9, 10),  # one or two tiles, rows per step plus tail rows
    (2050, 128, 17, 3),  # tiles of 16 or 8 queries, a last partial one
    (5000, 256, 100, 20),  # seven (thirteen) tiles in groups
    (100, 512, 40, 150),  # k above the valid rows: -inf / -1 padding
  ],
)
def test_int8_kernel_equals_integer_brute_force(built, isa, n, d, q, k):
  _need("int8", isa, q)
  rng = np.random.default_rng(n + q)
  m8 = rng.integers(-128, 128, (n, d), dtype=np.int8)  # -128 too: |row| = 128 on the AVX2 path
  q8 = rng.integers(-127, 128, (q, d), dtype=np.int8)
  scale = rng.uniform(0.5, 1.5, n).astype(np.float32)
  qmul = rng.uniform(0.5, 1.5, q).astype(np.float32)
  bias = np.where(rng.random(n) < 0.1, -np.inf, 0.0).astype(np.float32)  # tombstones
  vals, ids = _call(q8, m8, scale, qmul, bias, min(k, n), isa)
  ref_vals, ref_ids = _int8_reference(q8, m8, scale, qmul, bias, min(k, n))
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(vals, ref_vals)


def test_int8_extremes_do_not_saturate(built):
  # |row| = 128 against |query| = 127 in every pair: the largest vpmaddubsw pair sums.
  n, d = 300, 512
  m8 = np.full((n, d), -128, np.int8)
  m8[::2] = 127
  q8 = np.full((9, d), -127, np.int8)
  q8[1::2] = 127
  for isa in native.paths("int8"):
    for nq in (1, 9) if native.pick_path("int8", 1, [isa]) else (9,):
      vals, ids = _call(
        q8[:nq],
        m8,
        np.ones(n, np.float32),
        np.ones(nq, np.float32),
        0 * m8[:, 0].astype(np.float32),
        5,
        isa,
      )
      ref_vals, ref_ids = _int8_reference(
        q8[:nq], m8, np.ones(n, np.float32), np.ones(nq, np.float32), np.zeros(n, np.float32), 5
      )
      np.testing.assert_array_equal(vals, ref_vals)
      np.testing.assert_array_equal(ids, ref_ids)


@pytest.mark.parametrize("isa", INT8_PATHS)
def test_ties_go_to_the_lower_row_whatever_the_threads(built, isa):
  # 20,000 identical rows: every score ties; the blocks are shared among threads in any order.
  _need("int8", isa, 20)
  n, d, k = 20000, 64, 25
  m8 = np.tile(np.arange(-32, 32, dtype=np.int8), (n, 1))
  ones = np.ones(n, np.float32)
  for q in (6, 20) if native.pick_path("int8", 6, [isa]) else (20,):
    q8 = np.ones((q, d), np.int8)
    for _ in range(3):
      vals, ids = _call(q8, m8, ones, np.ones(q, np.float32), np.zeros(n, np.float32), k, isa)
      np.testing.assert_array_equal(ids, np.tile(np.arange(k), (q, 1)))
      assert np.all(vals == vals[0, 0])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("q", [1, 2, 9, 33])
def test_topk_native_matches_xla_int8(built, metric, q):
  _need("int8", queries=q)
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


def test_index_search_uses_the_kernel_and_agrees_with_xla(built, tmp_path):
  _need("int8", queries=24)
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


def test_vmap_over_query_batches(built):
  _need("int8", queries=5)
  rng = np.random.default_rng(3)
  m8, scale = quantize_int8(clustered(rng, 3000, 64, 30))
  qs = rng.standard_normal((3, 5, 64)).astype(np.float32)
  s, i = jax.vmap(lambda q: topk_lib.topk(q, m8, 6, scales=scale))(qs)
  for b in range(3):
    sb, ib = topk_lib.topk(qs[b], m8, 6, scales=scale)
    np.testing.assert_array_equal(np.asarray(i[b]), np.asarray(ib))
    np.testing.assert_array_equal(np.asarray(s[b]), np.asarray(sb))


def _fma32(a, b, c):
  """float32 a * b + c with one rounding: the product of two float32 is exact in float64, the sum
  rounds once to float64 and again to float32 (a double rounding that differs from a true FMA
  with probability ~2**-29 per element)."""
  return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


RANK_ONE_Q = [1, 3, 9, 40, 100]  # few-query loop, one and two tiles of 8 / 16, many tiles


def _rank_one_inputs(rng, n, q):
  scale = rng.uniform(0.5, 1.5, n).astype(np.float32)
  qmul = rng.uniform(0.5, 1.5, q).astype(np.float32)
  bias = np.where(rng.random(n) < 0.15, -np.inf, 0.0).astype(np.float32)  # tombstones, filters
  qoff = rng.normal(0, 0.3, q).astype(np.float32)
  weight = rng.uniform(0.2, 3.0, n).astype(np.float32)
  return scale, qmul, bias, qoff, weight


@pytest.mark.parametrize("q", RANK_ONE_Q)
@pytest.mark.parametrize("isa", INT8_PATHS)
def test_int8_rank_one_term_is_exact(built, isa, q):
  # fma(dot * scale, qmul, qoff * weight) + bias in float32, on every loop: exact scores, exact
  # ranking (ties to the lower row).
  _need("int8", isa, q)
  rng = np.random.default_rng(100 + q)
  n, d, k = 4500, 132, 12
  m8 = rng.integers(-128, 128, (n, d), dtype=np.int8)
  q8 = rng.integers(-127, 128, (q, d), dtype=np.int8)
  scale, qmul, bias, qoff, weight = _rank_one_inputs(rng, n, q)
  fn = jax.jit(
    lambda *a: native.scan_topk(*a[:5], k=k, query_offset=a[5], row_weight=a[6], isa=isa)
  )
  vals, ids = (np.asarray(a) for a in fn(q8, m8, scale, qmul, bias, qoff, weight))
  dot = (q8.astype(np.int64) @ m8.astype(np.int64).T).astype(np.float32)
  ref = _fma32(dot * scale[None], qmul[:, None], qoff[:, None] * weight[None]) + bias[None]
  ref_vals, ref_ids = _reference(ref, k)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(vals, ref_vals)


@pytest.mark.parametrize("q", RANK_ONE_Q)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_float_rank_one_term_against_float64(built, dtype, q):
  rng = np.random.default_rng(200 + q)
  n, d, k = 4500, 96, 10
  rows = clustered(rng, n, d, 40)
  m = rows.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
  queries = rng.standard_normal((q, d)).astype(np.float32)
  scale, qmul, bias, qoff, weight = _rank_one_inputs(rng, n, q)
  for isa in native.paths(dtype):
    if not native.available(dtype, q) or native._path_for(dtype, q, isa) != isa:
      continue  # this path serves few queries
    vals, ids = (
      np.asarray(a)
      for a in native.scan_topk(
        queries, m, scale, qmul, bias, k, query_offset=qoff, row_weight=weight, isa=isa
      )
    )
    rounded = q > native.FEW_QUERIES and isa == "avx512-bf16"  # batches round queries to bf16
    qref = queries.astype(ml_dtypes.bfloat16).astype(np.float32) if rounded else queries
    exact = (qref.astype(np.float64) @ m.astype(np.float64).T) * scale * qmul[:, None]
    exact += bias + qoff[:, None].astype(np.float64) * weight
    tol = 1e-2 if rounded else 1e-4
    np.testing.assert_allclose(vals, np.take_along_axis(exact, ids, 1), atol=tol)
    assert np.all(vals[:, -1] >= -np.sort(-exact, axis=1)[:, k - 1] - tol)
    assert not np.isin(ids, np.flatnonzero(bias == -np.inf)).any()


@pytest.mark.parametrize("q", RANK_ONE_Q)
@pytest.mark.parametrize(
  "dtype,method", [("int8", "int8"), ("bfloat16", "bf16"), ("float16", "f32")]
)
def test_topk_with_statistics_runs_the_kernel_for_batches(built, dtype, method, q):
  # `topk` with a rank-one term takes the native kernel for any Q the kernel serves (it used to
  # send batches to XLA) and agrees with XLA's path: int8 to an ulp (XLA contracts one product or
  # the other into an FMA), floats to the rounding of their products.
  if not topk_lib._uses_native(method, jax.numpy.dtype(dtype), q, 64):
    pytest.skip(f"no native {dtype} kernel for {q} queries here ({native.status()})")
  rng = np.random.default_rng(300 + q)
  x = clustered(rng, 6000, 64, 60)
  if dtype == "int8":
    m, scales = quantize_int8(x)
  else:
    m = x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    scales = rng.uniform(0.5, 2.0, len(x)).astype(np.float32)
  queries = x[rng.integers(0, len(x), q)] + 0.05 * rng.standard_normal((q, 64)).astype(np.float32)
  valid = rng.random(len(x)) > 0.25
  qoff = rng.normal(0, 0.5, q).astype(np.float32)
  weight = rng.uniform(0.5, 2.0, len(x)).astype(np.float32)
  kw = dict(scales=scales, valid=valid, query_offset=qoff, row_weight=weight)
  target = native._TARGETS[dtype]
  assert target in str(
    jax.make_jaxpr(lambda *a: topk_lib.topk(*a, 10, method=method, **kw))(queries, m)
  )
  a = topk_lib.topk(queries, m, 10, method=method, **kw)
  b = topk_lib.topk(queries, m, 10, method=f"{method}-xla", **kw)
  if dtype == "int8":
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-6, atol=1e-6)
    same = np.asarray(a[1]) == np.asarray(b[1])
    assert same.mean() >= 0.98  # the others: near ties, swapped by an ulp
  else:  # the XLA bf16 product rounds the queries to bf16; the kernel keeps them float32
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = (qn.astype(np.float64) @ m.astype(np.float64).T) * scales + qoff[:, None] * weight
    exact[:, ~valid] = -np.inf
    got = np.take_along_axis(exact, np.asarray(a[1]), 1)
    np.testing.assert_allclose(np.asarray(a[0]), got, rtol=1e-5, atol=1e-5)
    assert np.all(got[:, -1] >= -np.sort(-exact, axis=1)[:, 9] - 1e-5)
  assert not np.isin(np.asarray(a[1]), np.flatnonzero(~valid)).any()


@pytest.mark.parametrize("isa", BF16_PATHS)
@pytest.mark.parametrize("q,d", [(1, 512), (3, 130), (8, 64), (17, 96), (40, 512)])
def test_bf16_kernel_against_float64(built, isa, q, d):
  _need("bfloat16", isa)
  rng = np.random.default_rng(q * d)
  n = 5000
  mb = clustered(rng, n, d, 40).astype(ml_dtypes.bfloat16)
  queries = rng.standard_normal((q, d)).astype(np.float32)
  bias = np.where(rng.random(n) < 0.1, -np.inf, 0.0).astype(np.float32)
  ones = np.ones(n, np.float32)
  vals, ids = _call(queries, mb, ones, np.ones(q, np.float32), bias, 10, isa)
  # Float32-accurate (AVX-512: bf16 high + low pairs; AVX2: float32 queries), except AVX-512
  # batches: they round the queries to bf16.
  rounded = q > native.FEW_QUERIES and isa == "avx512-bf16"
  qref = queries.astype(ml_dtypes.bfloat16).astype(np.float32) if rounded else queries
  exact = qref.astype(np.float64) @ mb.astype(np.float64).T + bias[None]
  tol = 1e-3 if rounded else 1e-4
  np.testing.assert_allclose(vals, np.take_along_axis(exact, ids, 1), atol=tol)
  kth = -np.sort(-exact, axis=1)[:, 9]
  assert np.all(vals[:, -1] >= kth - tol)  # nothing better than the returned tenth was missed


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("q", [4, 20])
def test_topk_native_bf16_matches_xla(built, metric, q):
  _need("bfloat16", queries=q)
  if not topk_lib._uses_native("bf16", ml_dtypes.bfloat16, q, 128):
    pytest.skip(f"topk does not run the native bfloat16 kernel for {q} queries here")
  rng = np.random.default_rng(11)
  x = clustered(rng, 8000, 128, 80)
  mb = x.astype(ml_dtypes.bfloat16)
  queries = x[rng.integers(0, len(x), q)] + 0.01 * rng.standard_normal((q, 128)).astype(np.float32)
  valid = rng.random(len(x)) > 0.3
  a = topk_lib.topk(queries, mb, 10, metric=metric, valid=valid, method="bf16")
  b = topk_lib.topk(queries, mb, 10, metric=metric, valid=valid, method="reduce")
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", F16_PATHS)
@pytest.mark.parametrize("q,d", [(1, 512), (3, 100), (8, 64), (5, 6), (9, 6), (17, 100), (40, 512)])
def test_f16_kernel_against_float64(built, isa, q, d):
  _need("float16", isa)
  if q > native.FEW_QUERIES and ("float16", isa) not in native.MANY_QUERIES:
    pytest.skip(f"the {isa} float16 path serves few queries")
  rng = np.random.default_rng(q + d)
  n = 4500  # two full blocks of rows and a tail
  m16 = clustered(rng, n, d, 50).astype(np.float16)
  queries = rng.standard_normal((q, d)).astype(np.float32)
  bias = np.where(rng.random(n) < 0.2, -np.inf, rng.uniform(-0.1, 0, n)).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, n).astype(np.float32)
  vals, ids = _call(queries, m16, scale, np.ones(q, np.float32), bias, 10, isa)
  exact = (queries.astype(np.float64) @ m16.astype(np.float64).T) * scale + bias
  np.testing.assert_allclose(vals, np.take_along_axis(exact, ids, 1), rtol=1e-5, atol=1e-5)
  kth = -np.sort(-exact, axis=1)[:, 9]
  assert np.all(vals[:, -1] >= kth - 1e-5)


@pytest.mark.parametrize(
  "q,d,metric", [(1, 512, "cosine"), (3, 100, "cosine"), (8, 64, "l2"), (20, 64, "l2")]
)
def test_float16_rows_widened_exactly(built, q, d, metric):
  _need("float16", queries=q)
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


def test_kernel_rejects_what_it_cannot_scan(built):
  _need("float16")
  _need("int8")

  def call(q, m, k=3):
    ones = np.ones(len(m), np.float32)
    return jax.block_until_ready(
      native.scan_topk(q, m, ones, np.ones(len(q), np.float32), 0 * ones, k)
    )

  if not native.available("float16", 9):
    with pytest.raises(RuntimeError, match="no native float16 kernel for 9 queries"):
      call(np.ones((9, 64), np.float32), np.ones((50, 64), np.float16))
  with pytest.raises(Exception, match="multiple of 4 bytes"):
    call(np.ones((2, 6), np.int8), np.ones((50, 6), np.int8))
  with pytest.raises(Exception, match=r"expected queries \[Q, D\]"):
    call(np.ones((2, 8), np.int8), np.ones((50, 12), np.int8))
  missing = [p for p in INT8_PATHS if p not in native.paths("int8")]
  for isa in missing:
    with pytest.raises(RuntimeError, match=f"the {isa} path of the int8 kernel does not run here"):
      ones = np.ones(50, np.float32)
      native.scan_topk(
        np.ones((2, 8), np.int8), np.ones((50, 8), np.int8), ones, ones[:2], ones, 3, isa=isa
      )


@pytest.mark.skipif(
  not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
  reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu "
  "qemu-user)",
)
@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod"])
def test_neon_loops_under_qemu(tmp_path, march):
  # The AArch64 loops, cross-compiled with and without sdot, against references under emulation.
  exe = tmp_path / "neon_check"
  src = native.SOURCE.with_name("neon_check.cc")
  flags = ["-O2", "-std=c++17", "-ffp-contract=off", f"-march={march}", "-static", "-w"]
  include = [f"-I{jax.ffi.include_dir()}", f"-I{native.SOURCE.parent}"]
  subprocess.run(["aarch64-linux-gnu-g++", *flags, *include, str(src), "-o", str(exe)], check=True)
  out = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:]
  assert out.stdout.count(": ok") == 27


@pytest.mark.skipif(
  not (shutil.which("g++") and {"avx2", "fma", "f16c"} <= native.cpu_flags()),
  reason="needs g++ and an AVX2 + FMA + F16C CPU",
)
def test_avx_vnni_and_amx_loops_with_the_instructions_emulated(tmp_path):
  # Neither this project's CPU nor qemu-x86_64 7.2 runs AVX-VNNI or AMX: the loops around the VEX
  # vpdpbusd and the tile instructions (packing, row sums, tiles, scratch copies, rank-one term,
  # heaps) run with those replaced by exact equivalents, against integer references; the
  # instructions themselves are checked in the object code.
  exe = tmp_path / "emulated_check"
  src = native.SOURCE.with_name("emulated_check.cc")
  flags = ["-O2", "-std=c++17", "-ffp-contract=off", "-w"]
  include = [f"-I{jax.ffi.include_dir()}", f"-I{native.SOURCE.parent}"]
  subprocess.run(["g++", *flags, *include, str(src), "-o", str(exe)], check=True)
  out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:]
  assert out.stdout.count("avx-vnni (emulated)") == 21, out.stdout
  assert out.stdout.count("amx-int8 (emulated)") == 15, out.stdout
  assert "MISMATCH" not in out.stdout


# The kCpu* bits of scan_topk.h, by /proc/cpuinfo names.
_CPU_BITS = {
  frozenset({"avx2", "fma", "f16c"}): 1,
  frozenset({"avx512f", "avx512bw"}): 2,
  frozenset({"avx512_vnni"}): 4,
  frozenset({"avx512_bf16"}): 8,
  frozenset({"avx_vnni"}): 16,
  frozenset({"amx_tile", "amx_int8"}): 32,  # and Linux granted the tile state
}
_CPUS = {  # /proc/cpuinfo flags (the relevant ones) of CPUs this machine is not
  "zen3": {"avx2", "fma", "f16c"},
  "alder_lake": {"avx2", "fma", "f16c", "avx_vnni"},
  "ice_lake": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni"},
  "sapphire_rapids": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
  | {"avx_vnni", "amx_tile", "amx_int8", "amx_bf16"},
  "avx_only": {"avx", "sse4_2"},
}
_BEST_INT8 = {  # cpu: (path for 1 query, for 100)
  "zen3": ("avx2", "avx2"),
  "alder_lake": ("avx-vnni", "avx-vnni"),
  "ice_lake": ("avx512-vnni", "avx512-vnni"),
  "sapphire_rapids": ("avx512-vnni", "amx-int8"),
  "avx_only": (None, None),
}


@pytest.mark.parametrize("cpu", sorted(_CPUS))
def test_dispatch_is_a_function_of_the_cpu_flags(built, cpu):
  # The Python choice (/proc/cpuinfo names) and the library's (cpuid bits) agree for each CPU.
  flags = frozenset(_CPUS[cpu])
  lib = native._load().lib
  if lib is None:
    pytest.skip(native.status())
  bits = sum(b for names, b in _CPU_BITS.items() if names <= flags)
  for code, dtype in enumerate(native.DTYPES):
    mask = lib.vgg_topk_isas_for(code, bits)
    codes = {name: c for name, c, _ in native.ISAS[dtype]}
    names = [p for p in native.paths_for(dtype, flags) if p != "neon"]
    assert mask == sum(1 << codes[p] for p in names), (dtype, mask, names)
    if dtype == "int8":
      few, many = (native.pick_path("int8", q, names) for q in (1, 100))
      assert (few, many) == _BEST_INT8[cpu]
      assert native.pick_path("int8", 9, names) == many
  assert lib.vgg_topk_isas_for(0, lib.vgg_cpu_features()) == lib.vgg_topk_isas(0)
  if not {"amx_tile", "amx_int8"} <= native.cpu_flags():
    assert lib.vgg_amx_status() == -1  # no AMX: nothing asked of Linux, no reason to give


def _disassembly():
  """(function name, instruction line) of every instruction of the library, from objdump."""
  text = subprocess.run(
    ["objdump", "-d", "-C", "--no-show-raw-insn", str(native.library_path())],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  fn = None
  for line in text.splitlines():
    if line.endswith(">:"):
      fn = line[line.index("<") + 1 : -2]
    elif fn is not None:
      yield fn, line


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs objdump (binutils)")
def test_the_library_holds_vex_vpdpbusd_only_in_the_avx_vnni_loops(built):
  # The AVX-VNNI loops are compiled in (VEX-encoded vpdpbusd on ymm) and no other function has
  # the instruction in that form: an AVX2-only CPU never meets it.
  where = {}
  for fn, line in _disassembly():
    if "{vex} vpdpbusd" in line and "%ymm" in line:
      where[fn] = where.get(fn, 0) + 1
  assert where, "no VEX vpdpbusd in the library"
  assert all("Vnni" in name for name in where), sorted(where)
  assert any("VnniMicro62" in name for name in where) and any("ScanSmallVnni" in n for n in where)


def test_a_cpu_whose_amx_is_refused_runs_the_next_path_and_says_why(built, caplog):
  # Flags that promise AMX (as /proc/cpuinfo would) on a CPU whose cpuid, or whose kernel, says
  # no: the int8 kernel keeps its other paths and the reason is logged once and in the status.
  flags = native.cpu_flags() | {"avx512f", "avx512bw", "amx_tile", "amx_int8"}
  state = native._probe(flags)
  if state.lib is None:
    pytest.skip(native.status())
  if state.lib.vgg_amx_status() == 0:
    pytest.skip("this CPU runs AMX")
  assert "amx-int8" not in state.paths["int8"] and state.paths["int8"]
  (note,) = state.notes
  assert note.startswith("amx-int8 not used: ")

  class Refused:  # the library's answer where Linux refuses the tile state (EPERM)
    def vgg_amx_status(self):
      return 1

  assert "Linux refused" in native._amx_refusal(Refused())
  assert os.strerror(1) in native._amx_refusal(Refused())


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs objdump (binutils)")
def test_the_library_holds_amx_instructions_only_in_the_amx_loop(built):
  where = {}
  for fn, line in _disassembly():
    for op in ("tdpbssd", "tileloadd", "tilestored", "ldtilecfg", "tilerelease", "tilezero"):
      if f"\t{op} " in line or line.endswith(f"\t{op}"):
        where.setdefault(op, set()).add(fn)
  assert set(where) == {"tdpbssd", "tileloadd", "tilestored", "ldtilecfg", "tilerelease"} | (
    {"tilezero"} & set(where)
  ), sorted(where)
  assert all("Amx" in f for fns in where.values() for f in fns), where


# ---- build, trust and fallback: these run on every CPU ----


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """A private cache root, a forgotten load state, and a fake compiler that counts its runs."""
  root = tmp_path / "cache"
  root.mkdir(mode=0o700)
  monkeypatch.setenv("VGG_RETRIEVAL_CACHE", str(root))
  monkeypatch.setattr(native, "_state", None)
  runs = []

  def fake_compile(cxx, out):
    runs.append(out)
    out.write_bytes(b"\x7fELF a library " * 64)

  monkeypatch.setattr(native, "_compile", fake_compile)
  monkeypatch.setattr(native, "_compiler", lambda: sys.executable)  # `--version` runs anywhere
  monkeypatch.setattr(native, "_cannot_run", lambda flags: None)
  return root, runs


def test_the_build_compiles_every_source_and_its_key_covers_each_file(monkeypatch, tmp_path):
  # Every .cc of the package but the test program goes into the library, and a change to any
  # source or to the header names another library (a stale one is never loaded for new code).
  here = native.SOURCE.parent
  checks = {"neon_check.cc", "emulated_check.cc"}  # test programs
  assert {p.name for p in native.SOURCES} == {p.name for p in here.glob("*.cc")} - checks
  assert {p.name for p in native.HEADERS} == {p.name for p in here.glob("*.h")}
  files = (*native.SOURCES, *native.HEADERS)
  keys = {native._key(sys.executable)}
  for i, path in enumerate(files):
    changed = tmp_path / path.name
    changed.write_bytes(path.read_bytes() + b"\n")
    edited = files[:i] + (changed,) + files[i + 1 :]
    monkeypatch.setattr(native, "SOURCES", edited[: len(native.SOURCES)])
    monkeypatch.setattr(native, "HEADERS", edited[len(native.SOURCES) :])
    keys.add(native._key(sys.executable))
  assert len(keys) == len(files) + 1


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_cpu_without_the_extensions_compiles_nothing_and_says_why(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("VGG_RETRIEVAL_CACHE", str(tmp_path))
  monkeypatch.setattr(native, "_state", None)
  monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"fpu", "sse2", "avx"}))

  def no_compiler(*a):
    raise AssertionError("compiled for a CPU that cannot run the library")

  monkeypatch.setattr(native, "_compile", no_compiler)
  with pytest.raises(RuntimeError, match="neither AVX2 \\+ FMA \\+ F16C nor AVX-512|x86-64"):
    native.build()
  assert not list(tmp_path.rglob("*.so"))
  with caplog.at_level(logging.WARNING):
    assert not native.available("int8")
    assert not native.available("float16", 1)
    assert native.isa("bfloat16") is None
  lines = _warnings(caplog)
  assert len(lines) == 1, lines  # one line, once
  assert "native scan kernels not used" in lines[0] and "XLA" in lines[0]
  assert "AVX2" in lines[0] or "x86-64" in lines[0]


def test_fallback_answers_like_xla(monkeypatch, tmp_path):
  monkeypatch.setenv("VGG_RETRIEVAL_CACHE", str(tmp_path))
  monkeypatch.setattr(native, "_state", None)
  monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2"}))
  rng = np.random.default_rng(5)
  x = clustered(rng, 3000, 64, 30)
  m8, scale = quantize_int8(x)
  q = x[:3] + 0.01
  assert not topk_lib._uses_native("int8", np.int8, 3, 64)
  a = streaming.chunked_topk(q, m8, 5, scales=scale)  # the default method, with no kernel
  b = topk_lib.topk(q, m8, 5, scales=scale, method="int8-xla")
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_build_records_a_digest_and_reuses_a_verified_library(fresh):
  root, runs = fresh
  lib = native.build()
  assert len(runs) == 1 and lib.parent == root / "native"
  recorded = lib.with_name(lib.name + ".sha256").read_text().split()[0]
  assert recorded == hashlib.sha256(lib.read_bytes()).hexdigest()
  assert native.verify(lib) is None
  assert native.build() == lib and len(runs) == 1  # verified: not compiled again
  assert not (root / "native").stat().st_mode & 0o077


def test_a_group_writable_umask_still_yields_a_trusted_library(fresh):
  old = os.umask(0o002)
  try:
    lib = native.build()
  finally:
    os.umask(old)
  assert native.verify(lib) is None
  assert not lib.stat().st_mode & 0o022


def test_a_truncated_library_is_refused_then_rebuilt(fresh):
  root, runs = fresh
  lib = native.build()
  good = lib.read_bytes()
  lib.write_bytes(good[:100])  # a torn write, or a full disk
  assert "does not match its recorded sha256" in native.verify(lib)
  assert native.build() == lib and len(runs) == 2
  assert lib.read_bytes() == good and native.verify(lib) is None


def test_a_digest_mismatch_is_detected(fresh):
  _, runs = fresh
  lib = native.build()
  data = bytearray(lib.read_bytes())
  data[-1] ^= 1  # same length, one bit
  lib.write_bytes(bytes(data))
  assert "does not match" in native.verify(lib)
  lib.with_name(lib.name + ".sha256").unlink()
  assert "not built" in native.verify(lib)


def test_a_replaced_library_is_never_loaded(fresh, monkeypatch, caplog):
  _, _ = fresh
  lib = native.build()
  lib.write_bytes(b"planted" * 100)

  def no_dlopen(*a, **kw):
    raise AssertionError("dlopen of an unverified library")

  monkeypatch.setattr(native.ctypes, "CDLL", no_dlopen)
  with caplog.at_level(logging.WARNING):
    assert not native.available("int8")
  (line,) = _warnings(caplog)
  assert "does not match its recorded sha256" in line


@pytest.mark.parametrize("where", ["native", "root"])
def test_a_cache_writable_by_others_is_refused(fresh, monkeypatch, caplog, where):
  root, runs = fresh
  lib = native.build()
  (lib.parent if where == "native" else root).chmod(0o777)
  assert "writable by group or others" in native.verify(lib)
  with pytest.raises(RuntimeError, match="untrusted cache"):
    native.build()
  monkeypatch.setattr(native.ctypes, "CDLL", lambda *a, **kw: pytest.fail("dlopen"))
  with caplog.at_level(logging.WARNING):
    assert not native.available("int8")
  (line,) = _warnings(caplog)
  assert "untrusted cache" in line and "writable by group or others" in line


def test_a_library_linked_from_outside_the_cache_is_refused(fresh, tmp_path):
  _, _ = fresh
  lib = native.build()
  outside = tmp_path / "elsewhere.so"
  outside.write_bytes(lib.read_bytes())
  lib.unlink()
  lib.symlink_to(outside)
  assert "lies outside the cache" in native.verify(lib)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_owned_by_another_user_is_refused(fresh):
  root, _ = fresh
  lib = native.build()
  os.chown(lib.parent, 65534, 65534)
  assert "owned by another user" in native.verify(lib)


def test_search_survives_a_truncated_library_in_a_fresh_process(tmp_path):
  # The library at the expected name is torn: the search must neither crash (SIGBUS) nor
  # differ; it refuses the library, says why and answers with XLA's products.
  code = """
import numpy as np, pathlib
from engine.kernels import native, topk
try:
  lib = native.library_path()
except RuntimeError:
  lib = None
if lib is not None:
  lib.parent.mkdir(mode=0o700, parents=True)
  lib.write_bytes(b"\\x7fELF" + bytes(60))
  lib.with_name(lib.name + ".sha256").write_text("0" * 64 + "\\n")
rng = np.random.default_rng(0)
m8 = rng.integers(-127, 128, (5000, 64), dtype=np.int8)
q = rng.standard_normal((2, 64)).astype(np.float32)
s, i = topk.topk(q, m8, 5, metric="l2")
s2, i2 = topk.topk(q, m8, 5, metric="l2", method="int8-xla")
assert (np.asarray(i) == np.asarray(i2)).all() and (np.asarray(s) == np.asarray(s2)).all()
print(native.status())
"""
  env = dict(os.environ, VGG_RETRIEVAL_CACHE=str(tmp_path / "cache"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "off (" in out.stdout
  if native.cpu_flags() and "no C++ compiler" not in out.stdout:
    assert "does not match" in out.stdout or "x86-64" in out.stdout or "neither" in out.stdout


def test_disabled_by_environment():
  env = dict(os.environ, VGG_RETRIEVAL_NATIVE="0")
  code = "from engine.kernels import native; print(native.available(), native.status())"
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
  ).stdout
  assert out.startswith("False") and "VGG_RETRIEVAL_NATIVE=0" in out


def test_importing_and_tracing_compile_nothing(tmp_path):
  # A fresh cache: importing the engine, tracing `topk` and asking `available` never run a compiler.
  code = """
import numpy as np
from engine.kernels import native, topk
native._compile = lambda *a: (_ for _ in ()).throw(AssertionError("compiled"))
m8 = np.ones((100, 64), np.int8)
topk.topk(np.ones((1, 64), np.float32), m8, 3, scales=np.ones(100, np.float32))
print(native.available("int8"), native.status())
"""
  env = dict(os.environ, VGG_RETRIEVAL_CACHE=str(tmp_path / "cache"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("False")
  assert not list(tmp_path.rglob("*.so"))
