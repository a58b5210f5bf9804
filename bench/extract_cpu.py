r"""The CPU fast path: this project's model through OpenVINO against the best CPU peers.

  python -m bench.extract_cpu [--batch_sizes=8,32] [--runs=7] [--output=results/extract_cpu.json]

VGG-16 to fc2 at 224x224, images/s. Rows:
- this project, OpenVINO fp32 / bf16: the Flax model exported by `engine.features.onnx_export`
  (uint8 pixels in, normalised fc2 out), compiled by `engine.features.backends` (OpenVINO CPU
  plugin, INFERENCE_PRECISION_HINT);
- native OpenVINO fp32 / bf16: a plain PyTorch VGG-16 (torchvision's layout) exported to ONNX by
  `torch.onnx.export` and compiled the same way; float32 NCHW in, fc2 out (no preprocessing, no
  normalisation);
- PyTorch bf16 channels-last with bf16 weights (and fp32 channels-last);
- this project, XLA fp32: the jitted Flax model (`engine.features.forward`, through
  `Extractor.run_batch`).

All implementations are built and warmed up first, then timed round-robin (one batch each per
round, --runs rounds), so load from other processes on the machine hits all of them alike; the
table reports medians. The floor is 30.9 GFLOP per image over the measured bf16 ceiling.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags

from bench.peers import native_openvino_fc2, torch_vgg16_to_fc2
from bench.timing import interleaved_times
from engine.common.fileio import atomic_write_json

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8"], "Batch sizes to measure.")
_RUNS = flags.DEFINE_integer("runs", 7, "Timed rounds (median reported).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per implementation.", lower_bound=1)
_SKIP = flags.DEFINE_list("skip", [], "Rows to leave out (keys: see ROWS).")
_OUTPUT = flags.DEFINE_string("output", None, "Write results as JSON here.")
_PEAK_BF16 = flags.DEFINE_float("peak_bf16_gflops", 2700.0, "Measured bf16 (AMX) matmul peak.")
_PEAK_FP32 = flags.DEFINE_float("peak_fp32_gflops", 355.0, "Measured fp32 matmul peak.")

GFLOP_PER_IMAGE = 30.9  # VGG-16 to fc2 at 224: 15.5 GMAC
ROWS = {
  "ours_ov_fp32": ("this project, OpenVINO", "fp32"),
  "ours_ov_bf16": ("this project, OpenVINO", "bf16"),
  "native_ov_fp32": ("native OpenVINO (torch->ONNX)", "fp32"),
  "native_ov_bf16": ("native OpenVINO (torch->ONNX)", "bf16"),
  "torch_fp32": ("PyTorch channels-last", "fp32"),
  "torch_bf16": ("PyTorch channels-last", "bf16"),
  "ours_xla_fp32": ("this project, XLA", "fp32"),
}


def build_ours_openvino(batch, precision, cache_dir):
  import numpy as np

  from engine.features import backends
  from engine.features.extractor import Extractor

  ex = Extractor("random", "fc2", batch_size=batch)
  px = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
  run = backends.make_runner(ex, px.shape, precision=precision, cache_dir=cache_dir)
  return lambda: run(px)


def build_torch(batch, precision):
  import torch

  model = torch_vgg16_to_fc2().to(memory_format=torch.channels_last)
  x = torch.rand(batch, 3, 224, 224).to(memory_format=torch.channels_last)
  if precision == "bf16":
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)  # weights cast once

  def run():
    with torch.inference_mode():
      return model(x)

  return run


def build_xla(batch):
  import jax
  import numpy as np

  from engine.features.extractor import Extractor

  ex = Extractor("random", "fc2", batch_size=batch)
  px = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
  return lambda: jax.block_until_ready(ex.run_batch(px))


def build(key, batch, tmpdir):
  if key.startswith("ours_ov_"):
    return build_ours_openvino(batch, key[-4:], os.path.join(tmpdir, "exported"))
  if key.startswith("native_ov_"):
    return native_openvino_fc2(batch, key[-4:], tmpdir)
  if key.startswith("torch_"):
    return build_torch(batch, key[-4:])
  return build_xla(batch)


def measure(batch, tmpdir, runs, warmup, skip):
  fns, rows = {}, {}
  for key, (impl, precision) in ROWS.items():
    if key in skip:
      continue
    t = time.perf_counter()
    try:
      fn = build(key, batch, tmpdir)
      fn()
    except ImportError as e:
      print(f"{key}: skipped ({e})")
      continue
    rows[key] = {"key": key, "impl": impl, "precision": precision, "batch": batch}
    rows[key]["build_s"] = time.perf_counter() - t
    for _ in range(warmup - 1):
      fn()
    fns[key] = fn
  times = interleaved_times(fns, runs)
  for key, row in rows.items():
    row["batch_s"] = statistics.median(times[key])
    row["batch_s_all"] = times[key]
    row["images_per_s"] = batch / row["batch_s"]
  return list(rows.values())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = set(_SKIP.value) - set(ROWS)
  if unknown:
    raise app.UsageError(f"unknown --skip keys {sorted(unknown)}; known: {sorted(ROWS)}")
  rows = []
  with tempfile.TemporaryDirectory() as tmpdir:
    for b in map(int, _BATCH_SIZES.value):
      rows += measure(b, tmpdir, _RUNS.value, _WARMUP.value, set(_SKIP.value))
  by = {(r["batch"], r["key"]): r["images_per_s"] for r in rows}
  for r in rows:
    r["gflops"] = r["images_per_s"] * GFLOP_PER_IMAGE
    r["of_bf16_ceiling"] = r["gflops"] / _PEAK_BF16.value
    native = by.get((r["batch"], f"native_ov_{r['precision']}"))
    r["vs_native_ov"] = r["images_per_s"] / native if native else None
    torch_bf16 = by.get((r["batch"], "torch_bf16"))
    r["vs_torch_bf16"] = r["images_per_s"] / torch_bf16 if torch_bf16 else None
  import jax
  import torch

  from engine.features.backends import import_openvino

  openvino = import_openvino()

  meta = {
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "cpus": os.cpu_count(),
    "loadavg_at_end": os.getloadavg(),
    "runs": _RUNS.value,
    "versions": {
      "jax": jax.__version__,
      "openvino": openvino.__version__,
      "torch": torch.__version__,
    },
    "floor_ms_per_image_bf16": GFLOP_PER_IMAGE / _PEAK_BF16.value * 1e3,
    "targets": "ours OpenVINO bf16 >= 1.0x native OpenVINO bf16 and >= 2x PyTorch bf16",
  }
  if _OUTPUT.value:
    atomic_write_json(_OUTPUT.value, {"meta": meta, "rows": rows})
  print(
    f"floor {meta['floor_ms_per_image_bf16']:.1f} ms/image at {_PEAK_BF16.value:.0f} GFLOP/s bf16; "
    f"load average at end {meta['loadavg_at_end'][0]:.1f}; medians of {_RUNS.value} rounds"
  )
  print(
    f"{'implementation':31s} {'prec':5s} {'batch':>5s} {'img/s':>7s} {'GFLOP/s':>8s} "
    f"{'of bf16 ceil':>12s} {'vs native OV':>12s} {'vs torch bf16':>13s} {'build s':>8s}"
  )
  for r in rows:
    vs_n = f"{r['vs_native_ov']:.2f}x" if r["vs_native_ov"] else "-"
    vs_t = f"{r['vs_torch_bf16']:.2f}x" if r["vs_torch_bf16"] else "-"
    print(
      f"{r['impl']:31s} {r['precision']:5s} {r['batch']:5d} {r['images_per_s']:7.2f} "
      f"{r['gflops']:8.0f} {r['of_bf16_ceiling']:12.1%} {vs_n:>12s} {vs_t:>13s} "
      f"{r['build_s']:8.1f}"
    )


if __name__ == "__main__":
  app.run(main)
