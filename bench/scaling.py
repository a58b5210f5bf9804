r"""Search time as the index grows (N) and as queries are batched (Q), against the two floors.

  python -m bench.scaling [--d=512] [--ns=10000,100000,1000000] [--qs=1,4,16,64,256,1024]
                          [--dtypes=float32,int8] [--plot=results/scaling.png] [--output=...json]
  python -m bench.scaling --d=128 --with_1e7     # adds N = 10,000,000 (only for D <= 256)
  python -m bench.scaling --small                # a check in seconds

Builds one `engine.store.Index` per (dtype, N) from random unit vectors and times `Index.search`
(memory-mapped segments streamed through the jitted `engine.search` kernel, warm page cache):
first over N at Q = --q_for_n, then over Q at the largest N. Every figure is the median of
--repeats runs after a warm-up call (which also compiles; its excess is reported as compile time).

Floors for one batch of Q queries: memory = bytes of the stored matrix / --mem_gbps (one pass over
the data serves the whole batch) and matrix unit = 2 N D Q FLOPs / the measured peak of the dtype's
product (float32 ~300 GFLOP/s; bfloat16 ~1.2 TFLOP/s in JAX with AMX: see
/work/shared/PERFORMANCE.md; int8 with the native kernel: its VNNI ceiling, measured at start). The plot (matplotlib, optional) draws both next to the measurements.
Prints a table last; writes JSON with --output.

  python -m bench.scaling --scale_out [--devices=1,2,4,8] [--processes=1,2,4] [--scale_n=1000000]

instead times search over a mesh of simulated CPU devices (`--xla_force_host_platform_device_count`,
`engine.store.sharded.ShardedSearcher`, rows resident) and over processes of a localhost
`jax.distributed` run (`ProcessScan`), each in fresh child processes, against one plain process
measured in the same run. Simulated devices and processes share this machine's cores, so the
ratio is the cost of splitting, merging and communicating, not a speed-up; the all-gather of the
[Q, k] lists and the host merge are also timed alone.
"""

from __future__ import annotations

import json
import os
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
from engine.common.fileio import atomic_write_json
from engine.kernels import native

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
BLOCK = 131072


def random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(path: str, n: int, d: int, dtype: str, seed: int = 0):
  """An Index of n random unit vectors (added in blocks: each block is one segment)."""
  from engine.store import Index

  rng = np.random.default_rng(seed)
  idx = Index.create(path, dim=d, dtype=dtype)
  for a in range(0, n, BLOCK):
    b = min(n, a + BLOCK)
    idx.add(random_unit(rng, b - a, d), [str(i) for i in range(a, b)])
  return idx


def stored_bytes(n: int, d: int, dtype: str) -> int:
  return n * d * ITEMSIZE[dtype] + (n * 4 if dtype == "int8" else 0)


def floors(n: int, d: int, q: int, dtype: str, mem_gbps: float, peaks: dict) -> dict:
  """Seconds per batch of q queries: memory floor, matrix-unit floor."""
  return {
    "memory_s": stored_bytes(n, d, dtype) / (mem_gbps * 1e9),
    "compute_s": 2.0 * n * d * q / (peaks[dtype] * 1e9),
  }


def time_search(idx, q_qd: np.ndarray, k: int, repeats: int) -> tuple[float, float]:
  """(median seconds per call after a warm-up, warm-up seconds)."""
  t = time.perf_counter()
  idx.search(q_qd, k=k)
  first = time.perf_counter() - t
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    idx.search(q_qd, k=k)
    ts.append(time.perf_counter() - t)
  return statistics.median(ts), first


