"""`engine.index` on several processes of a jax.distributed run (localhost, loopback): the index
holds the same keys and vectors as one process's, a process killed mid-run loses nothing once the
run is repeated, and the single-writer rule still holds."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from binlib import CACHE, ROOT, TINY, subprocess_env
from faultlib import StubExtractor, check_index, make_photos, vectors_of

from engine import store
from engine.app import process_indexing
from engine.common.errors import UserError

# Runs engine.index with a store crash point armed: argv = [point, n, *args].
_ARMED = (
  "import runpy, sys; from engine.store import faults; "
  "point, n = sys.argv[1:3]; del sys.argv[1:3]; faults.kill_at(point, int(n)); "
  "sys.argv[0] = 'engine.index'; runpy.run_module('engine.index', run_name='__main__', alter_sys=True)"
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, n, faults=None):
  """Starts `engine.index *args` as n processes of one run; faults: process -> "POINT:N"."""
  port = _free_port()
  env = subprocess_env({"VGG_RETRIEVAL_CACHE": CACHE, "JAX_PLATFORMS": "cpu"})
  procs = []
  for p in range(n):
    flags = [
      *args,
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={n}",
      f"--process_id={p}",
      "--distributed_timeout=60",
    ]
    fault = (faults or {}).get(p)
    if fault:
      point, _, count = fault.partition(":")
      argv = [sys.executable, "-c", _ARMED, point, count, *flags]
    else:
      argv = [sys.executable, "-m", "engine.index", *flags]
    procs.append(
      subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    )
  return procs


def _finish(procs, timeout=240):
  out = []
  for p in procs:
    o, e = p.communicate(timeout=timeout)
    out.append((p.returncode, o, e))
  return out


def _one_process(images, index, *extra):
  r = subprocess.run(
    [sys.executable, "-m", "engine.index", f"--images={images}", f"--index={index}", *TINY, *extra],
    cwd=ROOT,
    env=subprocess_env({"VGG_RETRIEVAL_CACHE": CACHE, "JAX_PLATFORMS": "cpu"}),
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert r.returncode == 0, r.stderr
  return r


def _same_index(a, b, atol):
  va, vb = vectors_of(a), vectors_of(b)
  assert sorted(va) == sorted(vb)
  for k in va:
    np.testing.assert_allclose(va[k], vb[k], atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("photos")
  make_photos(folder, 11)
  (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  return folder


@pytest.mark.parametrize("n", [2, 4])
def test_processes_index_like_one(tmp_path, photos, n):
  one, many = tmp_path / "one", tmp_path / "many"
  _one_process(photos, one, "--dtype=float32")
  args = [f"--images={photos}", f"--index={many}", "--dtype=float32", "--commit_every=2", *TINY]
  runs = _finish(_start(args, n))
  for p, (rc, _, err) in enumerate(runs):
    assert rc == 0, (p, err)
  assert "indexed 11, unchanged 0, failed 1" in runs[0][1]
  assert f"{n} processes; process 0 added their 11 images to the index" in runs[0][1]
  assert all(out == "" for _, out, _ in runs[1:])  # process 0 reports, the others stay silent
  _same_index(one, many, atol=1e-5)
  check_index(many)
  assert not os.path.exists(many / process_indexing.STAGING)
  with open(one / "last_run_failures.tsv") as f1, open(many / "last_run_failures.tsv") as f2:
    assert f1.read() == f2.read() != ""
  if n == 2:  # nothing new: nothing extracted, the index unchanged
    again = _finish(_start(args, n))
    assert again[0][0] == 0 and "indexed 0, unchanged 11, failed 1" in again[0][1], again[0][2]


def test_a_killed_process_loses_nothing_once_the_run_is_repeated(tmp_path, photos):
  one, two = tmp_path / "one", tmp_path / "two"
  _one_process(photos, one)
  args = [f"--images={photos}", f"--index={two}", "--commit_every=2", *TINY]
  # Process 1 dies after its second commit wrote the catalog but not the manifest.
  procs = _start(args, 2, faults={1: "catalog:2"})
  procs[1].communicate(timeout=240)
  assert procs[1].returncode == -signal.SIGKILL
  _, err = procs[0].communicate(timeout=120)  # its next collective finds process 1 gone
  assert procs[0].returncode == 1, err
  assert err.strip().splitlines()[-1].startswith("error: lost another process of the run"), err
  staged = process_indexing.staging_path(str(two), 1, 2)
  with store.Index.open(staged, readonly=True) as s:
    assert len(s) == 2  # its first commit survives
  runs = _finish(_start(args, 2))
  for p, (rc, _, err) in enumerate(runs):
    assert rc == 0, (p, err)
  summary = re.search(r"indexed (\d+), unchanged (\d+), failed 1,", runs[0][1])
  recovered = re.search(r"recovered (\d+) images an interrupted run had extracted", runs[0][1])
  assert summary and recovered, runs[0][1]
  indexed, unchanged = int(summary[1]), int(summary[2])
  assert int(recovered[1]) == unchanged >= 2 and indexed + unchanged == 11, runs[0][1]
  assert not os.path.exists(two / process_indexing.STAGING)
  keys = check_index(two)
  assert len(keys) == 11
  _same_index(one, two, atol=0.02)  # int8: a rounding step at most


def test_a_held_writer_lock_refuses_every_process(tmp_path, photos):
  index = tmp_path / "ix"
  _one_process(photos, index)
  with store.Index.open(index):  # a second writer holds the lock
    runs = _finish(_start([f"--images={photos}", f"--index={index}", *TINY], 2))
  for p, (rc, _, err) in enumerate(runs):
    assert rc == 1, (p, err)
    assert "Traceback" not in err
    assert "locked" in err.strip().splitlines()[-1], err
  assert "process 0 failed to open the index" in runs[1][2]


def test_fold_twice_neither_loses_nor_duplicates_and_skips_debris(tmp_path):
  stub = StubExtractor()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, stub.dim)).astype(np.float32)
  keys = [f"/photos/{i}.jpg" for i in range(5)]
  stats = [store.FileStat(sha256=f"{i:064x}", size=100 + i, mtime_ns=i) for i in range(5)]
  staged = process_indexing.staging_path(str(tmp_path / "ix"), 1, 2)
  with store.Index.create(tmp_path / "ix", dim=stub.dim, metadata=stub.index_metadata()) as idx:
    with store.Index.create(
      staged, dim=stub.dim, dtype="float32", metadata=stub.index_metadata(), normalize=False
    ) as s:
      s.add(x, keys, files=stats)
    backup = str(tmp_path / "backup")
    shutil.copytree(staged, backup)
    debris = os.path.join(os.path.dirname(staged), "trash-0-of-2-123")
    os.makedirs(debris)
    os.makedirs(process_indexing.staging_path(idx.path, 0, 2))  # crashed before its manifest
    assert process_indexing.fold_staging(idx, stub) == 5
    assert not os.path.exists(os.path.join(idx.path, process_indexing.STAGING))
    # A crash between the fold and the removal: the next run folds the same rows again.
    shutil.copytree(backup, staged)
    assert process_indexing.fold_staging(idx, stub) == 5
    assert sorted(idx.keys()) == keys and len(idx) == 5
    assert idx.get_file_stat(keys[3]) == stats[3]
    want = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(idx.get_vectors(keys), want, atol=0.02)
    # A staging index of another extractor is refused, naming it.
    with store.Index.create(
      staged, dim=stub.dim, dtype="float32", metadata={"extractor": {"model": "other"}}
    ) as s:
      s.add(x[:1], keys[:1])
    with pytest.raises(UserError, match="staging index .*1-of-2"):
      process_indexing.fold_staging(idx, stub)


def test_a_process_that_cannot_write_its_share_stops_every_process(tmp_path, photos):
  index = tmp_path / "ix"
  _one_process(photos, index, f"--images={photos / 'p000.jpg'}")  # one image: quick
  (index / process_indexing.STAGING).mkdir()
  (index / process_indexing.STAGING / "1-of-2").write_text("in the way of process 1's staging")
  runs = _finish(_start([f"--images={photos}", f"--index={index}", *TINY], 2))
  for p, (rc, _, err) in enumerate(runs):
    assert rc == 1, (p, err)
    assert "Traceback" not in err
  assert "process 1 failed to index its share" in runs[0][2].strip().splitlines()[-1], runs[0][2]
