"""Compressed indexes re-score their candidates exactly: returned scores against a float64 brute
force over the stored (dequantised) rows, for both metrics, with and without normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from engine.store import Index

D = 16


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float16"])
@pytest.mark.parametrize("metric,normalize", [("l2", False), ("l2", True), ("cosine", True)])
def test_scores_are_exact_for_the_stored_rows(tmp_path, dtype, metric, normalize):
  rng = np.random.default_rng(11)
  x = (rng.standard_normal((1500, D)) * rng.uniform(0.5, 2, (1500, 1))).astype(np.float32)
  keys = [f"k{i}" for i in range(len(x))]
  q = (rng.standard_normal((9, D)) * 1.5).astype(np.float32)
  with Index.create(tmp_path / "i", dim=D, dtype=dtype, normalize=normalize) as idx:
    idx.add(x, keys)
    stored = np.asarray(idx.get_vectors(keys), np.float64)
    s, k = idx.search(q, k=8, metric=metric)
  qq = q.astype(np.float64)
  if normalize:
    qq /= np.linalg.norm(qq, axis=1, keepdims=True)
  if metric == "l2":
    full = ((qq[:, None] - stored[None]) ** 2).sum(-1)  # squared distances, ascending
    want = np.sort(full, axis=1)[:, :8]
  else:
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    full = -(qq @ unit.T)
    want = -np.sort(full, axis=1)[:, :8]
  np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-5)
  pos = {key: i for i, key in enumerate(keys)}
  got = np.array([[full[r, pos[key]] for key in row] for r, row in enumerate(k)])
  np.testing.assert_allclose(got if metric == "l2" else -got, s, rtol=1e-5, atol=1e-5)
