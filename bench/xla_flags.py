r"""Which XLA CPU flags the binaries should set: extraction and search under candidate XLA_FLAGS.

  python -m bench.xla_flags [--rounds=3] [--config=vgg16] [--output=results/xla_flags.json]

Each candidate runs in a fresh process (XLA reads its flags once, when the CPU client starts), in
interleaved rounds so a noisy machine hits every candidate alike. A round measures, in images/s
and queries/s: VGG-16 to fc2 at 224 on the XLA backend (batch --batch_size, the median of --runs
batches after a compile) and the float32 jitted `topk` (XLA's product; N=--n, D=512, Q=1 and
Q=100). The table gives each candidate's median over rounds and its ratio to the default flags.
The winning line goes into `engine.cli.DEFAULT_XLA_FLAGS`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from bench.machine import cpu_line

CANDIDATES = {
  "default": "",
  "ynn fusion off": "--xla_cpu_experimental_ynn_fusion_type=",
  "ynn fusion off + onednn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true",
  "xnnpack": "--xla_cpu_use_xnnpack=true",
}

_WORKER = r"""
import json, os, statistics, sys, time
import numpy as np
import jax
from engine.features import forward, checkpoint
from engine.features.descriptors import Descriptor
from engine.features.model import ModelConfig
from engine.kernels import topk as topk_lib
from flax import nnx
cfg, batch, runs, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = ModelConfig.by_name(cfg)
model, _ = checkpoint.cached_random(config, 0)
graphdef, state = nnx.split(model)
px = np.random.default_rng(0).integers(0, 256, (batch, config.image_size, config.image_size, 3), np.uint8)
run = lambda: jax.block_until_ready(forward.forward(graphdef, state, px, convention="torch", descriptor=Descriptor("fc2")))
run()
times = []
for _ in range(runs):
  t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
out = {"extract_images_per_s": batch / statistics.median(times)}
rng = np.random.default_rng(1)
m = jax.device_put(rng.standard_normal((n, 512), np.float32))  # once, not per call
for q in (1, 100):
  qs = jax.device_put(rng.standard_normal((q, 512), np.float32))
  f = lambda: jax.block_until_ready(topk_lib.topk(qs, m, k=10))
  f()
  times = []
  for _ in range(5):
    t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
  out[f"topk_f32_q{q}_per_s"] = q / statistics.median(times)
print("RESULT " + json.dumps(out))
"""


def _run(xla_flags: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=os.getcwd())
  args = [str(_CONFIG.value), str(_BATCH.value), str(_RUNS.value), str(_N.value)]
  proc = subprocess.run(
    [sys.executable, "-c", _WORKER, *args], env=env, capture_output=True, text=True, check=False
  )
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  raise RuntimeError(f"XLA_FLAGS={xla_flags!r} failed:\n{proc.stderr[-2000:]}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(cpu_line(), flush=True)
  names = [n for n in CANDIDATES if n in _ONLY.value] if _ONLY.value else list(CANDIDATES)
  results: dict[str, list[dict]] = {n: [] for n in names}
  for r in range(_ROUNDS.value):
    for name in names:
      results[name].append(_run(CANDIDATES[name]))
      print(f"round {r + 1} {name:26s} {results[name][-1]}", flush=True)
  metrics = list(results[names[0]][0])
  med = {n: {m: statistics.median(x[m] for x in results[n]) for m in metrics} for n in names}
  base = med.get("default")
  print(f"\n{'XLA_FLAGS':48s} " + " ".join(f"{m:>22s}" for m in metrics))
  for n in names:
    cells = [
      f"{med[n][m]:10.2f} ({med[n][m] / base[m]:4.2f}x)" if base else f"{med[n][m]:10.2f}"
      for m in metrics
    ]
    print(f"{CANDIDATES[n] or '(none)':48s} " + " ".join(f"{c:>22s}" for c in cells))
  if _OUTPUT.value:
    from engine.common.fileio import atomic_write_json

    atomic_write_json(
      _OUTPUT.value,
      {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_line(),
        "candidates": {n: CANDIDATES[n] for n in names},
        "rounds": results,
        "medians": med,
      },
    )


if __name__ == "__main__":
  _ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (each candidate once per round).")
  _RUNS = flags.DEFINE_integer("runs", 3, "Timed extraction batches per process (median).")
  _BATCH = flags.DEFINE_integer("batch_size", 8, "Extraction batch.")
  _N = flags.DEFINE_integer("n", 262_144, "Rows of the float32 top-k.")
  _CONFIG = flags.DEFINE_enum("config", "vgg16", ["vgg16", "tiny"], "Model preset.")
  _ONLY = flags.DEFINE_list("only", [], "Candidates to run (names of CANDIDATES); default all.")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
  app.run(main)
