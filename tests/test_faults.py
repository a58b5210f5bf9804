"""Faults: SIGKILL at every kind of point, damaged index files, write failures, concurrency.

Kills run the real indexer and store in a forked child with a stub extractor (no model, so a run
takes a fraction of a second); a few runs kill the `engine.index` binary with the tiny model
through the store's crash points (engine/store/faults.py). `VGG_RETRIEVAL_SOAK=1` adds many random kills.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import shutil
import signal
import sqlite3
import threading
import time

import faultlib
import numpy as np
import pytest
from faultlib import StubExtractor, check_index, fork_index, make_photos, wait

from engine import cli, store
from engine.app import indexing
from engine.common import fileio
from engine.store import Index, IndexCorruptError, IndexLockedError, StoreError
from engine.store.catalog import Catalog

# The children never call into JAX (see faultlib.StubExtractor), so its fork warning is moot.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
SOAK = bool(os.environ.get("VGG_RETRIEVAL_SOAK"))
N_PHOTOS = 80
FIGURES: dict[str, int] = {}


def _tally(name, n=1):
  FIGURES[name] = FIGURES.get(name, 0) + n


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fault-photos")
  paths = make_photos(folder, N_PHOTOS)
  return str(folder), paths, {p: StubExtractor.vector(p) for p in paths}


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
  folder, paths, _ = photos
  ref = str(tmp_path_factory.mktemp("ref") / "idx")
  indexing.index_folder(folder, ref, StubExtractor(), commit_every=8, progress=False)
  return faultlib.vectors_of(ref)


def _kill_and_resume(tmp, photos, reference, **kill):
  folder, paths, expected = photos
  idx, progress = str(tmp / "idx"), str(tmp / "progress")
  shutil.rmtree(idx, ignore_errors=True)
  with contextlib.suppress(FileNotFoundError):
    os.unlink(progress)
  delay = kill.pop("after_s", None)
  pid = fork_index(folder, idx, progress_file=progress, **kill)
  if delay is not None:
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
  status = wait(pid)
  assert status in (-signal.SIGKILL, 0), f"child failed with {status}"
  committed = faultlib.read_progress(progress)
  live = check_index(idx, expected) if store.exists(idx) else []  # killed before creation?
  # Commits happen in walk order: the committed rows are a prefix, at least what was reported
  # committed, at most one commit (8 images) more: the one whose manifest landed before the kill.
  assert live == paths[: len(live)]
  assert committed <= len(live) <= committed + 8 and (len(live) % 8 == 0 or len(live) == 80)
  report = indexing.index_folder(folder, idx, StubExtractor(), commit_every=8, progress=False)
  assert (report.indexed, report.unchanged) == (N_PHOTOS - len(live), len(live))
  final = check_index(idx, expected)
  assert sorted(final) == paths
  got = faultlib.vectors_of(idx)
  for k in paths:
    np.testing.assert_allclose(got[k], reference[k], atol=1e-6)
  _tally("kills" if status else "runs_not_killed")
  _tally("rows_verified", len(live) + len(final))
  return status, len(live)


def test_sigkill_at_io_events_and_hook_points_then_resume(tmp_path, photos, reference):
  """>= 20 kills spread over every I/O event of a run, plus each named hook point."""
  folder, _, _ = photos
  total = faultlib.count_events(folder, str(tmp_path / "count"))
  n_points = 60 if SOAK else 22
  events = sorted({int(e) for e in np.linspace(1, total, n_points)})
  hooks = [
    ("segment_write", 1),  # the very first segment file, half written
    ("segment_write", 7),  # the 4th file: a scale file mid-write
    ("segment_file", 3),  # a vectors file in place, its scales not yet
    ("catalog", 1),  # catalog committed, manifest not: the commit window
    ("catalog", 6),
    ("manifest", 4),  # committed, the process dies before it knows
    ("manifest", 10),  # the last commit
  ]
  lives = []
  for e in events:
    status, live = _kill_and_resume(tmp_path, photos, reference, event=e)
    assert status == -signal.SIGKILL
    lives.append(live)
  for point, n in hooks:
    status, live = _kill_and_resume(tmp_path, photos, reference, fault=(point, n))
    assert status == -signal.SIGKILL, (point, n)
    lives.append(live)
  assert len(events) + len(hooks) >= 20
  assert min(lives) == 0 and max(lives) == N_PHOTOS  # spread from first to last commit
  FIGURES["io_events_per_run"] = total


def test_sigkill_at_random_times_then_resume(tmp_path, photos, reference):
  folder, _, _ = photos
  t0 = time.monotonic()
  pid = fork_index(folder, str(tmp_path / "timing"), delay_s=0.004)
  assert wait(pid) == 0
  duration = time.monotonic() - t0
  rng = random.Random(6)
  kills = 0
  for _ in range(100 if SOAK else 8):
    status, _ = _kill_and_resume(
      tmp_path, photos, reference, delay_s=0.004, after_s=rng.uniform(0, duration)
    )
    kills += status != 0
  assert kills >= 4


def test_binary_killed_mid_segment_and_mid_commit_resumes_to_same_contents(tmp_path):
  from engine.features.extractor import Extractor

  folder = tmp_path / "photos"
  paths = make_photos(folder, 64)
  ref = str(tmp_path / "ref")
  indexing.index_folder(
    str(folder), ref, Extractor("random:5", **faultlib.TINY_KW), commit_every=8, progress=False
  )
  expected = faultlib.vectors_of(ref)
  idx = str(tmp_path / "idx")
  args = [f"--images={folder}", f"--index={idx}", "--commit_every=8", *faultlib.TINY]
  lives = []
  # 2 files x (header, data) per commit: the 11th write is the 3rd commit's scale data.
  for fault in ["segment_write:11", "catalog:5"]:
    p = faultlib.run("engine.index", *args, ok=None, fault=fault)
    assert p.returncode == -signal.SIGKILL, (fault, p.err)
    lives.append(check_index(idx, expected))
    _tally("kills")
    _tally("rows_verified", len(lives[-1]))
  # 2 commits; then commits 3, 4, a merge of the 4 segments and commit 5 (4 catalog transactions).
  assert lives[0] == paths[:16] and lives[1] == paths[:40]
  p = faultlib.run("engine.index", *args)
  assert "indexed 24, unchanged 40, failed 0" in p.out
  final = check_index(idx, expected)
  assert sorted(final) == paths
  got = faultlib.vectors_of(idx)
  for k in paths:
    np.testing.assert_allclose(got[k], expected[k], atol=0.01)
  _tally("rows_verified", len(final))


# ------------------------------------------------------------------ damaged files


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """An int8 index of 3 segments x 40 rows, a copy taken after 1 segment, and a damaged WAL."""
  root = tmp_path_factory.mktemp("pristine")
  rng = np.random.default_rng(0)
  x = _unit(rng.standard_normal((120, 16))).astype(np.float32)
  keys = [f"/photos/{i:03d}.jpg" for i in range(120)]
  p, older = root / "idx", root / "older"
  with Index.create(p, dim=16, dtype="int8") as idx:
    idx.add(x[:40], keys[:40])
    shutil.copytree(p, older)
    idx.add(x[40:80], keys[40:80])
    idx.add(x[80:], keys[80:])
  q = _unit(rng.standard_normal((4, 16))).astype(np.float32)
  with Index.open(p, readonly=True) as idx:
    want = idx.search(q, k=10)
  # A crashed writer leaves its WAL behind, holding the last commits of the catalog.
  wal = root / "wal"
  shutil.copytree(p, wal)
  for lo, hi, name in [(0, 60, "wal-older"), (60, 120, None)]:
    pid = os.fork()
    if pid == 0:
      idx = Index.open(wal)
      idx.add(np.roll(x[lo:hi], 1, axis=1), [f"/wal/{i}.jpg" for i in range(lo, hi)])
      os.kill(os.getpid(), signal.SIGKILL)
    assert wait(pid) == -signal.SIGKILL
    if name:
      shutil.copytree(wal, root / name)
  assert os.path.getsize(wal / "catalog.sqlite-wal") > 0
  with Index.open(wal, readonly=True) as idx:
    want_wal = idx.search(q, k=10)
  return {"idx": p, "older": older, "wal": wal, "wal-older": root / "wal-older", "q": q,
          "want": want, "want_wal": want_wal}  # fmt: skip


def _damage(folder, fname, kind, older, where=0.5):
  f = folder / fname
  if kind == "truncate":
    f.write_bytes(f.read_bytes()[: int(os.path.getsize(f) * where)])
  elif kind == "flip":
    data = bytearray(f.read_bytes())
    if data:
      data[min(len(data) - 1, int(len(data) * where))] ^= 0xFF
    f.write_bytes(bytes(data))
  elif kind == "delete":
    f.unlink()
  elif kind == "older":
    src = older / fname
    if fname.startswith("seg-000002"):  # segments never change: the older copy is another one
      src = older / fname.replace("seg-000002", "seg-000001")
    if src.exists():
      shutil.copy(src, f)
    else:
      f.unlink()


def _outcome(folder, q, want, fname):
  """'named' if opening or searching raises a StoreError naming the file, 'intact' if results are
  exactly the committed ones; anything else (garbage, a crash, an anonymous error) fails."""
  name = "catalog.sqlite" if fname.startswith("catalog") else fname
  outcomes = []
  for readonly in (True, False):
    try:
      with Index.open(folder, readonly=readonly) as idx:
        s, k = idx.search(q, k=10)
    except StoreError as e:
      assert name in str(e), f"{fname}: {e}"
      outcomes.append("named")
      continue
    np.testing.assert_array_equal(k, want[1])
    np.testing.assert_allclose(s, want[0], atol=1e-6)
    outcomes.append("intact")
  return outcomes


FILES = ["MANIFEST.json", "catalog.sqlite", "seg-000002.npy", "seg-000002.scale.npy", "LOCK"]
KINDS = ["truncate", "flip", "delete", "older"]


@pytest.mark.parametrize("fname", FILES)
def test_damaged_index_file_is_named_or_harmless(tmp_path, pristine, fname):
  results = []
  for kind in KINDS:
    wheres = [0.05, 0.3, 0.5, 0.7, 0.97] if kind in ("flip", "truncate") else [0.5]
    for where in wheres:
      case = tmp_path / f"{kind}-{where}"
      shutil.copytree(pristine["idx"], case)
      _damage(case, fname, kind, pristine["older"], where)
      out = _outcome(case, pristine["q"], pristine["want"], fname)
      results.append((kind, where, out))
      _tally("corruptions")
      if fname.startswith("seg-"):
        # Segments: every damage is caught on open (sizes, headers, the sample checksum covers
        # all rows of a 40-row segment), and always by a full verify.
        assert out == ["named", "named"], (kind, where)
        with pytest.raises(IndexCorruptError, match=fname.replace(".", r"\.")):
          Index.open(case, readonly=True, verify=True)
      if fname == "LOCK":
        assert out == ["intact", "intact"], (kind, where)
      if fname == "MANIFEST.json":
        assert out == ["named", "named"], (kind, where)
  assert results


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_wal_is_named_or_harmless(tmp_path, pristine, kind):
  for where in [0.1, 0.5, 0.9] if kind in ("flip", "truncate") else [0.5]:
    case = tmp_path / f"{kind}-{where}"
    shutil.copytree(pristine["wal"], case)
    _damage(case, "catalog.sqlite-wal", kind, pristine["wal-older"], where)
    out = _outcome(case, pristine["q"], pristine["want_wal"], "catalog.sqlite-wal")
    _tally("corruptions")
    if kind in ("delete", "older"):  # committed rows are lost from the catalog: refused
      assert out == ["named", "named"]


def test_flip_outside_the_sample_is_caught_by_verify_and_never_gives_garbage(tmp_path):
  rng = np.random.default_rng(1)
  x = _unit(rng.standard_normal((500, 16))).astype(np.float32)
  keys = [f"k{i}" for i in range(500)]
  with Index.create(tmp_path / "i", dim=16, dtype="float32") as idx:
    idx.add(x, keys)
  seg = tmp_path / "i" / "seg-000001.npy"
  data = bytearray(seg.read_bytes())
  row = 3  # not among the 64 sampled rows
  data[128 + 4 * 16 * row : 128 + 4 * 16 * row + 4] = np.float32(1e30).tobytes()
  seg.write_bytes(bytes(data))
  with pytest.raises(IndexCorruptError, match="seg-000001.npy.*sha256"):
    Index.open(tmp_path / "i", readonly=True, verify=True)
  q = np.zeros((1, 16), np.float32)
  q[0, 0] = 1.0
  with Index.open(tmp_path / "i", readonly=True) as idx:  # open is lazy; the score is impossible
    with pytest.raises(IndexCorruptError, match="seg-000001.npy.*impossible score"):
      idx.search(q, k=5)
    s, _ = idx.search(-q, k=5)  # the damaged row is not among these: finite, bounded scores
    assert np.isfinite(s).all() and (np.abs(s) <= 1.0001).all()
  _tally("corruptions", 2)


def test_manifest_one_commit_older_rolls_back_two_older_is_refused(tmp_path):
  rng = np.random.default_rng(2)
  x = _unit(rng.standard_normal((30, 16))).astype(np.float32)
  p = tmp_path / "i"
  with Index.create(p, dim=16) as idx:
    idx.add(x[:10], [f"a{i}" for i in range(10)])
    m1 = (p / "MANIFEST.json").read_bytes()
    idx.add(x[10:20], [f"b{i}" for i in range(10)])
    m2 = (p / "MANIFEST.json").read_bytes()
    idx.add(x[20:], [f"c{i}" for i in range(10)])
  (p / "MANIFEST.json").write_bytes(m1)
  with pytest.raises(IndexCorruptError, match="MANIFEST.json.*older than catalog"):
    Index.open(p, readonly=True)
  with pytest.raises(IndexCorruptError, match="MANIFEST.json.*older than catalog"):
    Index.open(p)
  # One commit older looks exactly like a crash inside the last commit: a consistent rollback
  # (the next indexing run extracts those images again).
  (p / "MANIFEST.json").write_bytes(m2)
  with Index.open(p) as idx:
    assert len(idx) == 20
  _tally("corruptions", 2)


def test_binary_reports_a_damaged_index_in_one_line(tmp_path, pristine):
  for fname, kind in [("MANIFEST.json", "truncate"), ("seg-000002.npy", "flip")]:
    case = tmp_path / fname
    shutil.copytree(pristine["idx"], case)
    _damage(case, fname, kind, pristine["older"])
    for module, extra in [("engine.query", [f"--query={case}/LOCK"]), ("engine.dedup", [])]:
      p = faultlib.run(module, f"--index={case}", *extra, ok=False)
      assert fname in p.err


# ------------------------------------------------------------------ write failures


def _user_error(fn):
  """Runs fn under the binaries' error handler: (exit code, stderr)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e, cli.user_errors():
    fn()
  return e.value.code, err.getvalue()


