"""The on-disk index: round trips, updates, filters, crash safety and corruption detection."""

import json
import os
import signal
import subprocess
import sys

import faultlib
import jax
import numpy as np
import pytest

from engine import store as store_mod
from engine.common import fileio
from engine.kernels import streaming
from engine.store import (
  FileStat,
  Index,
  IndexCorruptError,
  IndexExistsError,
  IndexLockedError,
  IndexMismatchError,
  IndexNotFoundError,
  IndexReadOnlyError,
  StoreError,
  faults,
  segments,
)

D = 32
META = {"model": "vgg16", "weights_sha256": "ab" * 32, "descriptor": "rmac", "whitening": None}


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(seed=0, n=3000, d=D):
  rng = np.random.default_rng(seed)
  return _unit(rng.standard_normal((n, d))).astype(np.float32), [
    f"img/{seed}/{i}.jpg" for i in range(n)
  ]


def _brute(q, x, keys, k, metric="cosine"):
  q = _unit(q.astype(np.float64))
  x = x.astype(np.float64)
  s = q @ x.T if metric == "cosine" else -((q[:, None] - x[None]) ** 2).sum(-1)
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), np.asarray(keys, object)[order], s


def _rescore(q, keys_out, x, keys, metric="cosine"):
  pos = {k: i for i, k in enumerate(keys)}
  q = _unit(q.astype(np.float64))
  out = np.empty(keys_out.shape)
  for r in range(keys_out.shape[0]):
    v = x[[pos[k] for k in keys_out[r]]].astype(np.float64)
    out[r] = v @ q[r] if metric == "cosine" else ((v - q[r]) ** 2).sum(-1)
  return out


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_float32_round_trip_matches_brute_force(tmp_path, metric):
  x, keys = _data()
  with Index.create(tmp_path / "idx", dim=D, dtype="float32", metadata=META) as idx:
    idx.add(x[:1000], keys[:1000])
    idx.add(x[1000:], keys[1000:])  # incremental: a second segment
  q = np.random.default_rng(1).standard_normal((7, D)).astype(np.float32)
  with Index.open(tmp_path / "idx", expect_metadata=META, readonly=True) as idx:
    assert len(idx) == 3000 and idx.dim == D and idx.dtype == "float32" and idx.metadata == META
    s, k = idx.search(q, k=10, metric=metric, chunk_rows=1024)
  ref_s, _, _ = _brute(q, x, keys, 10, metric)
  want = ref_s if metric == "cosine" else -ref_s
  np.testing.assert_allclose(s, want, atol=1e-5)
  np.testing.assert_allclose(_rescore(q, k, x, keys, metric), s, atol=1e-5)
  assert s.dtype == np.float32 and k.dtype == object and isinstance(k[0, 0], str)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_compressed_dtypes_round_trip(tmp_path, dtype):
  x, keys = _data(2)
  q = x[:5] + 0.05
  with Index.create(tmp_path / dtype, dim=D, dtype=dtype) as idx:
    idx.add(x, keys)
    s1, k1 = idx.search(q, k=5)
  with Index.open(tmp_path / dtype) as idx:
    s2, k2 = idx.search(q, k=5)
    vec = idx.get_vectors(keys[:3])
  np.testing.assert_array_equal(s1, s2)
  np.testing.assert_array_equal(k1, k2)
  tol = {"float16": 2e-3, "bfloat16": 1e-2, "int8": 1e-2}[dtype]
  np.testing.assert_allclose(_rescore(q, k1, x, keys), s1, atol=tol)
  np.testing.assert_allclose(vec, x[:3], atol=tol)


def test_k_larger_than_live_returns_live_columns(tmp_path):
  x, keys = _data(n=4)
  with Index.create(tmp_path / "i", dim=D, dtype="int8") as idx:
    idx.add(x, keys)
    s, k = idx.search(x[:2], k=10)
    assert s.shape == k.shape == (2, 4)
    idx.delete(keys[:1])
    s, k = idx.search(x[0], k=10)  # a single [D] query gives [m] results
    assert s.shape == (3,) and keys[0] not in k
    idx.delete(keys)
    s, k = idx.search(x[:2], k=10)
    assert s.shape == (2, 0) and len(idx) == 0


