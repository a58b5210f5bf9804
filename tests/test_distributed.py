"""Several processes over one index through jax.distributed, on localhost (loopback): the merged
answer equals one process's; a missing coordinator and processes started differently are refused
with one line naming the problem. Plus `ProcessScan`'s split and merge in one process, with the
processes' all-gather played by threads."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from engine.store import Index
from engine.store.sharded import ProcessScan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _build(path, dtype, seed=0):
  rng = np.random.default_rng(seed)
  idx = Index.create(path, dim=32, dtype=dtype)
  n = 0
  for rows in (300, 211, 5):  # segments; the row split crosses their boundaries
    x = rng.standard_normal((rows, 32)).astype(np.float32)
    third = rows // 3
    x[:third] = x[third : 2 * third] + 0.3 * rng.standard_normal((third, 32))  # near-duplicates
    idx.add(x, [f"k{n + j}" for j in range(rows)])
    n += rows
  idx.delete([f"k{j}" for j in range(0, n, 11)])
  idx.close()


def _dedup(args, n=1, port=None):
  base = [sys.executable, "-m", "engine.dedup", "--format=json", *args]
  if n == 1 and port is None:
    procs = [
      subprocess.Popen(
        base, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    ]
  else:
    port = port or _free_port()
    procs = [
      subprocess.Popen(
        [
          *base,
          f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={n}",
          f"--process_id={p}",
          "--distributed_timeout=60",
        ],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for p in range(n)
    ]
  out = []
  for p in procs:
    o, e = p.communicate(timeout=300)
    out.append((p.returncode, o, e))
  return out


def _same_groups(a, b):
  ga, gb = json.loads(a)["groups"], json.loads(b)["groups"]
  assert [[m["key"] for m in g["members"]] for g in ga] == [
    [m["key"] for m in g["members"]] for g in gb
  ]
  sa = [m["score"] for g in ga for m in g["members"]]
  sb = [m["score"] for g in gb for m in g["members"]]
  np.testing.assert_allclose(sa, sb, atol=1e-5)
  assert len(ga) > 10


@pytest.mark.parametrize("dtype,n", [("int8", 2), ("float32", 2), ("int8", 4)])
def test_dedup_on_processes_equals_one_process(tmp_path, dtype, n):
  path = str(tmp_path / "ix")
  _build(path, dtype)
  args = [f"--index={path}", "--threshold=0.8"]
  [(rc, one, err)] = _dedup(args)
  assert rc == 0, err
  runs = _dedup(args, n)
  for p, (rc, _, err) in enumerate(runs):
    assert rc == 0, (p, err)
  _same_groups(runs[0][1], one)
  assert all(o == "" for _, o, _ in runs[1:])  # process 0 prints, the others stay silent


def test_unreachable_coordinator_fails_naming_it(tmp_path):
  path = str(tmp_path / "ix")
  _build(path, "int8")
  port = _free_port()  # nobody listens there
  t = time.monotonic()
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "engine.dedup",
      f"--index={path}",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      "--process_id=1",
      "--distributed_timeout=2",
    ],
    env=_env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 1, r.stderr
  assert time.monotonic() - t < 60
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and f"127.0.0.1:{port}" in last, r.stderr


def test_processes_given_different_indexes_refuse(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _build(a, "int8")
  _build(b, "int8", seed=1)
  port = _free_port()
  common = ["--format=json", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "engine.dedup", f"--index={ix}", *common, f"--process_id={p}"],
      env=_env(),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p, ix in enumerate((a, b))
  ]
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "--index" in last and a in last and b in last, last
    assert out == ""


def _threaded_allgather(n):
  """An all-gather across n threads (each stands for a process)."""
  barrier = threading.Barrier(n)
  slots = [None] * n
  lock = threading.Lock()

  def make(p):
    def gather(x):
      with lock:
        slots[p] = np.asarray(x)
      barrier.wait()
      out = np.stack(slots)
      barrier.wait()
      return out

    return gather

  return make


@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_process_scan_split_and_merge(tmp_path, dtype):
  path = str(tmp_path / "ix")
  _build(path, dtype)
  rng = np.random.default_rng(5)
  q = rng.standard_normal((6, 32)).astype(np.float32)
  with Index.open(path, readonly=True) as idx:
    allowed = [k for k in idx.keys() if int(k[1:]) % 2]
    for n in (1, 3, 4):
      make = _threaded_allgather(n)
      shares = [ProcessScan(p, n, allgather=make(p)) for p in range(n)]
      covered = [s.share(len(idx.keys()) + 47) for s in shares]
      assert covered[0][0] == 0 and covered[-1][1] == len(idx.keys()) + 47
      assert all(covered[p][1] == covered[p + 1][0] for p in range(n - 1))
      for metric, filt in (("cosine", None), ("l2", allowed)):
        want = idx.search(q, k=9, metric=metric, allowed_keys=filt)
        got = [None] * n

        def run(p, metric=metric, filt=filt, got=got, shares=shares):
          got[p] = idx.search(q, k=9, metric=metric, allowed_keys=filt, scan=shares[p])

        threads = [threading.Thread(target=run, args=(p,)) for p in range(n)]
        for t in threads:
          t.start()
        for t in threads:
          t.join(120)
        for s, k in got:
          np.testing.assert_allclose(s, want[0], atol=1e-5)
          assert (k == want[1]).mean() > 0.98


TINY = ["--weights=random:5", "--config=tiny", "--image_size=64", "--batch_size=4", "--backend=xla"]


def test_query_on_two_processes_equals_one_process(tmp_path):
  from engine.app import sample

  photos = tmp_path / "photos"
  photos.mkdir()
  for i in range(9):
    sample.scene(np.random.default_rng(300 + i), 96, 80).save(photos / f"p{i}.jpg")
  index = str(tmp_path / "idx")
  env = {**_env(), "VGG_RETRIEVAL_CACHE": str(tmp_path / "cache")}

  def query(*extra):
    return [
      sys.executable,
      "-m",
      "engine.query",
      f"--index={index}",
      f"--query={photos}",
      "--k=4",
      "--format=json",
      *TINY,
      *extra,
    ]

  subprocess.run(
    [sys.executable, "-m", "engine.index", f"--images={photos}", f"--index={index}", *TINY],
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
    timeout=300,
  )
  one = subprocess.run(query(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr
  port = _free_port()
  procs = [
    subprocess.Popen(
      query(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={p}"),
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p in range(2)
  ]
  outs = [p.communicate(timeout=900) + (p.returncode,) for p in procs]
  for _out, err, rc in outs:
    assert rc == 0, err
  assert outs[1][0] == ""
  a, b = json.loads(outs[0][0])["results"], json.loads(one.stdout)["results"]
  assert [r["query"] for r in a] == [r["query"] for r in b] and len(a) == 9
  for ra, rb in zip(a, b, strict=True):
    assert [m["key"] for m in ra["matches"]] == [m["key"] for m in rb["matches"]]
    np.testing.assert_allclose(
      [m["score"] for m in ra["matches"]], [m["score"] for m in rb["matches"]], atol=1e-6
    )