def _index_with_failure(tmp_path, photos, monkeypatch, fail):
  folder, paths, expected = photos
  idx = str(tmp_path / "idx")
  commits = []
  with monkeypatch.context() as mp:
    fail(mp, idx)
    code, err = _user_error(
      lambda: indexing.index_folder(
        folder, idx, StubExtractor(), commit_every=8, progress=False, on_commit=commits.append
      )
    )
  assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
  live = check_index(idx, expected)
  assert live == paths[: commits[-1]]  # the last committed state, nothing more, nothing less
  report = indexing.index_folder(folder, idx, StubExtractor(), commit_every=8, progress=False)
  assert report.indexed == len(paths) - len(live)
  _tally("write_failures")
  _tally("rows_verified", len(live))
  return err


def test_disk_full_on_a_segment_write_stops_at_the_last_commit(tmp_path, photos, monkeypatch):
  def fail(mp, idx):
    real, calls = fileio.atomic_write, [0]

    def atomic_write(path, write):
      if os.path.basename(path).startswith("seg-"):
        calls[0] += 1
        if calls[0] == 7:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
      real(path, write)

    mp.setattr(fileio, "atomic_write", atomic_write)

  err = _index_with_failure(tmp_path, photos, monkeypatch, fail)
  assert "No space left on device" in err and "seg-000004" in err