def test_tombstones_filters_and_replacement(tmp_path):
  x, keys = _data(3, n=2000)
  stats = [FileStat(f"{i:064x}", i, 10 * i) for i in range(2000)]
  with Index.create(tmp_path / "i", dim=D, dtype="float32") as idx:
    idx.add(x, keys, files=stats)
    q = x[:3]
    s, k = idx.search(q, k=3)
    assert list(k[:, 0]) == keys[:3]
    assert idx.delete([keys[0], "never-added"]) == 1
    s, k = idx.search(q, k=3)
    assert keys[0] not in k and len(idx) == 1999 and keys[0] not in idx.keys()
    assert idx.get_file_stat(keys[0]) is None and idx.get_file_stat(keys[5]) == stats[5]
    assert idx.update_file_stats({keys[5]: FileStat("x", 5, 6), keys[0]: FileStat("y", 1, 1)}) == 1
    assert idx.get_file_stat(keys[5]) == FileStat("x", 5, 6)
    assert store_mod.exists(idx.path) and not store_mod.exists(idx.path + "-nothing")
    allowed = keys[100:200]
    s, k = idx.search(q, k=5, allowed_keys=allowed)
    assert set(k.ravel()) <= set(allowed)
    ref_s, ref_k, _ = _brute(q, x[100:200], allowed, 5)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    # Re-adding a key replaces its vector: the old row is tombstoned.
    idx.add(-x[1:2], [keys[1]], files=[FileStat("new", 1, 2)])
    assert len(idx) == 1999 and idx.get_file_stat(keys[1]) == FileStat("new", 1, 2)
    s, k = idx.search(-x[1:2], k=1)
    assert k[0, 0] == keys[1] and s[0, 0] == pytest.approx(1.0, abs=1e-5)
    s, k = idx.search(x[1:2], k=2)
    assert keys[1] not in k
    with pytest.raises(ValueError, match="duplicate"):
      idx.add(x[:2], ["a", "a"])
    with pytest.raises(ValueError, match="inf or nan"):
      idx.add(np.full((1, D), np.nan), ["nan"])


def test_compaction_preserves_results(tmp_path):
  x, keys = _data(4, n=3000)
  with Index.create(tmp_path / "i", dim=D, dtype="int8", keep_float32=True) as idx:
    for a in range(0, 3000, 500):
      idx.add(x[a : a + 500], keys[a : a + 500], files=[FileStat("h", a, a)] * 500)
    idx.delete(keys[::3])
    q = x[1:40:3] + 0.1
    before = idx.search(q, k=10)
    reranked = idx.search(q, k=10, rerank=50)
    idx.compact()
    after = idx.search(q, k=10)
    assert len(idx) == 2000
    assert len(idx.segments) == 1
    files = sorted(f for f in os.listdir(tmp_path / "i") if f.startswith("seg-"))
    assert len(files) == 3  # vectors, scales, float32 copy of the one new segment
    assert idx.get_file_stat(keys[1]) == FileStat("h", 0, 0)
  np.testing.assert_array_equal(before[1], after[1])
  np.testing.assert_allclose(before[0], after[0], atol=1e-6)
  with Index.open(tmp_path / "i") as idx:
    np.testing.assert_array_equal(idx.search(q, k=10, rerank=50)[1], reranked[1])
    assert sorted(idx.keys()) == sorted(k for i, k in enumerate(keys) if i % 3)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_compaction_streams_stored_rows_unchanged(tmp_path, dtype):
  x, keys = _data(6, n=2000)
  with Index.create(tmp_path / "i", dim=D, dtype=dtype, keep_float32=True) as idx:
    for a in range(0, 2000, 400):
      idx.add(x[a : a + 400], keys[a : a + 400])
    idx.delete(keys[1::4])
    live = [k for i, k in enumerate(keys) if i % 4 != 1]
    stored = idx.get_vectors(live, float32_copy=False)
    copy = idx.get_vectors(live)
    idx.compact(max_segment_rows=700)
    assert [s.rows for s in idx.segments] == [700, 700, 100]
  with Index.open(tmp_path / "i", verify=True) as idx:  # every sha256 and sample digest holds
    np.testing.assert_array_equal(idx.get_vectors(live, float32_copy=False), stored)
    np.testing.assert_array_equal(idx.get_vectors(live), copy)
    assert idx.keys() == live


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float16"])
def test_compressed_scores_are_exact_for_the_stored_rows(tmp_path, dtype):
  # The kernel quantises int8 queries; the returned scores are re-scored from the stored rows, so
  # an indexed vector finds itself with a cosine of 1 (never above it), for one query or many.
  x, keys = _data(7, n=3000)
  with Index.create(tmp_path / "i", dim=D, dtype=dtype) as idx:
    idx.add(x, keys)
    for q in (x[:1], x[:16]):
      s, k = idx.search(q, k=5)
      assert list(k[:, 0]) == keys[: len(q)]
      assert (s <= 1.0 + 1e-6).all() and (s[:, 0] >= 0.999).all()
      assert (np.diff(s, axis=1) <= 0).all()