def plot(rows: list[dict], path: str, meta: dict) -> str | None:
  """Two log-log panels (time vs N, time vs Q) with the floors; None when matplotlib is missing."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  colors = {"float32": "C0", "float16": "C3", "bfloat16": "C2", "int8": "C1"}
  for ax, sweep, x in ((axes[0], "n", "n"), (axes[1], "q", "q")):
    for dtype in meta["dtypes"]:
      rs = [r for r in rows if sweep in r["sweeps"] and r["dtype"] == dtype]
      rs.sort(key=lambda r: r[x])
      if not rs:
        continue
      xs = [r[x] for r in rs]
      c = colors.get(dtype, "k")
      ax.plot(xs, [r["seconds"] for r in rs], "o-", color=c, label=f"{dtype} measured")
      ax.plot(
        xs, [r["memory_s"] for r in rs], "--", color=c, alpha=0.6, label=f"{dtype} memory floor"
      )
      ax.plot(
        xs, [r["compute_s"] for r in rs], ":", color=c, alpha=0.8, label=f"{dtype} matrix floor"
      )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("seconds per batch")
  axes[0].set_xlabel(f"N (rows), Q = {meta['q_for_n']}")
  axes[1].set_xlabel(f"Q (queries per batch), N = {meta['n_for_q']:,}")
  axes[0].legend(fontsize=7)
  fig.suptitle(
    f"engine.store.Index.search, D = {meta['d']}, k = {meta['k']}; floors: "
    f"{meta['mem_gbps']:g} GB/s, peaks {meta['peaks_gflops']} GFLOP/s ({meta['date']})",
    fontsize=9,
  )
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _median_s(fn, repeats: int) -> float:
  fn()  # warm-up (compiles)
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _child_devices(path: str, q: int, k: int, repeats: int) -> dict:
  """In a child whose JAX has --devices CPU devices: plain search and the mesh search."""
  import jax

  from engine.kernels import sharded as kernels_sharded
  from engine.store import Index
  from engine.store.sharded import ShardedSearcher, merge_host

  queries = random_unit(np.random.default_rng(7), q, _D.value)
  with Index.open(path, readonly=True) as idx:
    searcher = ShardedSearcher(idx, jax.devices())
    mesh_s = _median_s(lambda: searcher.search(queries, k=k), repeats)
    one_s = _median_s(lambda: idx.search(queries, k=k), repeats)
  nd = jax.device_count()
  # The merge alone: the all-gather of nd [Q, kk] lists on the mesh, plus a host merge of them.
  kk = 2 * k
  parts = [(np.random.rand(q, kk).astype(np.float32), np.arange(q * kk).reshape(q, kk))] * nd
  host_merge_s = _median_s(lambda: merge_host(parts, kk), repeats)
  small = random_unit(np.random.default_rng(8), 128 * nd, _D.value)
  gather_s = _median_s(
    lambda: jax.block_until_ready(
      kernels_sharded.sharded_topk(queries, small, kk, mesh=searcher.mesh)
    ),
    repeats,
  )
  return {
    "devices": nd,
    "resident": searcher.resident,
    "mesh_s": mesh_s,
    "one_device_s": one_s,
    "small_sharded_topk_s": gather_s,
    "host_merge_s": host_merge_s,
  }


def _child_process(path: str, q: int, k: int, repeats: int, port: int, nproc: int, pid: int):
  """One process of a localhost jax.distributed run: search with its share, and the all-gather."""
  from engine.app import distributed
  from engine.store import Index
  from engine.store.sharded import ProcessScan, _process_allgather

  cluster = distributed.initialize(f"127.0.0.1:{port}", nproc, pid, timeout_s=120)
  distributed.agree(cluster, {"index": path})
  queries = random_unit(np.random.default_rng(7), q, _D.value)
  scan = ProcessScan(cluster.process_id, cluster.num_processes)
  with Index.open(path, readonly=True) as idx:
    sec = _median_s(lambda: idx.search(queries, k=k, scan=scan), repeats)
  kk = 2 * k
  x = np.random.rand(q, kk).astype(np.float32)
  gather_s = _median_s(lambda: _process_allgather(x), repeats)
  return {"processes": nproc, "search_s": sec, "allgather_s": gather_s}


def _spawn(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.update(env_extra or {})
  return subprocess.Popen(
    [sys.executable, "-m", "bench.scaling", *args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _result(proc: subprocess.Popen) -> dict:
  out, err = proc.communicate(timeout=1800)
  if proc.returncode != 0:
    raise RuntimeError(f"child failed ({proc.returncode}):\n{err[-3000:]}")
  line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


def scale_out() -> None:
  """The devices / processes sweep of --scale_out (children: fresh JAX runtimes)."""
  d, n, q, k, reps = _D.value, _SCALE_N.value, _SCALE_Q.value, _K.value, _REPEATS.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="scaling-")
  os.makedirs(workdir, exist_ok=True)
  common = [f"--d={d}", f"--k={k}", f"--repeats={reps}", f"--scale_q={q}"]
  rows = []
  try:
    for dtype in _DTYPES.value:
      path = os.path.join(workdir, f"scale-{dtype}-{n}")
      build(path, n, d, dtype).close()
      try:
        for nd in sorted({int(v) for v in _DEVICES.value}):
          flags_env = {
            "XLA_FLAGS": (
              os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={nd}"
            ).strip()
          }
          r = _result(_spawn([*common, "--child=devices", f"--child_index={path}"], flags_env))
          rows.append({"dtype": dtype, "kind": "devices", "n": n, **r})
          print(
            f"{dtype:8s} devices={nd}: mesh {r['mesh_s'] * 1e3:8.2f} ms, one device "
            f"{r['one_device_s'] * 1e3:8.2f} ms (x{r['mesh_s'] / r['one_device_s']:.2f}); "
            f"sharded_topk of {128 * nd} rows {r['small_sharded_topk_s'] * 1e3:.2f} ms",
            flush=True,
          )
        for nproc in sorted({int(v) for v in _PROCESSES.value}):
          if nproc == 1:
            continue
          with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
          procs = [
            _spawn(
              [
                *common,
                "--child=process",
                f"--child_index={path}",
                f"--child_port={port}",
                f"--child_nproc={nproc}",
                f"--child_pid={p}",
              ]
            )
            for p in range(nproc)
          ]
          rs = [_result(p) for p in procs]
          r = rs[0]
          base = next(x for x in rows if x["kind"] == "devices" and x["dtype"] == dtype)
          r["one_process_s"] = base["one_device_s"]
          rows.append({"dtype": dtype, "kind": "processes", "n": n, **r})
          print(
            f"{dtype:8s} processes={nproc}: {r['search_s'] * 1e3:8.2f} ms "
            f"(x{r['search_s'] / r['one_process_s']:.2f} of one process), all-gather "
            f"{r['allgather_s'] * 1e3:.2f} ms",
            flush=True,
          )
      finally:
        shutil.rmtree(path, ignore_errors=True)
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)
  print(
    f"\nscale-out on {cpu_model()} ({len(os.sched_getaffinity(0))} cores shared by all "
    f"devices/processes), N = {n:,}, D = {d}, Q = {q}, k = {k}, median of {reps}; "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print(
    f"{'dtype':8s} {'split':>12s} {'ms/batch':>9s} {'1 part ms':>9s} {'ratio':>6s} {'merge ms':>9s}"
  )
  for r in rows:
    if r["kind"] == "devices":
      t, one, merge = r["mesh_s"], r["one_device_s"], r["small_sharded_topk_s"]
      split = f"{r['devices']} devices"
    else:
      t, one, merge = r["search_s"], r["one_process_s"], r["allgather_s"]
      split = f"{r['processes']} processes"
    print(
      f"{r['dtype']:8s} {split:>12s} {t * 1e3:9.2f} {one * 1e3:9.2f} {t / one:6.2f} "
      f"{merge * 1e3:9.2f}"
    )
  if _OUTPUT.value:
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "n": n, "d": d, "q": q}
    atomic_write_json(_OUTPUT.value, {"meta": meta, "rows": rows})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CHILD.value == "devices":
    r = _child_devices(_CHILD_INDEX.value, _SCALE_Q.value, _K.value, _REPEATS.value)
    print("RESULT " + json.dumps(r), flush=True)
    return
  if _CHILD.value == "process":
    r = _child_process(
      _CHILD_INDEX.value,
      _SCALE_Q.value,
      _K.value,
      _REPEATS.value,
      _CHILD_PORT.value,
      _CHILD_NPROC.value,
      _CHILD_PID.value,
    )
    print("RESULT " + json.dumps(r), flush=True)
    return
  if _SCALE_OUT.value:
    scale_out()
    return
  small = _SMALL.value
  d = 64 if small else _D.value
  ns = [1000, 10000] if small else sorted({int(float(v)) for v in _NS.value})
  qs = [1, 16] if small else sorted({int(v) for v in _QS.value})
  if _WITH_1E7.value:
    if d > 256:
      raise app.UsageError("--with_1e7 is for D <= 256 (the index would not fit the disk budget)")
    ns.append(10_000_000)
  peaks = {
    "float32": _PEAK_FP32.value,
    "float16": _PEAK_FP32.value,
    "bfloat16": _PEAK_LOW.value,
    "int8": _PEAK_LOW.value,
  }
  if native.available():  # int8 runs the native VNNI kernel: its measured instruction ceiling
    peaks["int8"] = native.vnni_peak_gops(len(os.sched_getaffinity(0)))
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="scaling-")
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(1)
  queries = random_unit(rng, max(qs + [_Q_FOR_N.value]), d)
  rows = []
  try:
    for dtype in _DTYPES.value:
      for n in ns:
        need = stored_bytes(n, d, dtype) * 1.2
        if shutil.disk_usage(workdir).free < need + (1 << 30):
          print(f"skipping {dtype} N={n:,}: not enough free disk in {workdir}")
          continue
        path = os.path.join(workdir, f"{dtype}-{n}")
        t = time.perf_counter()
        idx = build(path, n, d, dtype)
        build_s = time.perf_counter() - t
        try:
          # Each point once; the one at (max N, q_for_n) belongs to both sweeps.
          points = {_Q_FOR_N.value: ["n"]}
          if n == max(ns):
            for q in qs:
              points.setdefault(q, []).append("q")
          for q, sweeps in sorted(points.items()):
            sec, first = time_search(idx, queries[:q], _K.value, _REPEATS.value)
            row = {
              "sweeps": sweeps,
              "dtype": dtype,
              "n": n,
              "d": d,
              "q": q,
              "seconds": sec,
              "compile_s": max(0.0, first - sec),
              "queries_per_s": q / sec,
              "gb_per_s": stored_bytes(n, d, dtype) / sec / 1e9,
              "gflops": 2.0 * n * d * q / sec / 1e9,
              "build_s": build_s,
              **floors(n, d, q, dtype, _MEM_GBPS.value, peaks),
            }
            row["floor_s"] = max(row["memory_s"], row["compute_s"])
            row["of_floor"] = row["floor_s"] / sec
            rows.append(row)
            print(
              f"{dtype:8s} N={n:>10,} Q={q:>5d}: {sec * 1e3:9.2f} ms "
              f"({row['queries_per_s']:9.1f} q/s, floor {row['floor_s'] * 1e3:8.2f} ms)",
              flush=True,
            )
        finally:
          idx.close()
          shutil.rmtree(path, ignore_errors=True)
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)

  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "d": d,
    "k": _K.value,
    "dtypes": _DTYPES.value,
    "ns": ns,
    "qs": qs,
    "q_for_n": _Q_FOR_N.value,
    "n_for_q": max(ns),
    "repeats": _REPEATS.value,
    "mem_gbps": _MEM_GBPS.value,
    "peaks_gflops": {k: peaks[k] for k in _DTYPES.value},
    "cpus": os.cpu_count(),
  }
  png = None
  if _PLOT.value:
    png = plot(rows, _PLOT.value, meta)
    print(
      f"plot written to {png}"
      if png
      else "matplotlib not installed: no plot (pip install .[bench])"
    )
  meta["plot"] = png
  if _OUTPUT.value:
    atomic_write_json(_OUTPUT.value, {"meta": meta, "rows": rows})
  print(f"\nIndex.search, D = {d}, k = {_K.value}, median of {_REPEATS.value}; {meta['date']}")
  print(
    f"{'dtype':8s} {'N':>10s} {'Q':>5s} {'ms/batch':>9s} {'queries/s':>10s} {'GB/s':>6s} "
    f"{'GFLOP/s':>8s} {'mem floor':>9s} {'mxu floor':>9s} {'of floor':>8s} {'compile s':>9s}"
  )
  for r in rows:
    print(
      f"{r['dtype']:8s} {r['n']:>10,} {r['q']:5d} {r['seconds'] * 1e3:9.2f} "
      f"{r['queries_per_s']:10.1f} {r['gb_per_s']:6.1f} {r['gflops']:8.0f} "
      f"{r['memory_s'] * 1e3:9.2f} {r['compute_s'] * 1e3:9.2f} {r['of_floor']:8.0%} "
      f"{r['compile_s']:9.2f}"
    )


if __name__ == "__main__":
  # Flags exist only when run as a program, so the module stays importable next to others.
  _D = flags.DEFINE_integer("d", 512, "Dimension.")
  _NS = flags.DEFINE_list("ns", ["1e4", "1e5", "1e6"], "Index sizes N.")
  _QS = flags.DEFINE_list("qs", ["1", "4", "16", "64", "256", "1024"], "Query batch sizes Q.")
  _Q_FOR_N = flags.DEFINE_integer("q_for_n", 1, "Q of the sweep over N.")
  _WITH_1E7 = flags.DEFINE_bool("with_1e7", False, "Add N = 1e7 (D <= 256 only; needs disk).")
  _DTYPES = flags.DEFINE_list("dtypes", ["float32", "int8"], "Storage dtypes.")
  _K = flags.DEFINE_integer("k", 10, "Results per query.")
  _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (median).")
  _MEM_GBPS = flags.DEFINE_float("mem_gbps", 30.0, "Memory read bandwidth of the floor.")
  _PEAK_FP32 = flags.DEFINE_float("peak_fp32_gflops", 300.0, "float32 matmul peak in JAX.")
  _PEAK_LOW = flags.DEFINE_float(
    "peak_low_gflops", 1200.0, "bf16 (and int8 without the native kernel) matmul peak in JAX."
  )
  _PLOT = flags.DEFINE_string("plot", None, "Write the plot (PNG) here; needs matplotlib.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the index files go (default: a tmp dir).")
  _SMALL = flags.DEFINE_bool("small", False, "Quick check: D = 64, N up to 1e4, Q in {1, 16}.")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
  _SCALE_OUT = flags.DEFINE_bool("scale_out", False, "Time search over devices and processes.")
  _DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Simulated CPU device counts.")
  _PROCESSES = flags.DEFINE_list("processes", ["1", "2", "4"], "Localhost process counts.")
  _SCALE_N = flags.DEFINE_integer("scale_n", 1_000_000, "Index rows of --scale_out.")
  _SCALE_Q = flags.DEFINE_integer("scale_q", 64, "Queries per batch of --scale_out.")
  _CHILD = flags.DEFINE_enum("child", None, ["devices", "process"], "Internal: a child's role.")
  _CHILD_INDEX = flags.DEFINE_string("child_index", None, "Internal: the child's index.")
  _CHILD_PORT = flags.DEFINE_integer("child_port", None, "Internal: coordinator port.")
  _CHILD_NPROC = flags.DEFINE_integer("child_nproc", None, "Internal: processes.")
  _CHILD_PID = flags.DEFINE_integer("child_pid", None, "Internal: process id.")
  app.run(main)
