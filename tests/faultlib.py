"""Helpers of the fault and bad-input suites: photo folders, a stub extractor, forked runs that
die at chosen points, and the invariants an index must keep after any fault. Binaries run through
`binlib.run` (re-exported here as `run`)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import sqlite3
import time
import traceback

import numpy as np

# The binaries run through binlib (in this process; `fault=` SIGKILLs a subprocess at a crash point).
from binlib import ROOT, TINY, run  # noqa: F401 - re-exported: the suites call faultlib.run

from engine import store
from engine.app import indexing, sample
from engine.common import fileio
from engine.store import faults

TINY_KW = dict(descriptor="gem", image_size=64, batch_size=4, config="tiny", backend="xla")
DIM = 16


def make_photos(folder, n: int, size=(96, 72)) -> list[str]:
  """n distinct synthetic photos; returns their paths in the walk's (sorted) order."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(n):
    p = os.path.join(os.fspath(folder), f"p{i:03d}.jpg")
    sample.scene(np.random.default_rng(1000 + i), *size).save(p, quality=85)
    paths.append(p)
  return paths


class StubExtractor:
  """Deterministic descriptors from file bytes: what `index_folder` needs, without a model.

  Lets a forked child run the real indexer and store without touching JAX (forking a process
  that runs XLA threads is only safe if the child never calls into it).
  """

  dim = DIM
  precision = "fp32"  # no int8 model to calibrate or load
  quantized = None

  def __init__(self, delay_s: float = 0.0):
    self.delay_s = delay_s

  def fingerprint(self) -> dict:
    return {"model": "stub", "dim": DIM}

  def index_metadata(self) -> dict:
    return {"extractor": self.fingerprint()}

  @staticmethod
  def vector(path: str) -> np.ndarray:
    with open(path, "rb") as f:
      seed = int.from_bytes(hashlib.sha256(f.read()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)

  def iter_paths(self, paths):
    for pos, p in enumerate(paths):
      if self.delay_s:
        time.sleep(self.delay_s)
      yield pos, self.vector(p), None


def fork_index(images, index, *, fault=None, event=None, delay_s=0.0, progress_file=None):
  """Runs index_folder (stub extractor, commit_every=8) in a forked child.

  fault: (point, n) for the store's SIGKILL hook; event: SIGKILL at the n-th I/O event (any hook
  point, fsync or rename). Returns the child's pid (the caller waits or kills it).
  """
  pid = os.fork()
  if pid:
    return pid
  code = 0
  try:
    if fault:
      faults.kill_at(*fault)
    if event:
      _kill_at_event(event)

    def on_commit(n):
      if progress_file:
        with open(progress_file, "a") as f:
          f.write(f"{n}\n")

    indexing.index_folder(
      images, index, StubExtractor(delay_s), commit_every=8, progress=False, on_commit=on_commit
    )
  except BaseException:  # noqa: BLE001 - report to the parent through the exit code
    traceback.print_exc()
    code = 3
  finally:
    os._exit(code)


def _kill_at_event(n: int) -> None:
  left = [n]

  def tick():
    left[0] -= 1
    if left[0] <= 0:
      os.kill(os.getpid(), signal.SIGKILL)

  def hook(point):
    tick()

  faults.set_hook(hook)
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    real_fsync(fd)
    tick()

  def replace(a, b):
    real_replace(a, b)
    tick()

  fileio.os = _OsProxy(fsync=fsync, replace=replace)


class _OsProxy:
  """`os` with a few functions replaced (only fileio sees it)."""

  def __init__(self, **overrides):
    self.__dict__.update(overrides)

  def __getattr__(self, name):
    return getattr(os, name)


def count_events(images, index) -> int:
  """I/O events (hook points, fsyncs, renames) of an uninterrupted stub run, counted in a child."""
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(r)
    n = [0]

    def hook(point):
      n[0] += 1

    faults.set_hook(hook)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
      real_fsync(fd)
      n[0] += 1

    def replace(a, b):
      real_replace(a, b)
      n[0] += 1

    fileio.os = _OsProxy(fsync=fsync, replace=replace)
    try:
      indexing.index_folder(images, index, StubExtractor(), commit_every=8, progress=False)
      os.write(w, str(n[0]).encode())
    finally:
      os._exit(0)
  os.close(w)
  os.waitpid(pid, 0)
  with os.fdopen(r) as f:
    return int(f.read())


def wait(pid: int) -> int:
  """Waits for a child; returns the signal that killed it (negative) or its exit code."""
  _, status = os.waitpid(pid, 0)
  return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def read_progress(progress_file) -> int:
  if not os.path.exists(progress_file):
    return 0
  with open(progress_file) as f:
    lines = f.read().split()
  return int(lines[-1]) if lines else 0


def check_index(path, expected: dict | None = None, atol: float = 0.02) -> list[str]:
  """Every invariant of a committed index; returns its live keys in storage order.

  Opens as a reader (no cleanup), then as the writer (which undoes an interrupted commit), and
  checks: every committed row present exactly once, the catalog matches the manifest row for
  row, no row or file outside the manifest, vectors finite, unit-norm and (with `expected`:
  key -> float32 vector before normalisation) equal to what was indexed.
  """
  path = os.fspath(path)
  with store.Index.open(path, readonly=True) as r:
    reader_keys = r.keys()
  with store.Index.open(path) as idx:  # recovery runs here
    with open(os.path.join(path, store.MANIFEST)) as f:
      m = json.load(f)
    live = idx.keys()
    assert live == reader_keys, "reader and writer disagree on the committed state"
    assert len(set(live)) == len(live), "a key is live twice"
    rows = catalog_query(path, "SELECT segment, row, key, added_gen, deleted_gen FROM rows")
    names = {s["name"]: int(s["rows"]) for s in m["segments"]}
    assert len(rows) == sum(names.values()), "catalog rows do not match the manifest"
    assert {(s, r) for s, r, *_ in rows} == {(n, i) for n, c in names.items() for i in range(c)}
    assert all(a <= m["generation"] for *_, a, _ in rows)
    assert all(d is None or d <= m["generation"] for *_, d in rows)
    listed = {f["file"] for s in m["segments"] for f in s["files"].values()}
    for fname in os.listdir(path):
      if fname.startswith("seg-") or fname.endswith(".tmp"):
        assert fname in listed, f"leftover {fname} after recovery"
    n = 0
    for keys, x in idx.iter_chunks(chunk_rows=64):
      assert np.isfinite(x).all()
      np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=0.02)
      if expected is not None:
        want = np.stack([expected[k] for k in keys])
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(x, want, atol=atol)
      n += len(keys)
    assert n == len(live) == len(idx)
  return live


def vectors_of(path) -> dict[str, np.ndarray]:
  with store.Index.open(path, readonly=True) as idx:
    return {k: v.copy() for k, v in idx.iter_vectors()}


def catalog_query(path, sql: str) -> list[tuple]:
  """Rows of a read-only query of an index's catalog (SQLite)."""
  uri = pathlib.Path(path, store.CATALOG).absolute().as_uri() + "?mode=ro"
  db = sqlite3.connect(uri, uri=True)
  try:
    return db.execute(sql).fetchall()
  finally:
    db.close()


def catalog_rows(path) -> int:
  return catalog_query(path, "SELECT COUNT(*) FROM rows")[0][0]