def test_disk_full_in_the_catalog_stops_at_the_last_commit(tmp_path, photos, monkeypatch):
  def fail(mp, idx):
    real, calls = Catalog.commit_rows, [0]

    def commit_rows(self, *a, **kw):
      calls[0] += 1
      if calls[0] == 5:
        raise sqlite3.OperationalError("database or disk is full")
      real(self, *a, **kw)

    mp.setattr(Catalog, "commit_rows", commit_rows)

  err = _index_with_failure(tmp_path, photos, monkeypatch, fail)
  assert "catalog.sqlite" in err and "disk is full" in err


def test_read_only_index_folder_refuses_writes_and_keeps_the_index(tmp_path, photos, monkeypatch):
  folder, paths, expected = photos
  idx = tmp_path / "idx"
  few = tmp_path / "few"
  few.mkdir()
  for p in paths[:8]:
    shutil.copy(p, few)
  indexing.index_folder(str(few), str(idx), StubExtractor(), progress=False)
  before = faultlib.vectors_of(idx)
  if os.geteuid() == 0:  # root ignores permissions: refuse creating files in the folder instead
    real = fileio.tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
      if os.path.abspath(dir) == str(idx):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
      return real(*a, dir=dir, **kw)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
  else:
    os.chmod(idx, 0o555)
  try:
    code, err = _user_error(
      lambda: indexing.index_folder(folder, str(idx), StubExtractor(), progress=False)
    )
  finally:
    os.chmod(idx, 0o755)
  assert code == 1 and err.count("\n") == 1 and ("ermission denied" in err or "readonly" in err)
  monkeypatch.undo()
  after = faultlib.vectors_of(idx)
  assert sorted(after) == sorted(before)
  _tally("write_failures")