def _clustered(rng, n, d, clusters, spread=0.35):
  centers = rng.standard_normal((clusters, d))
  return _unit(centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))).astype(
    np.float32
  )


def test_int8_recall_and_rerank(tmp_path):
  rng = np.random.default_rng(5)
  d = 128
  x = _clustered(rng, 20000, d, clusters=200)
  keys = [str(i) for i in range(len(x))]
  q = _unit(x[rng.choice(len(x), 100, replace=False)] + 0.15 * rng.standard_normal((100, d)))
  _, exact, _ = _brute(q, x, keys, 10)
  with Index.create(tmp_path / "i", dim=d, dtype="int8", keep_float32=True) as idx:
    idx.add(x, keys)
    _, k = idx.search(q, k=10)
    sr, kr = idx.search(q, k=10, rerank=40)
  # Re-ranked scores are exact: they re-score from the float32 vectors to within 1e-5.
  np.testing.assert_allclose(_rescore(q, kr, x, keys), sr, atol=1e-5)
  recall = np.mean([len(set(a) & set(b)) for a, b in zip(k, exact, strict=True)]) / 10
  recall_rr = np.mean([len(set(a) & set(b)) for a, b in zip(kr, exact, strict=True)]) / 10
  print(f"int8 recall@10 {recall:.3f}, with rerank=40 {recall_rr:.3f}")
  assert recall >= 0.97 and recall_rr >= 0.99


def test_iteration_in_chunks(tmp_path):
  x, keys = _data(6, n=1500)
  with Index.create(tmp_path / "i", dim=D, dtype="float16") as idx:
    idx.add(x[:1000], keys[:1000])
    idx.add(x[1000:], keys[1000:])
    idx.delete(keys[10:20])
    chunks = list(idx.iter_chunks(chunk_rows=256))
    assert max(len(c[0]) for c in chunks) <= 256
    got_keys = [k for c in chunks for k in c[0]]
    assert got_keys == idx.keys() and len(got_keys) == 1490
    got = dict(idx.iter_vectors())
    np.testing.assert_allclose(got[keys[999]], x[999], atol=1e-3)
    np.testing.assert_allclose(idx.get_vectors([keys[5]])[0], x[5], atol=1e-3)
    with pytest.raises(KeyError):
      idx.get_vectors([keys[10]])


def test_metadata_mismatch_names_the_keys(tmp_path):
  Index.create(tmp_path / "i", dim=D, metadata=META).close()
  with pytest.raises(IndexMismatchError, match="weights_sha256") as e:
    Index.open(tmp_path / "i", expect_metadata={**META, "weights_sha256": "cd" * 32})
  assert "descriptor" not in str(e.value)
  with pytest.raises(IndexMismatchError, match="preprocessing"):
    Index.open(tmp_path / "i", expect_metadata={"preprocessing": "caffe"}, readonly=True)
  Index.open(tmp_path / "i", expect_metadata={"model": "vgg16"}).close()
  with pytest.raises(IndexExistsError):
    Index.create(tmp_path / "i", dim=D)
  with pytest.raises(IndexNotFoundError):
    Index.open(tmp_path / "nothing")


def test_single_writer_lock(tmp_path):
  w = Index.create(tmp_path / "i", dim=D)
  with pytest.raises(IndexLockedError, match="LOCK"):
    Index.open(tmp_path / "i")
  with pytest.raises(StoreError):  # the common base class
    Index.open(tmp_path / "i")
  r = Index.open(tmp_path / "i", readonly=True)
  x, keys = _data(n=10)
  w.add(x, keys)
  assert len(r) == 0  # a reader keeps the snapshot it opened
  with pytest.raises(IndexReadOnlyError):
    r.add(x, keys)
  assert len(Index.open(tmp_path / "i", readonly=True)) == 10
  w.close()
  Index.open(tmp_path / "i").close()  # released on close
  # ... and when the holder dies without closing.
  code = (
    "import sys; from engine.store import Index; i = Index.open(sys.argv[1]); "
    "print('locked', flush=True); import os; os._exit(0)"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "i")], cwd=root, check=True)
  Index.open(tmp_path / "i").close()


