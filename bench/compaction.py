r"""Open and search time of an index grown by many small commits, against the same rows compacted.

  python -m bench.compaction [--d=512] [--dtype=int8] [--repeats=15] [--output=results/compaction.json]

Builds three int8 indexes of random unit vectors per scenario, each from the same commits: with
the writer's size-tiered merging (the default), without it (every commit stays a segment, as
before merging existed) and fully compacted. Scenarios: 100 commits of 256 rows (an indexing run
with --commit_every=256) and 1,000 commits of one row. Times `Index.open` (reader) and a one-query
`Index.search(k=10)`, medians of --repeats runs after a warm-up. Target: merged within 1.5x of
compacted.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.machine import cpu_model
from engine.common.fileio import atomic_write_json
from engine.store import Index, segments

_D = flags.DEFINE_integer("d", 512, "Vector dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "int8", ["float32", "float16", "bfloat16", "int8"], "Storage.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed runs per figure.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")

SCENARIOS = {"100 commits x 256 rows": (100, 256), "1000 commits x 1 row": (1000, 1)}


def build(path, x, commits, rows, *, merge: bool, compact: bool) -> int:
  fanout = segments.MERGE_FANOUT
  if not merge:
    segments.MERGE_FANOUT = 1 << 30  # no run is ever long enough: every commit stays a segment
  try:
    with Index.create(path, dim=x.shape[1], dtype=_DTYPE.value) as idx:
      for c in range(commits):
        idx.add(x[c * rows : (c + 1) * rows], [f"{c}/{r}" for r in range(rows)])
      if compact:
        idx.compact()
      return len(idx.segments)
  finally:
    segments.MERGE_FANOUT = fanout


def timed(fn, repeats):
  fn()
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return statistics.median(out)


def measure(path, q, repeats):
  def open_close():
    Index.open(path, readonly=True).close()

  with Index.open(path, readonly=True) as idx:
    search_s = timed(lambda: idx.search(q, k=10), repeats)
  return timed(open_close, repeats), search_s


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  results = {"cpu": cpu_model(), "cpus": os.cpu_count(), "d": _D.value, "dtype": _DTYPE.value}
  tmp = tempfile.mkdtemp(prefix="bench-compaction-")
  print(f"CPU: {results['cpu']} ({results['cpus']} cores); D = {_D.value}, {_DTYPE.value}")
  print(f"{'scenario':24s} {'layout':10s} {'segments':>8s} {'open ms':>8s} {'search ms':>9s}")
  try:
    for name, (commits, rows) in SCENARIOS.items():
      x = rng.standard_normal((commits * rows, _D.value)).astype(np.float32)
      q = rng.standard_normal(_D.value).astype(np.float32)
      row = {}
      for layout, kw in (
        ("unmerged", dict(merge=False, compact=False)),
        ("merged", dict(merge=True, compact=False)),
        ("compacted", dict(merge=True, compact=True)),
      ):
        path = os.path.join(tmp, f"{commits}-{layout}")
        n_seg = build(path, x, commits, rows, **kw)
        open_s, search_s = measure(path, q, _REPEATS.value)
        row[layout] = {"segments": n_seg, "open_s": open_s, "search_s": search_s}
        print(f"{name:24s} {layout:10s} {n_seg:8d} {open_s * 1e3:8.2f} {search_s * 1e3:9.2f}")
      for layout in ("unmerged", "merged"):
        for what in ("open_s", "search_s"):
          row[layout][what + "_vs_compacted"] = row[layout][what] / row["compacted"][what]
      m = row["merged"]
      print(
        f"{'':24s} merged / compacted: open {m['open_s_vs_compacted']:.2f}x, search "
        f"{m['search_s_vs_compacted']:.2f}x (target <= 1.5x)"
      )
      results[name] = row
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if _OUTPUT.value:
    atomic_write_json(_OUTPUT.value, results)


if __name__ == "__main__":
  app.run(main)
