"""Pooled descriptors against numpy references written from the papers, not from the engine.

R-MAC follows Tolias, Sicre and Jegou (ICLR 2016), "Particular object retrieval with integral
max-pooling of CNN activations", as laid out by the authors' `rmac_regions.m` (and the `rmac` of
cnnimageretrieval-pytorch): L scales; at scale l square regions of side floor(2 * min(W, H) / (l + 1));
l regions along the short side and l + m along the long side, m in 1..6 chosen so that neighbours
overlap by about 40%; positions floor(i * (side_len - wl) / (count - 1)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.features import descriptors


def _paper_regions(height: int, width: int, levels: int) -> list[tuple[int, int, int, int]]:
  """The published region grid as (top, left, h, w), written from rmac_regions.m."""
  ovr = 0.4
  w = min(width, height)
  best_m, best_err = 1, None
  for steps in range(2, 8):  # regions along the long side at level 1
    b = (max(width, height) - w) / (steps - 1)
    err = abs((w * w - w * b) / (w * w) - ovr)
    if best_err is None or err < best_err:  # first minimum wins, as MATLAB's min
      best_m, best_err = steps - 1, err
  wd = best_m if width > height else 0
  hd = best_m if height > width else 0
  out = []
  for level in range(1, levels + 1):
    wl = math.floor(2 * w / (level + 1))
    if wl == 0:
      continue
    wl2 = math.floor(wl / 2 - 1)
    bw = (width - wl) / (level + wd - 1) if level + wd > 1 else 0.0
    bh = (height - wl) / (level + hd - 1) if level + hd > 1 else 0.0
    cen_w = [math.floor(wl2 + i * bw) - wl2 for i in range(level + wd)]
    cen_h = [math.floor(wl2 + i * bh) - wl2 for i in range(level + hd)]
    out += [(top, left, wl, wl) for top in cen_h for left in cen_w]
  return out


def _engine_layout(height, width, levels):
  # The engine pools the whole map first and counts each distinct region once.
  return list(dict.fromkeys([(0, 0, height, width)] + _paper_regions(height, width, levels)))


SIZES = [(7, 7), (6, 9), (9, 6), (14, 10), (10, 14), (3, 20), (20, 3), (16, 31), (31, 16), (30, 40)]
SIZES += [(12, 12), (1, 1), (2, 5), (37, 50), (24, 42), (32, 64), (50, 37)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_rmac_regions_follow_the_paper(height, width, levels):
  assert descriptors.rmac_regions(height, width, levels) == _engine_layout(height, width, levels)


def test_rmac_region_counts_known_values():
  # Hand-checked counts (whole map + grid): 30x40 (conv5 of 480x640) picks m = 1: 2+6+12 regions.
  assert len(_paper_regions(30, 40, 3)) == 2 + 6 + 12
  assert len(descriptors.rmac_regions(30, 40, 3)) == 1 + 20
  # Square maps: 1 + 4 + 9 regions, level 1 is the whole map (counted once).
  assert len(descriptors.rmac_regions(12, 12, 3)) == 1 + 4 + 9
  # A long strip picks many extra regions on its long side (m = 6 for 3x20).
  strip = [(0, 0, 3, 3), (0, 2, 3, 3), (0, 5, 3, 3), (0, 8, 3, 3), (0, 11, 3, 3), (0, 14, 3, 3)]
  assert descriptors.rmac_regions(3, 20, 1)[1:] == strip + [(0, 17, 3, 3)]


def _l2n(v):
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)


def _numpy_rmac(fmap, levels):
  total = 0.0
  for top, left, h, w in _engine_layout(fmap.shape[1], fmap.shape[2], levels):
    total = total + _l2n(fmap[:, top : top + h, left : left + w].max((1, 2)))
  return total


@pytest.mark.parametrize("height,width", [(6, 9), (9, 6), (14, 10), (7, 7), (3, 20), (31, 16)])
def test_rmac_descriptor_against_numpy(height, width):
  rng = np.random.default_rng(height * 100 + width)
  fmap = rng.uniform(0, 1, (2, height, width, 8)).astype(np.float64)
  fmap *= rng.uniform(0, 1, fmap.shape) < 0.3  # sparse, as post-ReLU maps are
  fmap = fmap.astype(np.float32)
  got = np.asarray(descriptors.rmac(fmap, 3))
  np.testing.assert_allclose(got, _numpy_rmac(fmap.astype(np.float64), 3), rtol=2e-5, atol=1e-6)
  d = descriptors.Descriptor("rmac", levels=3)
  out = np.asarray(descriptors.describe({"conv5_3": fmap}, d))
  np.testing.assert_allclose(out, _l2n(_numpy_rmac(fmap.astype(np.float64), 3)), atol=2e-6)


def _fmap(seed, shape=(3, 5, 7, 16)):
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 2, shape).astype(np.float32) * (rng.uniform(0, 1, shape) < 0.5)


def test_mac_and_spoc_against_numpy():
  fmap = _fmap(1)
  np.testing.assert_array_equal(descriptors.mac(fmap), fmap.max((1, 2)))
  np.testing.assert_allclose(descriptors.spoc(fmap), fmap.astype(np.float64).mean((1, 2)), 1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 7.5])
def test_gem_against_numpy(p):
  fmap = _fmap(2)
  x = np.maximum(fmap.astype(np.float64), descriptors.EPS)
  ref = (x**p).mean((1, 2)) ** (1 / p)
  np.testing.assert_allclose(descriptors.gem(fmap, p), ref, rtol=2e-5)
  d = descriptors.Descriptor("gem", p=p)
  np.testing.assert_allclose(descriptors.describe({"conv5_3": fmap}, d), _l2n(ref), atol=2e-6)


def test_gem_limits():
  fmap = _fmap(3)
  clamped = np.maximum(fmap.astype(np.float64), descriptors.EPS)
  np.testing.assert_allclose(descriptors.gem(fmap, 1.0), clamped.mean((1, 2)), rtol=1e-5)
  # GeM grows with p (power-mean inequality).
  prev = None
  for p in (1.0, 2.0, 3.0, 7.5, 30.0):
    cur = np.asarray(descriptors.gem(fmap, p), np.float64)
    if prev is not None:
      assert (cur >= prev * (1 - 1e-5)).all()
    prev = cur
  # Large p approaches MAC: max * (1 / HW)^(1/p) <= GeM_p <= max.
  big = np.asarray(descriptors.gem(fmap, 30.0))
  mx = fmap.max((1, 2))
  assert (big <= mx * (1 + 1e-5)).all() and (big >= mx * (1 / 35) ** (1 / 30) * (1 - 1e-5)).all()
  assert np.abs(big - mx).max() < np.abs(np.asarray(descriptors.gem(fmap, 3.0)) - mx).max()


@pytest.mark.parametrize("name", ["mac", "spoc", "gem", "rmac"])
def test_describe_normalises_and_respects_normalize_false(name):
  fmap = _fmap(4)
  out = np.asarray(descriptors.describe({"conv5_3": fmap}, descriptors.Descriptor(name)))
  raw = np.asarray(
    descriptors.describe({"conv5_3": fmap}, descriptors.Descriptor(name, normalize=False))
  )
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5)
  assert np.linalg.norm(raw, axis=1).max() > 1.01 or name == "rmac"


def test_l2_normalize_against_numpy_and_zero_rows():
  x = np.random.default_rng(5).normal(size=(4, 9)).astype(np.float32)
  x[2] = 0
  got = np.asarray(descriptors.l2_normalize(x))
  ref = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-6)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert np.isfinite(got).all() and (got[2] == 0).all()


def _anisotropic(n=4000, d=6, seed=6):
  rng = np.random.default_rng(seed)
  stds = np.array([0.5, 3.0, 1.0, 6.0, 0.1, 2.0])[:d]
  rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (rng.normal(size=(n, d)) * stds) @ rot.T + 5.0, stds, rot


def test_whitening_gives_identity_covariance_on_its_training_rows():
  x, _, _ = _anisotropic()
  w = descriptors.Whitening.learn(x)
  y = (x - w.mean) @ w.projection.astype(np.float64)
  np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
  # Identity up to the documented shrinkage (1e-5 of the largest eigenvalue added to each).
  eig = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
  expected = np.diag(eig / (eig + 1e-5 * eig[0]))
  np.testing.assert_allclose(np.cov(y, rowvar=False), expected, atol=1e-4)
  np.testing.assert_allclose(np.diag(expected)[:5], 1, atol=2e-3)
  out = w(x[:50])
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out, _l2n(y[:50]), atol=1e-4)


def test_whitening_reduction_keeps_the_largest_eigenvalues_in_order():
  x, stds, rot = _anisotropic()
  full = descriptors.Whitening.learn(x)
  w = descriptors.Whitening.learn(x, dim=3)
  assert w.projection.shape == (6, 3)
  order = np.argsort(stds)[::-1][:3]  # 6.0, 3.0, 2.0
  for col, axis in enumerate(order):
    direction = w.projection[:, col] / np.linalg.norm(w.projection[:, col])
    assert abs(direction @ rot[:, axis]) > 0.999, (col, axis)
    # the column is scaled by 1/std of that direction
    np.testing.assert_allclose(np.linalg.norm(w.projection[:, col]), 1 / stds[axis], rtol=0.05)
  # the reduced projection is the leading columns of the full one (up to sign)
  a, b = w.projection, full.projection[:, :3]
  np.testing.assert_allclose(np.abs((a * b).sum(0)) / (np.linalg.norm(a, axis=0) ** 2), 1, 1e-4)


def test_gem_clamps_below_at_eps():
  # As cnnimageretrieval's gem (x.clamp(min=eps)): negative and all-zero channels stay finite.
  fmap = np.random.default_rng(7).normal(size=(2, 4, 5, 6)).astype(np.float32)
  fmap[:, :, :, 0] = 0.0
  fmap[:, :, :, 1] = -1.0
  for p in (1.0, 2.0, 3.0):  # EPS**p still a float32 normal number
    got = np.asarray(descriptors.gem(fmap, p))
    ref = (np.maximum(fmap.astype(np.float64), descriptors.EPS) ** p).mean((1, 2)) ** (1 / p)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(got[:, :2], descriptors.EPS, rtol=1e-4)
  got = np.asarray(descriptors.gem(fmap, 7.5))  # EPS**7.5 underflows: 0, never nan
  assert np.isfinite(got).all() and (got[:, :2] >= 0).all() and (got[:, :2] <= 1e-6).all()
