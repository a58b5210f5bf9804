"""Brute-force top-k: this project against numpy and FAISS on the same clustered data.

For every storage dtype (float32, float16, bfloat16, int8) and Q in {1, 100}: queries/s, effective
GB/s (bytes of the stored matrix scanned per second) and recall@10 against an exact float64-checked
float32 search, in RAM (host arrays streamed through the kernel) and from a memory-mapped index
(`engine.store.Index`, warm page cache). Medians of several timed runs after a warm-up; compile time
(first call minus the median) reported separately. Floors: bytes / the read bandwidth measured at
start (`read_gbps`) and FLOPs / measured peak (matrix units). Prints a table last and writes JSON
with --output.

  python -m bench.search --n 1000000 --output /tmp/topk_lib.json
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags

from bench.machine import cpu_line
from engine.common.fileio import atomic_write_json
from engine.features.descriptors import Whitening
from engine.kernels import native, streaming
from engine.store import Index, quantize_int8

_N = flags.DEFINE_integer("n", 1_000_000, "Rows in the index.")
_D = flags.DEFINE_integer("d", 512, "Dimension.")
_K = flags.DEFINE_integer("k", 10, "Results per query.")
_Q = flags.DEFINE_integer("q", 100, "Batch size of the batched measurement.")
_CLUSTERS = flags.DEFINE_integer("clusters", 10000, "Clusters of the synthetic data.")
_SPREAD = flags.DEFINE_float("spread", 0.35, "Within-cluster noise relative to the centers.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "float16", "bfloat16", "int8"], "Storage dtypes.")
_RERANK = flags.DEFINE_integer("rerank", 40, "Candidates re-scored from float32 (int8 row).")
_MEM_BW = flags.DEFINE_float(
  "mem_gbps", 0.0, "Memory read bandwidth for the floor, GB/s; 0: measured at start (read_gbps)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the index files (default: tmp).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
_SKIP_MMAP = flags.DEFINE_bool("skip_mmap", False, "Skip the memory-mapped index runs.")
_WHITEN = flags.DEFINE_integer(
  "whiten",
  0,
  "With --features: learn PCA whitening to this many dims on the index rows "
  "(engine.Whitening, as a retrieval pipeline would) and apply it to rows and queries; 0: none.",
)
_FEATURES = flags.DEFINE_string(
  "features",
  None,
  "Real descriptors instead of synthetic data: a float32 [N, D] .npy (engine.extract's "
  "features.npy); --q random rows are held out as queries, the others form the index (--n, --d "
  "ignored).",
)


def clustered(rng: np.random.Generator, n: int, d: int, clusters: int, spread: float) -> np.ndarray:
  """[n, d] float32 unit vectors around `clusters` random centers (written in blocks: big n)."""
  centers = rng.standard_normal((clusters, d)).astype(np.float32)
  x = np.empty((n, d), np.float32)
  for a in range(0, n, 65536):
    b = min(n, a + 65536)
    v = centers[rng.integers(0, clusters, b - a)] + spread * rng.standard_normal(
      (b - a, d), np.float32
    )
    x[a:b] = v / np.linalg.norm(v, axis=1, keepdims=True)
  return x


def timed(fn, repeats: int) -> tuple[float, float]:
  """(median seconds after a warm-up, first-call seconds)."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)), first


def numpy_topk(q: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
  s = q @ x.T
  part = np.argpartition(-s, k, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
  return np.take_along_axis(part, order, 1)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
  return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact, strict=True)]))


def peak_gflops() -> dict:
  """Measured matrix-product peaks (GFLOP/s) for the FLOP floors."""
  rng = np.random.default_rng(0)
  out = {}
  a = rng.standard_normal((2048, 2048), np.float32)
  t, _ = timed(lambda: a @ a, 3)
  out["numpy_f32"] = 2 * 2048**3 / t / 1e9
  a8 = jnp.asarray(rng.integers(-127, 128, (128, 512), np.int8))
  b8 = jnp.asarray(rng.integers(-127, 128, (65536, 512), np.int8))
  f = jax.jit(
    lambda a, b: jax.lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
    )
  )
  t, _ = timed(lambda: f(a8, b8), 3)
  out["jax_int8"] = 2 * 128 * 512 * 65536 / t / 1e9
  bb = b8.astype(jnp.bfloat16)
  ab = a8.astype(jnp.bfloat16)
  g = jax.jit(
    lambda a, b: jax.lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
  )
  t, _ = timed(lambda: g(ab, bb), 3)
  out["jax_bf16"] = 2 * 128 * 512 * 65536 / t / 1e9
  if native.available():  # the instruction ceiling of the native int8 path, all cores at once
    path = native.pick_path("int8", 1, native.paths("int8"))  # the peak's path (never AMX)
    out[f"native_int8_{path}"] = native.int8_peak_gops(len(os.sched_getaffinity(0)))
  return out


