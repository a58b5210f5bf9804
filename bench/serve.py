r"""Latency and throughput of `engine.serve` against the same queries through `engine.query`.

  python -m bench.serve [--rows=100000] [--config=tiny] [--queries=200] [--clients=1,4,16]
      [--cli_runs=3] [--output=results/serve.json]

Builds an int8 index of --rows random unit vectors written straight through the store's API with
the metadata of the extractor the queries use (so `engine.serve` and `engine.query` rebuild that
extractor from the index, as for a real one; the vectors are not descriptors of images, which
changes nothing in the work per query). The query is one 1024x768 JPEG of a generated scene.

Measures, on the server (a subprocess on loopback, asked over HTTP):
  - latency of one query at a time: p50 / p99 of --queries uploads (POST /search, k=10);
  - throughput with each of --clients concurrent clients, each sending --queries / clients (at
    least 8) uploads back to back.
And the same query through `engine.query` (a process per query: start, load, compile, search):
median wall time of --cli_runs runs, and throughput with 1 and 4 such processes at once.
--config=tiny (the default) uses the tiny test network (fast on a shared CPU); --config=vgg16
the full VGG-16 (random weights: same compute as ImageNet weights).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import jax
import numpy as np
from absl import app, flags

from bench.machine import cpu_flags, cpu_model
from engine import store
from engine.app import extraction, sample
from engine.common.fileio import atomic_write_json

_ROWS = flags.DEFINE_integer("rows", 100_000, "Rows of the index.")
_CONFIG = flags.DEFINE_enum("config", "tiny", ["tiny", "vgg16"], "Network of the queries.")
_QUERIES = flags.DEFINE_integer("queries", 200, "Queries per server measurement.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent clients to measure.")
_CLI_RUNS = flags.DEFINE_integer("cli_runs", 3, "engine.query runs (each a process).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "The server's batch size.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_index(path: str, rows: int, config: str) -> None:
  settings = extraction.Settings(weights="random:5", config=config, backend="xla")
  meta = extraction.build("gem", settings).index_metadata()
  dim = meta["extractor"]["dim"]
  rng = np.random.default_rng(0)
  with store.Index.create(path, dim=dim, dtype="int8", metadata=meta) as idx:
    step = 25_000
    for start in range(0, rows, step):
      n = min(step, rows - start)
      x = rng.standard_normal((n, dim)).astype(np.float32)
      x /= np.linalg.norm(x, axis=1, keepdims=True)
      idx.add(x, [f"/photos/{i:07d}.jpg" for i in range(start, start + n)])


def env() -> dict:
  return {**os.environ, "PYTHONPATH": ROOT}


class Server:
  def __init__(self, index: str):
    self.proc = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "engine.serve",
        f"--index={index}",
        "--port=0",
        f"--batch_size={_BATCH.value}",
        "--max_pending=256",
      ],
      cwd=ROOT,
      stderr=subprocess.PIPE,
      text=True,
      env=env(),
    )
    t0 = time.monotonic()
    for line in self.proc.stderr:
      m = re.search(r" on (http://\S+/)$", line.strip())
      if m:
        self.url = m.group(1).rstrip("/")
        break
    else:
      raise RuntimeError("engine.serve did not start")
    self.start_s = time.monotonic() - t0
    threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

  def search(self, jpeg: bytes) -> float:
    req = urllib.request.Request(
      self.url + "/search?k=10", jpeg, {"Content-Type": "image/jpeg"}, method="POST"
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
      out = json.loads(resp.read())
    dt = time.perf_counter() - t0
    assert len(out["matches"]) == 10, out
    return dt

  def stats(self) -> dict:
    with urllib.request.urlopen(self.url + "/stats", timeout=60) as resp:
      return json.loads(resp.read())

  def stop(self):
    self.proc.terminate()
    self.proc.wait(60)


def throughput(fn, clients: int, per_client: int) -> float:
  """Completed calls per second with `clients` threads each calling `fn` `per_client` times."""
  barrier = threading.Barrier(clients + 1)

  def worker():
    barrier.wait()
    for _ in range(per_client):
      fn()

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    futures = [pool.submit(worker) for _ in range(clients)]
    barrier.wait()
    t0 = time.perf_counter()
    for f in futures:
      f.result()
    return clients * per_client / (time.perf_counter() - t0)


def cli_query(index: str, query: str) -> float:
  t0 = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, "-m", "engine.query", f"--index={index}", f"--query={query}", "--k=10"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=env(),
    timeout=1800,
  )
  if proc.returncode:
    raise RuntimeError(proc.stderr)
  return time.perf_counter() - t0


def main(argv):
  del argv
  print(f"CPU: {cpu_model()} ({os.cpu_count()} cores; {cpu_flags()})")
  print(f"jax {jax.__version__}, python {platform.python_version()}, network {_CONFIG.value}")
  out = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "config": _CONFIG.value, "rows": _ROWS.value}
  with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
    index = os.path.join(tmp, "idx")
    t0 = time.monotonic()
    build_index(index, _ROWS.value, _CONFIG.value)
    print(f"index: {_ROWS.value} rows of random unit vectors ({time.monotonic() - t0:.1f} s)")
    buf = io.BytesIO()
    sample.scene(np.random.default_rng(1), 1024, 768).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    query = os.path.join(tmp, "query.jpg")
    with open(query, "wb") as f:
      f.write(jpeg)

    srv = Server(index)
    try:
      print(f"server: ready in {srv.start_s:.1f} s (load, compile, map)")
      for _ in range(5):
        srv.search(jpeg)
      lat = np.array([srv.search(jpeg) for _ in range(_QUERIES.value)]) * 1e3
      out["server_latency_ms"] = {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "n": len(lat),
      }
      print(
        f"server, one query at a time: p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms over {len(lat)} queries"
      )
      out["server_qps"] = {}
      for c in (int(c) for c in _CLIENTS.value):
        before = srv.stats()
        qps = throughput(lambda: srv.search(jpeg), c, max(8, _QUERIES.value // c))
        after = srv.stats()
        batches = after["batches"] - before["batches"]
        mean_batch = c * max(8, _QUERIES.value // c) / batches if batches else float("nan")
        out["server_qps"][c] = {"qps": qps, "mean_batch": mean_batch}
        print(f"server, {c:2d} clients: {qps:7.1f} queries/s (mean batch {mean_batch:.2f})")
    finally:
      srv.stop()

    runs = [cli_query(index, query) for _ in range(_CLI_RUNS.value)]
    med = statistics.median(runs)
    out["cli_s"] = {"median": med, "runs": runs}
    print(f"engine.query, one process per query: median {med:.2f} s over {len(runs)} runs")
    out["cli_qps"] = {1: 1 / med}
    qps4 = throughput(lambda: cli_query(index, query), 4, 1)
    out["cli_qps"][4] = qps4
    print(f"engine.query, 4 processes at once: {qps4:.3f} queries/s")
    lat50 = out["server_latency_ms"]["p50"] / 1e3
    print(
      f"ratio: one query {med / lat50:.0f}x faster through the server; throughput "
      f"{out['server_qps'][max(out['server_qps'])]['qps'] / qps4:.0f}x (server's best "
      "vs 4 engine.query processes)"
    )
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    atomic_write_json(_OUTPUT.value, out)


if __name__ == "__main__":
  app.run(main)
