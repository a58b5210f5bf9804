"""An index larger than the memory a search may use still searches correctly, streaming from disk.

The search runs in a child process inside a memory cgroup whose limit (page cache included) is
smaller than the index files, after the files were dropped from the page cache: every byte is read
from disk, pages are evicted as the scan goes on, and the answer must equal the unconstrained one.
Needs a writable cgroup memory controller (v1 or v2), as root in a container or VM; skips otherwise.
"""

import json
import os
import shlex
import subprocess
import sys
import uuid

import numpy as np
import pytest

from engine.store import Index

ROWS, DIM, BLOCK = 1_048_576, 512, 131_072  # int8: 512 MiB of vectors in eight segments
# The limit is the child's own anonymous memory after an unconstrained search of the same index
# (Python, JAX, compiled kernels, the catalog's keys: about 250 MiB measured) plus this much room
# for page cache: far less than the index.
HEADROOM = 64 << 20

_CHILD = r"""
import json, sys, time
import numpy as np
from engine.store import Index
with Index.open(sys.argv[1]) as idx:
  t = time.perf_counter()
  s, k = idx.search(np.load(sys.argv[2]), k=5)
  dt = time.perf_counter() - t
  anon = [int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("RssAnon:")]
  print(json.dumps({"seconds": dt, "anon": anon[0], "keys": k.tolist(), "scores": s.tolist()}))
"""


class _Cgroup:
  """A memory-limited cgroup (v1 `memory` hierarchy or v2 unified), removed on exit."""

  def __init__(self, limit_bytes: int | None):
    name = f"vgg-retrieval-test-{uuid.uuid4().hex[:8]}"
    v1, v2 = "/sys/fs/cgroup/memory", "/sys/fs/cgroup"
    if os.path.isfile(os.path.join(v1, "memory.limit_in_bytes")):
      self.path, self.limit_file, self.peak_file = (
        os.path.join(v1, name),
        "memory.limit_in_bytes",
        ("memory.max_usage_in_bytes"),
      )
    elif "memory" in _read(os.path.join(v2, "cgroup.subtree_control")).split():
      self.path, self.limit_file, self.peak_file = (
        os.path.join(v2, name),
        "memory.max",
        "memory.peak",
      )
    else:
      raise OSError("no cgroup memory controller is available")
    os.mkdir(self.path)
    if limit_bytes is None:
      return
    try:
      with open(os.path.join(self.path, self.limit_file), "w") as f:
        f.write(str(limit_bytes))
      if self.limit_file == "memory.limit_in_bytes":  # no swap either, where accounted
        memsw = os.path.join(self.path, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
          with open(memsw, "w") as f:
            f.write(str(limit_bytes))
    except OSError:
      self.close()
      raise

  def command(self, argv: list[str]) -> list[str]:
    """argv run inside the cgroup: a shell moves itself in, then execs (no fork-time Python)."""
    procs = shlex.quote(os.path.join(self.path, "cgroup.procs"))
    return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]

  def peak(self) -> int:
    return int(_read(os.path.join(self.path, self.peak_file)))

  def close(self) -> None:
    try:
      os.rmdir(self.path)
    except OSError:
      pass


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ""


def _drop_from_page_cache(folder: str) -> None:
  for name in os.listdir(folder):
    fd = os.open(os.path.join(folder, name), os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _search_in_cgroup(limit: int | None, path: str, queries_file: str) -> tuple[dict, int]:
  """Runs the search child in a new cgroup; returns (its JSON answer, the cgroup's peak bytes)."""
  cg = _Cgroup(limit)
  try:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(
      cg.command([sys.executable, "-c", _CHILD, path, queries_file]),
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
    )
    assert r.returncode == 0, f"search under a limit of {limit} bytes failed: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1]), cg.peak()
  finally:
    cg.close()


def test_index_larger_than_memory_limit_streams_from_disk(tmp_path):
  try:
    _Cgroup(None).close()
  except OSError as e:
    pytest.skip(f"cannot make a memory cgroup here: {e}")
  rng = np.random.default_rng(0)
  path = str(tmp_path / "big")
  with Index.create(path, dim=DIM, dtype="int8") as idx:
    for a in range(0, ROWS, BLOCK):
      x = rng.standard_normal((BLOCK, DIM), dtype=np.float32)
      idx.add(x, [f"row{i}" for i in range(a, a + BLOCK)])
      if a == 0:
        planted = x[[3, 77]]
  queries = np.concatenate([planted, rng.standard_normal((2, DIM), dtype=np.float32)])
  np.save(tmp_path / "q.npy", queries)
  with Index.open(path) as idx:
    want_s, want_k = idx.search(queries, k=5)
  index_bytes = sum(
    os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".npy")
  )
  free, _ = _search_in_cgroup(None, path, str(tmp_path / "q.npy"))
  limit = free["anon"] + HEADROOM
  if index_bytes < 1.25 * limit:
    pytest.skip(f"a search process needs {free['anon'] >> 20} MiB here: the index is not larger")
  _drop_from_page_cache(path)
  got, peak = _search_in_cgroup(limit, path, str(tmp_path / "q.npy"))
  print(
    f"index {index_bytes / 2**20:.0f} MiB searched under a {limit / 2**20:.0f} MiB limit (peak "
    f"{peak / 2**20:.0f} MiB, {free['anon'] / 2**20:.0f} MiB of it the process's own) in "
    f"{got['seconds']:.2f} s from a cold cache"
  )
  assert peak <= limit < index_bytes
  assert got["keys"] == want_k.tolist() == free["keys"]
  np.testing.assert_array_equal(np.float32(got["scores"]), want_s)
  assert got["keys"][0][0] == "row3" and got["keys"][1][0] == "row77"