# ------------------------------------------------------------------ concurrency


def test_second_writer_is_refused_and_the_lock_is_freed_by_a_kill(tmp_path, photos):
  folder, _, expected = photos
  idx, progress = str(tmp_path / "idx"), str(tmp_path / "progress")
  pid = fork_index(folder, idx, delay_s=0.02, progress_file=progress)
  deadline = time.monotonic() + 30
  while faultlib.read_progress(progress) < 8 and time.monotonic() < deadline:
    time.sleep(0.01)
  try:
    with pytest.raises(IndexLockedError, match="LOCK.*another process is writing"):
      Index.open(idx)
    code, err = _user_error(
      lambda: indexing.index_folder(folder, idx, StubExtractor(), progress=False)
    )
    assert code == 1 and "another process is writing" in err and err.count("\n") == 1
  finally:
    os.kill(pid, signal.SIGKILL)
    wait(pid)
  check_index(idx, expected)  # opens as the writer: the dead holder's lock is gone
  _tally("kills")


def test_readers_see_only_complete_commits_while_a_writer_commits(tmp_path, photos):
  folder, paths, expected = photos
  rng = np.random.default_rng(3)
  queries = _unit(rng.standard_normal((8, 16))).astype(np.float32)
  # Compile the readers' search before the writer starts, so the readers spend the writer's run
  # searching (a first compile takes longer than the whole run on some CPUs).
  with Index.create(tmp_path / "warm", dim=16, dtype="int8") as warm:
    warm.add(rng.standard_normal((8, 16)), [str(i) for i in range(8)])
    warm.search(queries, k=5)
  idx, progress = str(tmp_path / "idx"), str(tmp_path / "progress")
  pid = fork_index(folder, idx, delay_s=0.01, progress_file=progress)
  deadline = time.monotonic() + 120
  while not store.exists(idx):  # a writer that fails first must fail the test, not hang it
    exited, status = os.waitpid(pid, os.WNOHANG)
    assert exited == 0, f"the writer exited before creating the index (wait status {status})"
    assert time.monotonic() < deadline, "the writer did not create the index within 120 s"
    time.sleep(0.005)
  errors, searches = [], [0]
  unit = {k: _unit(v) for k, v in expected.items()}
  done = threading.Event()

  def reader(seed):
    try:
      while not done.is_set():
        with Index.open(idx, readonly=True) as r:
          keys = r.keys()
          n = len(keys)
          assert n % 8 == 0 or n == N_PHOTOS, n
          assert keys == paths[:n]
          if n == 0:
            continue
          k = min(5, n)
          s, got = r.search(queries, k=k)
          assert s.shape == (8, k)
          for qi in range(8):
            vec = r.get_vectors(list(got[qi]))
            # int8 kernels also quantise the query: within a few quantisation steps.
            np.testing.assert_allclose(vec @ queries[qi], s[qi], atol=5e-3)
            exact = np.stack([unit[key] for key in got[qi]]) @ queries[qi]
            np.testing.assert_allclose(exact, s[qi], atol=0.05)
          searches[0] += 1
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
      errors.append(e)

  threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  try:
    assert wait(pid) == 0
  finally:
    done.set()
    for t in threads:
      t.join()
  if errors:
    raise errors[0]
  assert searches[0] >= 10 and faultlib.read_progress(progress) == N_PHOTOS
  _tally("concurrent_searches", searches[0])


def test_zz_figures(capsys):
  """Prints the suite's figures (for the closing note); run with -s to see them."""
  with capsys.disabled():
    print(f"\nfault figures: {FIGURES}")
