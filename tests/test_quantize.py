"""The int8 quantisers (stored rows and queries): round to nearest, half a step at most, extremes."""

from __future__ import annotations

import numpy as np
import pytest

from engine.kernels import topk as topk_lib
from engine.store import segments


def _store(x):
  return segments.quantize_int8(x)


def _query(x):
  q, scale = topk_lib._quantize_queries(np.asarray(x, np.float32))
  return np.asarray(q), np.asarray(scale)[:, 0]


QUANTISERS = [pytest.param(_store, id="rows"), pytest.param(_query, id="queries")]


def _rows(seed, n=2000, d=64):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d)) * rng.uniform(0.01, 10, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("quantise", QUANTISERS)
def test_error_is_at_most_half_a_step(quantise):
  x = _rows(0)
  q, scale = quantise(x)
  assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (x.shape[0],)
  np.testing.assert_allclose(scale, np.abs(x).max(1) / 127, rtol=1e-6)
  err = np.abs(x.astype(np.float64) - q.astype(np.float64) * scale[:, None])
  assert (err <= scale[:, None] * (0.5 + 1e-4)).all(), (err / scale[:, None]).max()


@pytest.mark.parametrize("quantise", QUANTISERS)
def test_rounding_is_to_nearest_and_unbiased(quantise):
  # Positive values only: truncation and floor both shift the mean error by about half a step.
  x = np.abs(_rows(1))
  q, scale = quantise(x)
  rel = (x.astype(np.float64) - q * scale[:, None].astype(np.float64)) / scale[:, None]
  assert abs(rel.mean()) < 0.01, rel.mean()
  assert 0.25 < np.abs(rel).mean() * 2 < 0.75  # uniform in [-1/2, 1/2]: mean |e| = 1/4
  # Exactly representable multiples of the step come back unchanged.
  levels = np.arange(-127, 128, dtype=np.float32)[None] * np.float32(0.125)
  q2, s2 = quantise(levels)
  np.testing.assert_array_equal(q2[0], np.arange(-127, 128))
  assert s2[0] == np.float32(0.125)


@pytest.mark.parametrize("quantise", QUANTISERS)
def test_extremes_and_zero_rows(quantise):
  x = np.array(
    [[3.0, -1.0, 0.5], [-2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1e-30, -1e-30, 0.0], [7.0, -7.0, 3.5]],
    np.float32,
  )
  q, scale = quantise(x)
  assert q[0, 0] == 127 and q[1, 0] == -127 and tuple(q[4, :2]) == (127, -127)
  assert q[4, 2] in (63, 64)  # 63.5 rounds to an integer of the nearest two
  assert (q[2] == 0).all() and np.isfinite(scale).all() and scale[2] > 0
  assert tuple(q[3, :2]) == (127, -127)
  np.testing.assert_array_equal(q[0], [127, -42, 21])  # -127/3 = -42.33, 127/6 = 21.17


def test_store_and_query_quantisers_agree():
  x = _rows(2, n=300)
  qa, sa = _store(x)
  qb, sb = _query(x)
  np.testing.assert_allclose(sa, sb, rtol=1e-6)
  assert np.abs(qa.astype(int) - qb.astype(int)).max() <= 1  # division order may differ by an ulp
  assert (qa != qb).mean() < 1e-3
