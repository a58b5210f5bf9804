"""Alpha query expansion and DBA (engine/app/expansion.py) against direct numpy references, and the
Revisited Oxford / Paris ground truth of bench/quality.py on a ground truth written here."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bench import metrics
from engine import store
from engine.app import expansion

REPO = pathlib.Path(__file__).resolve().parents[1]


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute(q, x, k):
  s = _unit(q) @ _unit(x).T
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), order


def test_alpha_qe_is_the_weighted_sum():
  rng = np.random.default_rng(0)
  q = _unit(rng.normal(size=(3, 8)))
  nb = _unit(rng.normal(size=(3, 4, 8)))
  s = rng.uniform(-0.5, 1, size=(3, 4))
  got = expansion.alpha_qe(q, nb, s, alpha=3.0)
  for i in range(3):
    v = q[i].copy()
    for j in range(4):
      if s[i, j] > 0:
        v += s[i, j] ** 3 * nb[i, j]
    np.testing.assert_allclose(got[i], v / np.linalg.norm(v), atol=1e-6)
  # alpha = 0: every positive neighbour counts once, negative ones not at all
  got0 = expansion.alpha_qe(q, nb, s, alpha=0.0)
  want0 = _unit(q + np.einsum("qn,qnd->qd", (s > 0).astype(float), nb))
  np.testing.assert_allclose(got0, want0, atol=1e-6)


@pytest.fixture
def flat(tmp_path):
  rng = np.random.default_rng(1)
  x = _unit(rng.normal(size=(40, 16)) + rng.normal(size=16))
  keys = [f"k{i:02d}" for i in range(len(x))]
  idx = store.Index.create(tmp_path / "i", dim=16, dtype="float32")
  idx.add(x, keys)
  yield idx, x, keys, rng
  idx.close()


def test_qe_search_equals_the_reference(flat):
  idx, x, keys, rng = flat
  q = _unit(x[:3] + rng.normal(size=(3, 16)) * 0.4)
  s1, o1 = _brute(q, x, 5)
  w = np.maximum(s1, 0) ** 2.0
  qe = _unit(q + np.einsum("qn,qnd->qd", w, x[o1]))
  want_s, want_o = _brute(qe, x, 7)
  got_s, got_k = expansion.search(idx, q, 7, qe=5, qe_alpha=2.0)
  np.testing.assert_allclose(got_s, want_s, atol=1e-5)
  assert got_k.tolist() == [[keys[j] for j in row] for row in want_o]


def test_dba_reranks_by_augmented_vectors(flat):
  idx, x, keys, rng = flat
  n = 3
  s_all = x @ x.T
  np.fill_diagonal(s_all, -np.inf)  # each vector's own neighbours, itself excluded
  nb = np.argsort(-s_all, axis=1, kind="stable")[:, :n]
  w = np.maximum(np.take_along_axis(s_all, nb, 1), 0) ** 3.0
  aug = _unit(x + np.einsum("nk,nkd->nd", w, x[nb]))
  q = _unit(x[5:7] + rng.normal(size=(2, 16)) * 0.3)
  want_s, want_o = _brute(q, aug, 6)
  # A shortlist of the whole index: the re-ranking is the full ranking by augmented vectors.
  got_s, got_k = expansion.search(idx, q, 6, dba_n=n, shortlist=len(x))
  np.testing.assert_allclose(got_s, want_s, atol=1e-5)
  assert got_k.tolist() == [[keys[j] for j in row] for row in want_o]


def test_expansion_uses_the_index_statistics(flat):
  idx, x, keys, rng = flat
  idx.learn_statistics("center")
  q = x[:2]
  got_s, got_k = expansion.search(idx, q, 4, dba_n=2, shortlist=len(x))
  assert got_k[:, 0].tolist() == ["k00", "k01"]
  assert got_s.max() <= 1 + 1e-6 and got_s[:, -1].max() < 0.9  # centred cosines, not raw ones
  with pytest.raises(ValueError):
    expansion.search(idx, q, 4, qe=-1)


def _revisited_gnd(path):
  gnd = {
    "imlist": ["a", "b", "c", "d", "e", "f"],
    "qimlist": ["q1", "q2"],
    "gnd": [
      {"bbx": [1, 2, 30, 40], "easy": [0], "hard": [2], "junk": [1]},
      {"bbx": [0, 0, 10, 10], "easy": [], "hard": [4], "junk": []},
    ],
  }
  path.write_text(json.dumps(gnd))


def test_revisited_easy_medium_hard(tmp_path):
  _revisited_gnd(tmp_path / "gnd.json")
  truth = metrics.revisited_to_truth(tmp_path / "gnd.json")
  assert truth["queries"]["q1"]["bbox"] == [1, 2, 30, 40]
  rankings = {"q1": list("dabcef"), "q2": list("eabcdf")}
  res = metrics.evaluate_revisited(rankings, truth)
  # q1 easy: a alone relevant, b and c removed -> d, a: AP (0 + 1/2)/2 = 1/4.
  # q1 medium: a and c relevant, b removed -> d, a, c: 1/2 * (0 + 1/2)/2 + 1/2 * (1/2 + 2/3)/2.
  # q1 hard: c relevant, b and a removed -> d, c: 1/4. q2: no easy image (left out of Easy), e first.
  assert res["easy"]["queries"] == 1 and res["easy"]["map"] == pytest.approx(0.25)
  assert res["medium"]["per_query"]["q1"]["ap"] == pytest.approx(5 / 12)
  assert res["medium"]["map"] == pytest.approx((5 / 12 + 1) / 2)
  assert res["hard"]["map"] == pytest.approx((0.25 + 1) / 2)


@pytest.mark.parametrize(
  "gnd",
  [
    {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3]}]},
    {"imlist": ["a"], "qimlist": ["q", "r"], "gnd": [{"easy": [0]}]},
    {"qimlist": ["q"], "gnd": [{"easy": [0]}]},
    {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "bbx": [1, 2]}]},
  ],
)
def test_revisited_rejects_bad_files(tmp_path, gnd):
  (tmp_path / "g.json").write_text(json.dumps(gnd))
  with pytest.raises(ValueError):
    metrics.revisited_to_truth(tmp_path / "g.json")


def test_quality_binary_revisited(tmp_path):
  _revisited_gnd(tmp_path / "gnd.json")
  # Database vectors on a circle; the queries are indexed images too (--queries=index).
  angles = {"q1": 0, "d": 5, "a": 10, "b": 15, "c": 20, "e": 60, "f": 90, "q2": 58}
  vecs = np.array([[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in angles.values()])
  with store.Index.create(tmp_path / "idx", dim=2, dtype="float32") as idx:
    idx.add(vecs, [f"/p/{k}.jpg" for k in angles])
  truth, out = tmp_path / "truth.json", tmp_path / "res.json"
  cmd = [sys.executable, "-m", "bench.quality", f"--ground_truth={truth}"]
  r = subprocess.run(
    [*cmd, f"--convert_revisited={tmp_path / 'gnd.json'}"], cwd=REPO, capture_output=True, text=True
  )
  assert r.returncode == 0, r.stderr
  r = subprocess.run(
    [*cmd, f"--index={tmp_path / 'idx'}", f"--output={out}"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 0, r.stderr
  res = json.loads(out.read_text())["setups"]
  # q1 ranks q1, d, a, b, c, ...: q1 and d are not relevant, so as above with d and q1 first.
  # Easy: q1, d, a -> a at rank 2: (1/2)(0 + 1/3) = 1/6; Hard: q1, d, c -> 1/6; q2 ranks
  # itself, then e: (1/2)(0 + 1/2) = 1/4.
  assert res["easy"]["map"] == pytest.approx(1 / 6) and res["easy"]["queries"] == 1
  assert res["hard"]["map"] == pytest.approx((1 / 6 + 1 / 4) / 2)
  assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["easy", "medium", "hard"]


def test_multi_scale_descriptor_is_the_mean_of_normalised_scales():
  from PIL import Image

  from engine.features.extractor import Extractor, IncompatibleExtractorError, check_compatible

  kw = dict(config="tiny", image_size=64, backend="xla")
  ms = Extractor("random:4", "gem", scales=(1.0, 0.5, 1.0), **kw)
  one = Extractor("random:4", "gem", **kw)
  assert ms.scales == (1.0, 0.5) and ms.dim == one.dim
  rng = np.random.default_rng(12)
  batch = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
  half = np.stack([np.asarray(Image.fromarray(b).resize((48, 32), Image.BILINEAR)) for b in batch])
  a = _unit(np.asarray(one.run_batch(batch), np.float64))
  b = _unit(np.asarray(one.run_batch(half), np.float64))
  np.testing.assert_allclose(ms.run_batch(batch), _unit(a + b), atol=1e-5)
  feats = ms.extract_arrays(list(batch))
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
  # Recorded: an index of multi-scale descriptors refuses single-scale queries, and is rebuilt
  # with its scales.
  with pytest.raises(IncompatibleExtractorError, match="scales"):
    check_compatible(ms.index_metadata(), one)
  assert Extractor.from_index_metadata(ms.index_metadata(), backend="xla").scales == (1.0, 0.5)
  with pytest.raises(ValueError, match="pooled"):
    Extractor("random:4", "fc2", config="tiny", backend="xla", scales=(1.0, 0.5))
  with pytest.raises(ValueError, match="scales"):
    Extractor("random:4", "gem", scales=(0.1,), **kw)