def read_gbps(nbytes: int = 1 << 30) -> float:
  """Measured read bandwidth: an OR-reduce over `nbytes` in RAM, split over all cores (numpy
  releases the GIL; the reduce is cheaper per byte than memory)."""
  from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

  threads = len(os.sched_getaffinity(0))
  parts = np.array_split(np.ones(nbytes // 8, np.uint64), threads)
  with ThreadPoolExecutor(threads) as pool:
    t, _ = timed(lambda: list(pool.map(np.bitwise_or.reduce, parts)), 5)
  return nbytes / t / 1e9


def storage(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
  if dtype == "int8":
    return quantize_int8(x)
  if dtype == "bfloat16":
    return x.astype(ml_dtypes.bfloat16), None
  return x.astype(dtype), None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  n, d, k, nq = _N.value, _D.value, _K.value, _Q.value
  reps = _REPEATS.value
  print(cpu_line(), flush=True)
  print(native.status(), flush=True)
  rng = np.random.default_rng(0)
  t = time.perf_counter()
  if _FEATURES.value:
    feats = np.load(_FEATURES.value, allow_pickle=False).astype(np.float32)
    if feats.ndim != 2 or len(feats) <= nq:
      raise app.UsageError(f"{_FEATURES.value}: need [N > {nq}, D] features, got {feats.shape}")
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    held_out = rng.permutation(len(feats))
    x, q = feats[held_out[nq:]], feats[held_out[:nq]]
    if _WHITEN.value:
      white = Whitening.learn(x, _WHITEN.value)
      x, q = white(x), white(q)
    n, d = x.shape
    print(
      f"data: {n} x {d} features from {_FEATURES.value}, {nq} held-out queries, "
      f"whitening {_WHITEN.value or 'none'}",
      flush=True,
    )
  else:
    x = clustered(rng, n, d, _CLUSTERS.value, _SPREAD.value)
    noise = 0.15 * rng.standard_normal((nq, d), np.float32)
    q = x[rng.choice(n, nq, replace=False)] + noise
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    print(f"data: {n} x {d} clustered, {time.perf_counter() - t:.1f} s", flush=True)
  exact = numpy_topk(q, x, k)
  peaks = peak_gflops()
  print("peaks GFLOP/s:", {a: round(b) for a, b in peaks.items()}, flush=True)
  mem_bw = _MEM_BW.value or read_gbps()
  print(f"read bandwidth: {mem_bw:.1f} GB/s", flush=True)
  rows = []

  # The int8 rows of this project run the native kernel where it is in use: its floor is the
  # instruction ceiling of its path (VNNI or AVX2); the other int8 rows are held to XLA's int8 product.
  int8_peak = next((v for a, v in peaks.items() if a.startswith("native_int8")), peaks["jax_int8"])

  def record(impl, dtype, mode, qn, sec, first, bytes_scanned, found, peak=None):
    flops = 2.0 * qn * n * d
    if peak is None:
      peak = peaks["jax_int8"] if dtype == "int8" else peaks["numpy_f32"]
    floor = max(bytes_scanned / (mem_bw * 1e9), flops / (peak * 1e9))
    row = {
      "impl": impl,
      "dtype": dtype,
      "mode": mode,
      "Q": qn,
      "qps": qn / sec,
      "ms_per_batch": sec * 1e3,
      "GBps": bytes_scanned / sec / 1e9,
      "recall@10": recall(found, exact[:qn]),
      "compile_s": max(0.0, first - sec),
      "floor_ms": floor * 1e3,
      "floor_qps": qn / floor,
    }
    rows.append(row)
    print(
      f"{impl:22s} {dtype:9s} {mode:5s} Q={qn:<4d} {row['qps']:9.1f} q/s "
      f"{row['GBps']:6.1f} GB/s recall {row['recall@10']:.3f} (floor {row['floor_qps']:.1f} q/s)",
      flush=True,
    )

  # Peers on the same data: numpy float32, FAISS.
  for qn in (1, nq):
    qs = [q[i : i + qn] for i in range(0, reps + 1)] if qn == 1 else [q]
    it = iter(range(10**9))

    def np_call(qs=qs, it=it):
      return numpy_topk(qs[next(it) % len(qs)], x, k)

    sec, first = timed(np_call, reps)
    record(
      "numpy matmul+argpart", "float32", "ram", qn, sec, first, x.nbytes, numpy_topk(q[:qn], x, k)
    )
  try:
    import faiss  # noqa: PLC0415

    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(x[: min(n, 100000)])
    sq.add(x)
    for name, fi, nbytes in (("faiss IndexFlatIP", flat, x.nbytes), ("faiss SQ8", sq, n * d)):
      for qn in (1, nq):
        sec, first = timed(lambda fi=fi, qn=qn: fi.search(q[:qn], k), reps)
        found = fi.search(q[:qn], k)[1]
        record(name, "float32" if fi is flat else "int8", "ram", qn, sec, first, nbytes, found)
    del flat, sq
  except ImportError:
    print("faiss not installed: skipping its rows")

  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bench-search-")
  for dtype in _DTYPES.value:
    m, scales = storage(x, dtype)
    own_peak = int8_peak if dtype == "int8" else None
    m = streaming.host_aligned(m)  # so the in-RAM kernel calls alias it instead of copying
    nbytes = m.nbytes + (0 if scales is None else scales.nbytes)
    for qn in (1, nq):
      qi = iter(range(10**9))

      # This project's default (the native kernel where in use), and for int8 the same search
      # on XLA's int8 product.
      runs = [("jax engine", None, own_peak)]
      if dtype == "int8":
        runs.append(("jax engine, XLA int8", "int8-xla", None))
      for impl, method, peak in runs:

        def call(qn=qn, qi=qi, m=m, scales=scales, method=method):
          i = next(qi) % (reps + 1) if qn == 1 else 0
          return streaming.chunked_topk(q[i : i + qn], m, k, scales=scales, method=method)

        sec, first = timed(call, reps)
        found = np.asarray(streaming.chunked_topk(q[:qn], m, k, scales=scales, method=method)[1])
        record(impl, dtype, "ram", qn, sec, first, nbytes, found, peak)
    if _SKIP_MMAP.value:
      continue
    path = os.path.join(workdir, dtype)
    keep = dtype == "int8" and _RERANK.value > 0
    t = time.perf_counter()
    with Index.create(path, dim=d, dtype=dtype, keep_float32=keep) as idx:
      for a in range(0, n, 1 << 20):
        idx.add(x[a : a + (1 << 20)], [str(i) for i in range(a, min(n, a + (1 << 20)))])
    print(f"built {dtype} index in {time.perf_counter() - t:.1f} s", flush=True)
    del m, scales
    with Index.open(path, readonly=True) as idx:
      for qn in (1, nq):
        qi = iter(range(10**9))

        def icall(qn=qn, qi=qi, idx=idx):
          i = next(qi) % (reps + 1) if qn == 1 else 0
          return idx.search(q[i : i + qn], k=k)

        sec, first = timed(icall, reps)
        found = idx.search(q[:qn], k=k)[1].astype(np.int64)
        record("jax engine Index", dtype, "mmap", qn, sec, first, nbytes, found, own_peak)
        if keep:

          def rcall(qn=qn, qi=qi, idx=idx):
            i = next(qi) % (reps + 1) if qn == 1 else 0
            return idx.search(q[i : i + qn], k=k, rerank=_RERANK.value)

          sec, first = timed(rcall, reps)
          found = idx.search(q[:qn], k=k, rerank=_RERANK.value)[1].astype(np.int64)
          name = f"Index rerank={_RERANK.value}"
          record(name, dtype, "mmap", qn, sec, first, nbytes, found, own_peak)
    if not _WORKDIR.value:
      shutil.rmtree(path, ignore_errors=True)

  numpy_qps = {r["Q"]: r["qps"] for r in rows if r["impl"].startswith("numpy")}
  head = (
    f"{'implementation':22s} {'dtype':9s} {'mode':5s} {'Q':>4s} {'q/s':>9s} {'x numpy':>8s} "
    f"{'GB/s':>6s} {'recall':>6s} {'floor q/s':>9s} {'compile s':>9s}"
  )
  load = os.getloadavg()
  print(
    f"\nN={n} D={d} k={k}, medians of {reps} runs, {jax.devices()[0].device_kind}, "
    f"load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (other users of the machine)"
  )
  print(cpu_line())
  print(native.status())
  print(
    f"floors: bytes / {mem_bw:.1f} GB/s (read bandwidth); FLOPs / peak {json.dumps({a: round(b) for a, b in peaks.items()})} GFLOP/s"
  )
  print(head)
  print("-" * len(head))
  for r in rows:
    print(
      f"{r['impl']:22s} {r['dtype']:9s} {r['mode']:5s} {r['Q']:4d} {r['qps']:9.1f} "
      f"{r['qps'] / numpy_qps[r['Q']]:8.2f} {r['GBps']:6.1f} {r['recall@10']:6.3f} "
      f"{r['floor_qps']:9.1f} {r['compile_s']:9.2f}"
    )
  if _OUTPUT.value:
    atomic_write_json(
      _OUTPUT.value,
      {
        "n": n,
        "d": d,
        "k": k,
        "cpu": cpu_line(),
        "native": native.status(),
        "peaks_gflops": peaks,
        "read_gbps": mem_bw,
        "loadavg": load,
        "rows": rows,
      },
    )


if __name__ == "__main__":
  app.run(main)