def _files(p):
  return sorted(f for f in os.listdir(p) if not f.endswith(("-wal", "-shm")))


class _Crash(Exception):
  pass


def _killed_at(point, n, path, op):
  """Runs `op(Index.open(path))` in a forked child that SIGKILLs itself at the store's crash point
  (point, n): no cleanup runs, as in a real crash. The child never calls into JAX."""
  pid = os.fork()
  if pid == 0:
    try:
      faults.kill_at(point, n)
      op(Index.open(path))
    finally:
      os._exit(3)  # reached only if the crash point was never hit
  _, status = os.waitpid(pid, 0)
  assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the children never call JAX
def test_crash_before_manifest_commit_keeps_last_state(tmp_path):
  x, keys = _data(7, n=600)
  p = tmp_path / "i"
  with Index.create(p, dim=D, dtype="int8", keep_float32=True) as idx:
    idx.add(x[:300], keys[:300])
    committed = idx.search(x[:5], k=5)
  files_before = _files(p)

  def check():
    with Index.open(p, readonly=True) as r:  # readers ignore the leftovers without cleaning
      np.testing.assert_array_equal(r.search(x[:5], k=5)[1], committed[1])
    with Index.open(p) as idx:
      assert len(idx) == 300 and sorted(idx.keys()) == sorted(keys[:300])
      np.testing.assert_array_equal(idx.search(x[:5], k=5)[1], committed[1])
    assert faultlib.catalog_query(p, "SELECT COUNT(*), COUNT(deleted_gen) FROM rows") == [(300, 0)]
    assert _files(p) == files_before

  # 1. add: segment written and catalog committed, manifest not replaced. Re-adding key 0 would
  #    tombstone its old row: that tombstone must be undone too.
  _killed_at("catalog", 1, p, lambda idx: idx.add(x[300:], [keys[0]] + keys[301:]))
  assert any(f.startswith("seg-000002") for f in os.listdir(p))
  check()
  # 2. add: crash between the segment files (3 of them) and the catalog transaction.
  _killed_at("segment_file", 3, p, lambda idx: idx.add(x[300:], keys[300:]))
  check()
  # 3. delete and compact interrupted before the manifest.
  _killed_at("catalog", 1, p, lambda idx: idx.delete(keys[:50]))
  check()
  _killed_at("catalog", 1, p, lambda idx: idx.compact())
  check()
  # 4. An exception inside a live process rolls the object back to the committed state at once.
  with pytest.MonkeyPatch.context() as mp:
    real = fileio.atomic_write_json
    mp.setattr(
      fileio,
      "atomic_write_json",
      lambda path, obj: (
        (_ for _ in ()).throw(_Crash()) if "MANIFEST" in str(path) else real(path, obj)
      ),
    )
    idx = Index.open(p)
    with pytest.raises(_Crash):
      idx.add(x[300:], [keys[0]] + keys[301:])
    assert len(idx) == 300 and _files(p) == files_before
    np.testing.assert_array_equal(idx.search(x[:5], k=5)[1], committed[1])
    idx.close()
  check()
  # 5. A stray temporary file from an interrupted atomic write is removed on open.
  (p / ".seg-000009.npy.k2j4x_9a.tmp").write_bytes(b"partial")
  check()


def test_truncated_segment_is_named(tmp_path):
  x, keys = _data(8, n=500)
  with Index.create(tmp_path / "i", dim=D, dtype="int8") as idx:
    idx.add(x, keys)
  seg = tmp_path / "i" / "seg-000001.npy"
  data = seg.read_bytes()
  seg.write_bytes(data[:-100])
  with pytest.raises(IndexCorruptError, match="seg-000001.npy"):
    Index.open(tmp_path / "i", readonly=True)
  seg.write_bytes(data[:50])  # even the header is cut
  with pytest.raises(IndexCorruptError, match="seg-000001.npy"):
    Index.open(tmp_path / "i")
  seg.unlink()
  with pytest.raises(IndexCorruptError, match="seg-000001.npy"):
    Index.open(tmp_path / "i")


