r"""Indexing wall time against the number of localhost `jax.distributed` processes.

  python -m bench.index_processes [--photos=96] [--processes=1,2,4] [--repeats=3]
      [--model_args="--weights=random:5 --config=tiny --image_size=64 --batch_size=4 --backend=xla"]
      [--output=results/index_processes.json]

Writes --photos synthetic photos (`engine.app.sample.scene`, 640x480 JPEG), then for each process
count P runs `python -m engine.index` as P processes of one run on a new index (P = 1: the plain
one-process binary, the peer every ratio is against), --repeats times, and prints the median wall
time of the whole run (from the first start to the last exit: interpreter, imports, model build,
compilation, the walk, extraction, and for P > 1 the processes' meeting, the staging indexes and
process 0's merge), images/s, the ratio to one process, and the merge time process 0 reports.
All processes share this machine's cores, so on a small machine the ratio is the cost of the
split (each process builds and compiles the model itself; the merge writes every vector once
more), not a speed-up; on several hosts each process brings its own cores.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.machine import cpu_model
from engine.app import sample
from engine.common.fileio import atomic_write_json

_PHOTOS = flags.DEFINE_integer("photos", 96, "Synthetic photos to index.")
_PROCESSES = flags.DEFINE_list("processes", ["1", "2", "4"], "Process counts (1: the peer).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per process count (median).")
_COMMIT_EVERY = flags.DEFINE_integer("commit_every", 16, "--commit_every of the runs.")
_MODEL_ARGS = flags.DEFINE_string(
  "model_args",
  "--weights=random:5 --config=tiny --image_size=64 --batch_size=4 --backend=xla",
  "Model flags of engine.index.",
)
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")

_MERGE_RE = re.compile(r"added their (\d+) images to the index in ([0-9.]+) s")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(images: str, index: str, n: int) -> tuple[float, float | None]:
  """One run of n processes on a new index: (wall seconds, process 0's merge seconds)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  base = [
    sys.executable,
    "-m",
    "engine.index",
    f"--images={images}",
    f"--index={index}",
    f"--commit_every={_COMMIT_EVERY.value}",
    *shlex.split(_MODEL_ARGS.value),
  ]
  port = _free_port()
  argvs = (
    [base]
    if n == 1
    else [
      [
        *base,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={n}",
        f"--process_id={p}",
      ]
      for p in range(n)
    ]
  )
  t = time.perf_counter()
  procs = [
    subprocess.Popen(a, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for a in argvs
  ]
  outs = [p.communicate(timeout=1800) for p in procs]
  wall = time.perf_counter() - t
  for p, (_, err) in zip(procs, outs, strict=True):
    if p.returncode != 0:
      raise RuntimeError(f"engine.index failed ({p.returncode}):\n{err[-3000:]}")
  if f"indexed {_PHOTOS.value}," not in outs[0][0]:
    raise RuntimeError(f"unexpected summary:\n{outs[0][0]}")
  m = _MERGE_RE.search(outs[0][0])
  return wall, (float(m[2]) if m else None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  counts = sorted({int(v) for v in _PROCESSES.value} | {1})
  work = tempfile.mkdtemp(prefix="index-processes-")
  try:
    images = os.path.join(work, "photos")
    os.makedirs(images)
    for i in range(_PHOTOS.value):
      sample.scene(np.random.default_rng(i)).save(os.path.join(images, f"p{i:05d}.jpg"))
    _run(images, os.path.join(work, "warm"), 1)  # fills the page and compilation caches
    rows = []
    for n in counts:
      walls, merges = [], []
      for r in range(_REPEATS.value):
        wall, merge = _run(images, os.path.join(work, f"ix-{n}-{r}"), n)
        walls.append(wall)
        if merge is not None:
          merges.append(merge)
      rows.append(
        {
          "processes": n,
          "wall_s": statistics.median(walls),
          "merge_s": statistics.median(merges) if merges else 0.0,
          "walls_s": walls,
        }
      )
      print(f"{n} processes: {rows[-1]['wall_s']:.2f} s (runs {walls})", flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  one = rows[0]["wall_s"]
  print(
    f"\nengine.index on {cpu_model()} ({len(os.sched_getaffinity(0))} cores shared by all processes), "
    f"{_PHOTOS.value} photos, {_MODEL_ARGS.value}, --commit_every={_COMMIT_EVERY.value}, "
    f"median of {_REPEATS.value}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print(f"{'processes':>9s} {'wall s':>8s} {'images/s':>9s} {'ratio':>6s} {'merge s':>8s}")
  for r in rows:
    print(
      f"{r['processes']:9d} {r['wall_s']:8.2f} {_PHOTOS.value / r['wall_s']:9.1f} "
      f"{r['wall_s'] / one:6.2f} {r['merge_s']:8.2f}"
    )
  if _OUTPUT.value:
    meta = {
      "date": time.strftime("%Y-%m-%d"),
      "cpu": cpu_model(),
      "photos": _PHOTOS.value,
      "model_args": _MODEL_ARGS.value,
    }
    atomic_write_json(_OUTPUT.value, {"meta": meta, "rows": rows})


if __name__ == "__main__":
  app.run(main)
