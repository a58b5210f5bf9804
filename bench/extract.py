r"""VGG-16 to fc2 at 224x224: this project's jitted Flax model against PyTorch and ONNX Runtime.

  python -m bench.extract [--batch_sizes=8,32] [--runs=5] [--output=results/extract.json]

Every figure is the median of --runs timed batches after a warm-up; compilation (or export) time is
reported separately. Peers run in the same process on the same weights-shaped network. The floor is
30.9 GFLOP per image over the machine's measured peak (see --peak_fp32_gflops / --peak_bf16_gflops).
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

from engine.features.model import PRESETS

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8"], "Batch sizes to measure.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per configuration (median reported).")
_PEERS = flags.DEFINE_list("peers", ["torch", "onnxruntime"], "Peers to measure if installed.")
_PRECISIONS = flags.DEFINE_list("precisions", ["fp32", "bf16"], "Precisions of this project.")
_OUTPUT = flags.DEFINE_string("output", None, "Write results as JSON here.")
_PEAK_FP32 = flags.DEFINE_float("peak_fp32_gflops", 355.0, "Measured fp32 matmul peak.")
_PEAK_BF16 = flags.DEFINE_float("peak_bf16_gflops", 2700.0, "Measured bf16 (AMX) matmul peak.")
_CONFIG = flags.DEFINE_enum("config", "vgg16", list(PRESETS), "Model preset.")

GFLOP_PER_IMAGE = 30.9  # VGG-16 to fc2 at 224: 15.5 GMAC


def _median_time(fn, runs):
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_project(batch, precision, runs, config):
  import jax
  import numpy as np

  from engine.features.extractor import Extractor

  ex = Extractor("random", "fc2", batch_size=batch, precision=precision, config=config)
  size = ex.config.image_size
  px = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  t = time.perf_counter()
  jax.block_until_ready(ex.run_batch(px))
  compile_s = time.perf_counter() - t
  jax.block_until_ready(ex.run_batch(px))
  sec = _median_time(lambda: jax.block_until_ready(ex.run_batch(px)), runs)
  return {"compile_s": compile_s, "batch_s": sec}


def bench_torch(batch, precision, runs):
  import torch

  from bench.peers import torch_vgg16_to_fc2

  model = torch_vgg16_to_fc2()
  x = torch.rand(batch, 3, 224, 224)
  model = model.to(memory_format=torch.channels_last)
  x = x.to(memory_format=torch.channels_last)
  if precision == "bf16":
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
  with torch.inference_mode():
    t = time.perf_counter()
    model(x)
    first = time.perf_counter() - t
    model(x)
    sec = _median_time(lambda: model(x), runs)
  return {"compile_s": first, "batch_s": sec}


def bench_onnxruntime(batch, runs, tmpdir):
  import numpy as np
  import onnxruntime as ort
  import torch

  from bench.peers import torch_vgg16_to_fc2

  model = torch_vgg16_to_fc2()
  path = os.path.join(tmpdir, f"vgg16_b{batch}.onnx")
  t = time.perf_counter()
  torch.onnx.export(model, torch.rand(batch, 3, 224, 224), path, input_names=["x"], dynamo=False)
  sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  export_s = time.perf_counter() - t
  x = np.random.rand(batch, 3, 224, 224).astype(np.float32)
  sess.run(None, {"x": x})
  sec = _median_time(lambda: sess.run(None, {"x": x}), runs)
  return {"compile_s": export_s, "batch_s": sec}


def main(argv):
  del argv
  import tempfile

  rows = []
  peers_ok = {}
  for name in _PEERS.value:
    try:
      __import__(name)
      peers_ok[name] = True
    except ImportError:
      print(f"peer {name} not installed: skipped")
  with tempfile.TemporaryDirectory() as tmpdir:
    for b in map(int, _BATCH_SIZES.value):
      for p in _PRECISIONS.value:
        rows.append(
          {
            "impl": "this project (Flax, XLA)",
            "precision": p,
            "batch": b,
            **bench_project(b, p, _RUNS.value, _CONFIG.value),
          }
        )
      if peers_ok.get("torch"):
        for p in ("fp32", "bf16"):
          rows.append(
            {
              "impl": "PyTorch channels-last",
              "precision": p,
              "batch": b,
              **bench_torch(b, p, _RUNS.value),
            }
          )
      if peers_ok.get("onnxruntime") and peers_ok.get("torch"):
        rows.append(
          {
            "impl": "ONNX Runtime",
            "precision": "fp32",
            "batch": b,
            **bench_onnxruntime(b, _RUNS.value, tmpdir),
          }
        )
  for r in rows:
    r["images_per_s"] = r["batch"] / r["batch_s"]
    r["gflops"] = r["images_per_s"] * GFLOP_PER_IMAGE
    peak = _PEAK_BF16.value if r["precision"] == "bf16" else _PEAK_FP32.value
    r["fraction_of_peak"] = r["gflops"] / peak
  ref = {
    (r["batch"]): r["images_per_s"]
    for r in rows
    if r["impl"] == "PyTorch channels-last" and r["precision"] == "fp32"
  }
  for r in rows:
    r["vs_torch_fp32"] = r["images_per_s"] / ref[r["batch"]] if r["batch"] in ref else None
  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "cpus": os.cpu_count(),
    "floor_ms_per_image": {
      "fp32": GFLOP_PER_IMAGE / _PEAK_FP32.value * 1e3,
      "bf16": GFLOP_PER_IMAGE / _PEAK_BF16.value * 1e3,
    },
  }
  if _OUTPUT.value:
    from engine.common.fileio import atomic_write_json

    atomic_write_json(_OUTPUT.value, {"meta": meta, "rows": rows})
  print(
    f"floor: {meta['floor_ms_per_image']['fp32']:.0f} ms/image fp32, "
    f"{meta['floor_ms_per_image']['bf16']:.1f} ms/image bf16; XLA_FLAGS={meta['xla_flags']!r}"
  )
  print(
    f"{'implementation':28s} {'prec':5s} {'batch':>5s} {'img/s':>7s} {'GFLOP/s':>8s} "
    f"{'of peak':>7s} {'vs torch fp32':>13s} {'compile s':>9s}"
  )
  for r in rows:
    vs = f"{r['vs_torch_fp32']:.2f}x" if r["vs_torch_fp32"] else "-"
    print(
      f"{r['impl']:28s} {r['precision']:5s} {r['batch']:5d} {r['images_per_s']:7.2f} "
      f"{r['gflops']:8.0f} {r['fraction_of_peak']:7.1%} {vs:>13s} {r['compile_s']:9.2f}"
    )


if __name__ == "__main__":
  app.run(main)