def test_flipped_byte_caught_by_verify(tmp_path):
  x, keys = _data(9, n=500)
  with Index.create(tmp_path / "i", dim=D, dtype="float32") as idx:
    idx.add(x, keys)
  seg = tmp_path / "i" / "seg-000001.npy"
  data = bytearray(seg.read_bytes())
  data[128 + 4 * D + 5] ^= 0xFF  # row 1: outside the 64 rows of the open-time sample checksum
  seg.write_bytes(bytes(data))
  Index.open(tmp_path / "i", readonly=True).close()  # sizes still check out: lazy by design
  with pytest.raises(IndexCorruptError, match="seg-000001.npy.*sha256"):
    Index.open(tmp_path / "i", readonly=True, verify=True)


def test_corrupt_manifest_and_missing_catalog_are_named(tmp_path):
  x, keys = _data(10, n=100)
  with Index.create(tmp_path / "i", dim=D) as idx:
    idx.add(x, keys)
  m = tmp_path / "i" / "MANIFEST.json"
  good = m.read_text()
  m.write_text(good[: len(good) // 2])
  with pytest.raises(IndexCorruptError, match="MANIFEST.json"):
    Index.open(tmp_path / "i")
  bad = json.loads(good)
  bad["version"] = 99
  m.write_text(json.dumps(bad))
  with pytest.raises(IndexCorruptError, match="MANIFEST.json.*version"):
    Index.open(tmp_path / "i")
  bad = json.loads(good)
  bad["segments"][0]["rows"] += 1
  m.write_text(json.dumps(bad))
  with pytest.raises(IndexCorruptError, match=r"seg-000001\..*expects"):
    Index.open(tmp_path / "i")
  m.write_text(good)
  for f in os.listdir(tmp_path / "i"):
    if f.startswith("catalog.sqlite"):
      os.unlink(tmp_path / "i" / f)
  with pytest.raises(IndexCorruptError, match="catalog.sqlite"):
    Index.open(tmp_path / "i")
  with pytest.raises(IndexCorruptError, match="catalog.sqlite"):
    Index.open(tmp_path / "i", readonly=True)


def test_second_search_does_not_recompile(tmp_path):
  x, keys = _data(11, n=5000)
  with Index.create(tmp_path / "i", dim=D, dtype="int8") as idx:
    idx.add(x, keys)
    idx.search(x[:3], k=10, chunk_rows=2048)
    before = streaming.scan_chunk._cache_size()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **kw: compiles.append(name) if "backend_compile" in name else None
    )
    try:
      idx.search(x[3:6] + 0.1, k=10, chunk_rows=2048)
    finally:
      jax.monitoring.clear_event_listeners()
    assert streaming.scan_chunk._cache_size() == before
    assert not compiles, compiles


def test_size_tiered_merging_bounds_the_segments(tmp_path, monkeypatch):
  monkeypatch.setattr(segments, "MERGE_FLOOR", 4 * (D + 4))  # 4 int8 rows + scales per tier step
  x, keys = _data(9, n=700)
  counts = []
  with Index.create(tmp_path / "i", dim=D, dtype="int8") as idx:
    for i in range(0, 700, 7):  # 100 commits of 7 rows
      idx.add(x[i : i + 7], keys[i : i + 7])
      counts.append(len(idx.segments))
      assert idx.keys() == keys[: i + 7]  # merging keeps storage order
    got = idx.search(x[:50], k=5)
    idx.delete(keys[100:500])  # most of the big segment: rewritten at the next commit
    idx.add(x[:1] + 1, ["extra"])
    assert all(s.deleted.sum() * 2 <= s.rows for s in idx.segments)
    live = keys[:100] + keys[500:] + ["extra"]
    assert idx.keys() == live
  # Base-4 counter over tiers of 4x: at most 3 segments per tier of 7 * 4**t rows.
  tiers = int(np.log(700 / 7) / np.log(4)) + 1
  assert max(counts) <= 3 * (tiers + 1), counts
  with Index.open(tmp_path / "i") as idx:
    assert idx.keys() == live
  with Index.create(tmp_path / "c", dim=D, dtype="int8") as ref:
    ref.add(x, keys)
    want = ref.search(x[:50], k=5)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], atol=1e-6)
