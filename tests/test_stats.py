"""Collection statistics of an index (engine/store/statistics.py): centering and whitening applied
at search time, checked against a direct numpy reference and engine.features' own Whitening."""

import json
import os

import numpy as np
import pytest
from conftest import write_image

from engine import store
from engine.app import indexing, retrieval
from engine.features.descriptors import Whitening
from engine.features.extractor import Extractor, IncompatibleExtractorError, check_compatible
from engine.store import statistics as stats_lib

D = 48


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _collection(rng, n=300, d=D):
  """Rows sharing a large common component, as descriptors of one collection do."""
  return rng.normal(size=d) * 4 + rng.normal(size=(n, d))


def _index(tmp_path, x, dtype, name="i", **kw):
  idx = store.Index.create(tmp_path / name, dim=x.shape[1], dtype=dtype, **kw)
  half = len(x) // 2
  idx.add(x[:half], [f"k{i}" for i in range(half)])
  idx.add(x[half:], [f"k{i}" for i in range(half, len(x))])
  return idx


def _stored(idx, n):
  return _unit(idx.get_vectors([f"k{i}" for i in range(n)]).astype(np.float64))


def _top(ref, k):
  order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(ref, order, 1), order


@pytest.mark.parametrize("dtype", ["int8", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("nq", [1, 5])
def test_centering_scores_are_the_cosine_of_centred_vectors(tmp_path, dtype, nq):
  rng = np.random.default_rng(1)
  x = _collection(rng)
  with _index(tmp_path, x, dtype) as idx:
    info = idx.learn_statistics("center")
    assert info["kind"] == "center" and info["rows"] == len(x) and info["dim"] == D
    xs = _stored(idx, len(x))
    mu = xs.mean(0)  # the mean of the unit stored rows, by numpy
    q = x[:nq] + rng.normal(size=(nq, D)) * 0.5
    s, k = idx.search(q, k=10)
    qc = _unit(_unit(q) - mu)
    ref = qc @ _unit(xs - mu).T
    want, order = _top(ref, 10)
    np.testing.assert_allclose(s, want, atol=2e-6)
    assert [[f"k{j}" for j in row] for row in order] == k.tolist()
    raw, _ = idx.search(q, k=10, statistics="none")
    assert raw.min() > 0.8 and np.median(s) < raw.min()  # the common component is gone


@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_whitening_matches_features_whitening(tmp_path, dtype):
  rng = np.random.default_rng(2)
  x = _collection(rng)
  with _index(tmp_path, x, dtype) as idx:
    info = idx.learn_statistics("whiten:16")
    assert info["kind"] == "whiten" and info["dim"] == 16
    xs = _stored(idx, len(x))
    w = Whitening.learn(xs, dim=16)  # engine.features' implementation, on the same rows
    q = x[:4] + rng.normal(size=(4, D)) * 0.3
    s, k = idx.search(q, k=8)
    ref = w(_unit(q)).astype(np.float64) @ w(xs).astype(np.float64).T
    want, order = _top(ref, 8)
    np.testing.assert_allclose(s, want, atol=1e-4)
    assert [[f"k{j}" for j in row] for row in order] == k.tolist()


def test_statistics_survive_reopen_and_apply_to_rows_added_later(tmp_path):
  rng = np.random.default_rng(3)
  x = _collection(rng, 200)
  with _index(tmp_path, x[:100], "int8") as idx:
    first = idx.learn_statistics("center")
    idx.add(x[100:], [f"k{i}" for i in range(100, 200)])
  with store.Index.open(tmp_path / "i", readonly=True) as idx:
    assert idx.statistics.id == first["sha256"] and idx.statistics_info["rows"] == 100
    mu = _stored(idx, 100).mean(0)  # learned before the second add: the first 100 rows only
    xs = _stored(idx, 200)
    s, k = idx.search(x[150:152], k=5)
    want, order = _top(_unit(_unit(x[150:152]) - mu) @ _unit(xs - mu).T, 5)
    np.testing.assert_allclose(s, want, atol=2e-6)
    assert k[:, 0].tolist() == ["k150", "k151"]


def test_relearning_replaces_the_file_and_a_named_set_is_insisted_on(tmp_path):
  rng = np.random.default_rng(4)
  x = _collection(rng, 60)
  with _index(tmp_path, x, "float16") as idx:
    a = idx.learn_statistics("center")
    b = idx.learn_statistics("whiten:8")
    files = sorted(f for f in os.listdir(tmp_path / "i") if f.startswith("stats-"))
    assert files == [b["file"]]
    idx.search(x[:1], k=3, statistics=b["sha256"])
    with pytest.raises(store.IndexMismatchError, match="re-learned"):
      idx.search(x[:1], k=3, statistics=a["sha256"])
    with pytest.raises(ValueError, match="metric"):
      idx.search(x[:1], k=3, metric="l2")
    assert idx.learn_statistics("none") is None and idx.statistics is None
    assert not [f for f in os.listdir(tmp_path / "i") if f.startswith("stats-")]
    assert idx.statistics_policy == "none"


def test_transformed_or_foreign_queries_are_refused(tmp_path):
  rng = np.random.default_rng(5)
  x = _collection(rng, 80)
  with _index(tmp_path, x, "int8") as idx:
    idx.learn_statistics("whiten:16")
    whitened = idx.statistics.transform(_unit(x[:2]))
    with pytest.raises(store.QueryMismatchError, match="raw 48-d"):
      idx.search(whitened, k=3)
    with pytest.raises(store.QueryMismatchError, match=r"\[Q, 48\]"):
      idx.search(np.ones((1, 30)), k=3)


def test_a_damaged_statistics_file_or_entry_is_refused(tmp_path):
  rng = np.random.default_rng(6)
  x = _collection(rng, 40)
  with _index(tmp_path, x, "int8") as idx:
    info = idx.learn_statistics("center")
  path = tmp_path / "i" / info["file"]
  data = bytearray(path.read_bytes())
  data[-3] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(store.IndexCorruptError, match="sha256"):
    store.Index.open(tmp_path / "i", readonly=True)
  path.unlink()
  with pytest.raises(store.IndexCorruptError, match="missing"):
    store.Index.open(tmp_path / "i", readonly=True)
  mpath = tmp_path / "i" / store.MANIFEST
  m = json.loads(mpath.read_text())
  m["statistics"]["file"] = "../stats-000001.npy"
  mpath.write_text(json.dumps(m))
  with pytest.raises(store.IndexCorruptError, match="malformed"):
    store.Index.open(tmp_path / "i", readonly=True)


def test_a_pickled_statistics_file_is_never_loaded(tmp_path):
  rng = np.random.default_rng(7)
  x = _collection(rng, 40)
  with _index(tmp_path, x, "int8") as idx:
    info = idx.learn_statistics("center")
  path = tmp_path / "i" / info["file"]
  import hashlib
  import io

  buf = io.BytesIO()
  np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  data = buf.getvalue()
  path.write_bytes(data)
  mpath = tmp_path / "i" / store.MANIFEST
  m = json.loads(mpath.read_text())
  m["statistics"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
  mpath.write_text(json.dumps(m))
  with pytest.raises(store.IndexCorruptError, match="plain .npy"):
    store.Index.open(tmp_path / "i", readonly=True)


def test_an_interrupted_learning_leaves_the_old_statistics(tmp_path, monkeypatch):
  rng = np.random.default_rng(8)
  x = _collection(rng, 40)
  with _index(tmp_path, x, "int8") as idx:
    first = idx.learn_statistics("center")

    def crash(folder, m):
      raise OSError("disk full")

    monkeypatch.setattr(store.manifest, "write", crash)
    with pytest.raises(OSError):
      idx.learn_statistics("whiten:8")
    monkeypatch.undo()
    assert idx.statistics.id == first["sha256"]
    # The failed commit's file is gone with the reload of the last committed state.
    assert [f for f in os.listdir(tmp_path / "i") if stats_lib.is_stats_file(f)] == [first["file"]]
  # A file left by a killed writer (no reload) goes on the next writer open, not a reader's.
  orphan = tmp_path / "i" / stats_lib.file_name(99)
  orphan.write_bytes((tmp_path / "i" / first["file"]).read_bytes())
  with store.Index.open(tmp_path / "i", readonly=True) as idx:
    assert idx.statistics.id == first["sha256"]
  assert orphan.exists()
  with store.Index.open(tmp_path / "i") as idx:
    assert idx.statistics.id == first["sha256"]
  assert not orphan.exists()


def test_an_index_without_statistics_keys_opens_as_before(tmp_path):
  rng = np.random.default_rng(9)
  x = _collection(rng, 20)
  with _index(tmp_path, x, "int8") as idx:
    before = idx.search(x[:2], k=4)
  mpath = tmp_path / "i" / store.MANIFEST
  m = json.loads(mpath.read_text())
  assert "statistics" not in m and "statistics_policy" not in m
  with store.Index.open(tmp_path / "i", readonly=True) as idx:
    assert idx.statistics is None and idx.statistics_policy == "none"
    after = idx.search(x[:2], k=4)
  np.testing.assert_array_equal(before[0], after[0])


@pytest.mark.parametrize(
  "spec,want",
  [
    ("none", None),
    ("center", ("center", None)),
    ("whiten:64", ("whiten", 64)),
    ("whiten", ("whiten", None)),
  ],
)
def test_policies_parse(spec, want):
  assert stats_lib.parse_policy(spec) == want


@pytest.mark.parametrize("spec", ["whiten:0", "whiten:x", "pca", ""])
def test_bad_policies_are_refused(spec):
  with pytest.raises(ValueError):
    stats_lib.parse_policy(spec)


def test_indexing_learns_and_relearns_as_the_collection_grows(tmp_path):
  folder = tmp_path / "photos"
  for i in range(3):
    write_image(folder / f"{i}.png", seed=i)
  index = str(tmp_path / "idx")
  ex = Extractor("random:4", "gem", config="tiny", image_size=64, backend="xla")
  r = indexing.index_folder(str(folder), index, ex, progress=False, statistics="center")
  assert r.statistics.startswith("statistics: center") and "from 3 images" in r.statistics
  r = indexing.index_folder(str(folder), index, ex, progress=False)
  assert r.statistics is None  # nothing grew: the same set stays
  for i in range(3, 6):
    write_image(folder / f"{i}.png", seed=i)
  r = indexing.index_folder(str(folder), index, ex, progress=False)
  assert "from 6 images" in r.statistics  # doubled: re-learned
  r = indexing.index_folder(str(folder), index, ex, progress=False, statistics="whiten:32")
  assert "whitening to 32 needs more" in r.statistics  # centred until there are enough rows
  with store.Index.open(index, readonly=True) as idx:
    assert idx.statistics_policy == "whiten:32" and idx.statistics.kind == "center"
  res = retrieval.query_index(index, str(folder / "0.png"), ex, k=3)
  assert "centred" in res.scoring and res.matches[0][1][0][0] == str(folder / "0.png")
  res = retrieval.query_index(index, str(folder / "0.png"), ex, k=3, raw_scores=True)
  assert res.scoring == "cosine of the descriptors"


def test_whitened_extractor_refuses_queries_without_that_whitening():
  rng = np.random.default_rng(10)
  plain = Extractor("random:4", "gem", config="tiny", image_size=64, backend="xla")
  w = Whitening.learn(rng.normal(size=(100, plain.dim)))
  whitened = Extractor("random:4", "gem", config="tiny", image_size=64, backend="xla", whitening=w)
  check_compatible(plain.index_metadata(), plain)
  with pytest.raises(IncompatibleExtractorError, match="whitening"):
    check_compatible(whitened.index_metadata(), plain)
  with pytest.raises(IncompatibleExtractorError, match="whitening"):
    check_compatible(plain.index_metadata(), whitened)


@pytest.mark.parametrize(
  "dtype,method",
  [("int8", None), ("int8", "int8-xla"), ("float16", None), ("bfloat16", None), ("float32", None)],
)
@pytest.mark.parametrize("nq", [1, 3])
def test_topk_rank_one_term_against_numpy(dtype, method, nq):
  import jax.numpy as jnp

  from engine.kernels import topk as topk_lib

  rng = np.random.default_rng(11)
  n, d = 300, 32
  x = _unit(rng.normal(size=(n, d))).astype(np.float32)
  q = _unit(rng.normal(size=(nq, d))).astype(np.float32)
  qo = rng.normal(size=nq).astype(np.float32)
  rw = rng.uniform(0.5, 2, size=n).astype(np.float32)
  if dtype == "int8":
    m, scales = store.quantize_int8(x)
    xr = m.astype(np.float64) * scales[:, None]
  else:
    m = np.asarray(jnp.asarray(x, dtype))
    scales = rng.uniform(0.5, 2, size=n).astype(np.float32)
    xr = np.asarray(jnp.asarray(m, jnp.float32), np.float64) * scales[:, None]
  valid = rng.uniform(size=n) > 0.2
  ref = q.astype(np.float64) @ xr.T + qo[:, None].astype(np.float64) * rw[None, :]
  ref[:, ~valid] = -np.inf
  s, i = topk_lib.topk(
    q, m, 10, scales=scales, valid=valid, method=method, query_offset=qo, row_weight=rw
  )
  s, i = np.asarray(s), np.asarray(i)
  assert valid[i].all()
  # ids re-score to their scores (int8 queries carry their rounding: ~1e-2 of |q| |x|)
  np.testing.assert_allclose(
    np.take_along_axis(ref, i, 1), s, atol=3e-2 if dtype == "int8" else 3e-3
  )
  want = np.sort(ref, axis=1)[:, ::-1][:, :10]
  np.testing.assert_allclose(s, want, atol=3e-2 if dtype == "int8" else 3e-3)


@pytest.mark.parametrize("dtype", ["int8", "float32"])
@pytest.mark.parametrize("policy", ["center", "whiten:16"])
def test_the_kernel_picks_the_right_candidates(tmp_path, dtype, policy):
  # Rows at very different distances from the mean: r(x) varies 15x, so the kernel's per-row
  # factors and rank-one term decide which 2 candidates of 600 reach the exact re-scoring (k=1).
  rng = np.random.default_rng(12)
  common = rng.normal(size=D) * 4
  x = common + rng.normal(size=(600, D)) * rng.uniform(0.2, 3.0, size=(600, 1))
  with _index(tmp_path, x, dtype) as idx:
    idx.learn_statistics(policy)
    q = common + rng.normal(size=(40, D))
    s, k = idx.search(q, k=1)
    ref = idx.statistics.scores(_unit(q), np.broadcast_to(_stored(idx, 600), (40, 600, D)))
    hit = k[:, 0] == np.array([f"k{j}" for j in ref.argmax(1)], object)
    # int8 queries carry their rounding (~1e-2): a near tie can fall outside the 2 candidates.
    assert hit.mean() >= (0.9 if dtype == "int8" else 1.0), hit.mean()
    np.testing.assert_allclose(s[hit, 0], ref.max(1)[hit], atol=1e-5)
    one = [idx.search(q[i : i + 1], k=1)[1][0, 0] for i in range(8)]  # the few-query loop
    assert np.mean([key == f"k{ref[i].argmax()}" for i, key in enumerate(one)]) >= 0.75
