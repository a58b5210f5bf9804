"""Accelerator-safe memory of the streamed search, read from XLA's memory analysis (compile only).

A pool5 index (25,088-d) is the worst case: one row of float32 is 98 KiB. The chunk size comes from
a byte budget (`streaming.chunk_rows_for`), and the compiled call over such a chunk (the XLA
methods an accelerator runs) must keep its arguments and temporaries inside that budget, with no
widened float32 copy of the chunk among the temporaries.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.kernels import streaming
from engine.kernels import topk as topk_lib

POOL5 = 25_088
BUDGET = 1 << 30  # a small accelerator's share: 1 GiB per call
K = 20

_XLA = {"int8": "int8-xla", "float16": "f32-xla", "bfloat16": "bf16-xla", "float32": "f32-xla"}


def _compiled(q: int, rows: int, dtype: str, metric: str, method: str):
  f = jax.ShapeDtypeStruct
  args = (
    f((q, POOL5), jnp.float32),
    f((rows, POOL5), jnp.dtype(dtype)),
    f((rows,), jnp.float32) if dtype == "int8" else None,
    f((rows,), jnp.bool_),
    f((), jnp.int32),
    f((q, K), jnp.float32),
    f((q, K), jnp.int32),
  )
  lowered = streaming.scan_chunk.lower(*args, k=K, metric=metric, method=method)
  return lowered.compile().memory_analysis()


# The methods `topk` picks off CPU (the "-xla" forms) and the one-query reduce.
@pytest.mark.parametrize(
  "dtype,q,method",
  [(dt, q, m) for dt, m in _XLA.items() for q in (1, 256)]
  + [(dt, 1, "reduce") for dt in ("int8", "float16", "bfloat16")],
)
def test_pool5_chunk_fits_the_budget(dtype, q, method):
  rows = streaming.chunk_rows_for(q, None, dtype, method, d=POOL5, budget=BUDGET)
  assert rows >= 1024
  assert streaming.call_bytes(q, rows, POOL5, dtype) <= BUDGET
  # One more doubling would not fit: the budget, not a row count, sized the chunk.
  assert streaming.call_bytes(q, 2 * rows, POOL5, dtype) > BUDGET
  for metric in ("cosine", "l2"):
    ma = _compiled(q, rows, dtype, metric, method)
    if ma is None:
      pytest.skip("this backend reports no memory analysis")
    used = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
    assert used <= BUDGET, (metric, rows, used)
    # Never a float32 copy of the chunk (it would be 2x-4x the stored rows).
    assert ma.temp_size_in_bytes < rows * POOL5 * 4 // 2, (metric, ma.temp_size_in_bytes)


def test_float16_widening_is_blocked():
  # Without blocking, XLA materialises a [rows, D] float32 copy before the product.
  rows = 8192
  ma = _compiled(16, rows, "float16", "cosine", "f32-xla")
  assert ma.temp_size_in_bytes <= 2 * topk_lib.WIDEN_BLOCK_BYTES + 16 * rows * 4 * 2
  rng = np.random.default_rng(1)
  m = rng.standard_normal((3 * 1024 + 77, 512)).astype(np.float16)
  q = rng.standard_normal((3, 512)).astype(np.float32)
  old = topk_lib.WIDEN_BLOCK_BYTES
  topk_lib.WIDEN_BLOCK_BYTES = 512 * 4 * 256  # 256-row blocks and a remainder
  try:
    got = topk_lib.inner_products(jnp.asarray(q), jnp.asarray(m), None, "f32-xla")
    norms = topk_lib._sq_norms(jnp.asarray(m), None)
  finally:
    topk_lib.WIDEN_BLOCK_BYTES = old
  ref = q.astype(np.float64) @ m.astype(np.float64).T
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(norms), (m.astype(np.float64) ** 2).sum(1), rtol=1e-5, atol=1e-4
  )


class _Device:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_memory_budget_from_device_stats():
  gpu = _Device({"bytes_limit": 80 << 30, "bytes_in_use": 16 << 30})
  assert streaming.memory_budget(gpu) == int((64 << 30) * streaming.DEVICE_BUDGET_FRACTION)
  host = streaming.memory_budget(_Device(None))
  assert 0 < host <= streaming.HOST_BUDGET_CAP
  # An accelerator's budget sizes its chunks: a pool5 float32 chunk of a 16 GiB budget.
  rows = streaming.chunk_rows_for(256, None, "float32", "f32-xla", d=POOL5, budget=16 << 30)
  assert streaming.call_bytes(256, rows, POOL5, "float32") <= 16 << 30
