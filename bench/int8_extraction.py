r"""int8 extraction against fp32 on the CPU it runs on: speed, agreement, copy detection.

  python -m bench.int8_extraction [--configs=fc2:224,gem:320] [--batch_size=8] [--runs=7]
      [--calibration_images=32] [--held_out=24] [--copydetect] [--output=results/int8.json]

Full VGG-16 with the project's seeded random weights (`checkpoint.cached_random`, `random`), on
the OpenVINO backend, for each descriptor:size of --configs:

- calibration: `Extractor.calibrate` (NNCF) on --calibration_images generated scenes
  (`engine.sample`, saved as JPEG, three aspect ratios), as `engine.index --precision=int8` does;
- agreement: cosine between the int8 and fp32 descriptors of images NOT in the calibration set
  (--held_out other generated scenes, plus the shared test photos when present), min / 5th
  percentile / median;
- speed: one compiled runner per precision for a batch of --batch_size at one input shape (224 x
  224 for fc2; a 4:3 photo's bucket, 256 x 320, for pooled descriptors), built and warmed up, then
  timed round-robin (one batch each per round, --runs rounds) so load from other processes hits
  both alike; medians and the int8 / fp32 ratio;
- with --copydetect: `bench.copydetect --backend=openvino` run once per precision (fc2 at 224 and
  the pooled descriptors at the largest --configs size; int8 calibrated on the database, never
  on the copies), mAP per descriptor and the difference.

Prints the CPU model and flags first (`bench.machine.cpu_line`): int8 gains depend on VNNI / AMX.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.machine import cpu_flags, cpu_line, cpu_model
from engine.common.fileio import atomic_write_json

_CONFIGS = flags.DEFINE_list("configs", ["fc2:224", "gem:320"], "descriptor:size pairs.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call in the speed test.", lower_bound=1)
_RUNS = flags.DEFINE_integer("runs", 7, "Timed rounds (median reported).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per runner.", lower_bound=1)
_CALIBRATION = flags.DEFINE_integer("calibration_images", 32, "Calibration sample.", lower_bound=1)
_HELD_OUT = flags.DEFINE_integer("held_out", 24, "Generated scenes outside the sample.")
_COPYDETECT = flags.DEFINE_bool("copydetect", True, "Also run bench.copydetect per precision.")
_DISTRACTORS = flags.DEFINE_integer("distractors", 50, "bench.copydetect --distractors.")
_CONFIG = flags.DEFINE_string("config", "vgg16", "Model preset (tiny: a quick check).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")

SIZES = ((320, 240), (240, 320), (300, 300))  # width, height of the generated scenes
SHARED_PHOTOS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "shared",
  "data",
  "imagededup-tests",
  "base_images",
)


def write_scenes(folder: str, n: int, seed: int) -> list[str]:
  from engine.app import sample

  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(n):
    path = os.path.join(folder, f"scene-{seed + i:05d}.jpg")
    sample.scene(np.random.default_rng(seed + i), *SIZES[i % len(SIZES)]).save(path, quality=90)
    paths.append(path)
  return paths


def speed(runners: dict, batch_bhw3: np.ndarray, runs: int, warmup: int) -> dict:
  """Median seconds per batch of each runner, timed round-robin."""
  for fn in runners.values():
    for _ in range(warmup):
      fn(batch_bhw3)
  times = {k: [] for k in runners}
  for _ in range(runs):
    for k, fn in runners.items():
      t = time.perf_counter()
      fn(batch_bhw3)
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def measure(descriptor: str, size: int, calib: list[str], held: list[str]) -> dict:
  from engine.features import backends, preprocess
  from engine.features.extractor import Extractor

  kwargs = dict(config=_CONFIG.value, batch_size=_BATCH.value, backend="openvino")
  if descriptor not in ("fc1", "fc2", "pool5"):
    kwargs["image_size"] = size
  fp32 = Extractor("random", descriptor, **kwargs)
  int8 = Extractor("random", descriptor, precision="int8", **kwargs)
  t = time.perf_counter()
  model = int8.calibrate(calib, _CALIBRATION.value)
  calib_s = time.perf_counter() - t
  print(f"{descriptor}@{size}: int8 model {model.sha256[:16]} in {calib_s:.1f} s", flush=True)
  cos = np.sum(fp32(held) * int8(held), axis=1)  # both L2-normalised
  if descriptor in ("fc1", "fc2", "pool5"):
    shape = (_BATCH.value, size, size, 3)
  else:  # a 4:3 photo's bucket
    shape = (_BATCH.value, *preprocess.bucket_shape(4000, 3000, size), 3)
  px = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  runners = {
    "fp32": backends.make_runner(fp32, shape),
    "int8": backends.make_runner(int8, shape),
  }
  secs = speed(runners, px, _RUNS.value, _WARMUP.value)
  row = {
    "descriptor": descriptor,
    "size": size,
    "input": list(shape),
    "calibration_s": calib_s,
    "calibration_images": model.record["calibration"]["sample_used"],
    "model_sha256": model.sha256,
    "held_out": len(held),
    "cosine_min": float(cos.min()),
    "cosine_p5": float(np.percentile(cos, 5)),
    "cosine_median": float(np.median(cos)),
    "fp32_images_per_s": _BATCH.value / secs["fp32"],
    "int8_images_per_s": _BATCH.value / secs["int8"],
  }
  row["speedup"] = row["int8_images_per_s"] / row["fp32_images_per_s"]
  print(
    f"{descriptor}@{size}: fp32 {row['fp32_images_per_s']:.2f} images/s, int8 "
    f"{row['int8_images_per_s']:.2f} ({row['speedup']:.2f}x); cosine min {row['cosine_min']:.4f}, "
    f"median {row['cosine_median']:.5f}",
    flush=True,
  )
  return row


def copydetect(precision: str, descriptors: list[str], size: int, tmp: str) -> dict:
  """mAP per descriptor of one `bench.copydetect` run (a child process) at `precision`."""
  out = os.path.join(tmp, f"copydetect-{precision}.json")
  args = [
    sys.executable,
    "-m",
    "bench.copydetect",
    "--backend=openvino",
    f"--precision={precision}",
    f"--descriptors={','.join(descriptors)}",
    f"--image_size={size}",
    f"--config={_CONFIG.value}",
    "--dtypes=float32",
    f"--distractors={_DISTRACTORS.value}",
    f"--calibration_images={_CALIBRATION.value}",
    f"--batch_size={_BATCH.value}",
    f"--output={out}",
  ]
  t = time.perf_counter()
  proc = subprocess.run(args, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"bench.copydetect --precision={precision} failed:\n{proc.stderr[-3000:]}")
  with open(out, encoding="utf-8") as f:
    result = json.load(f)
  rows = [r for r in result["rows"] if r["weights"] != "pixels"]
  maps = {r["descriptor"]: r["all"]["map"] for r in rows}
  print(f"copydetect {precision}: {maps} in {time.perf_counter() - t:.0f} s", flush=True)
  return {"mAP": maps, "meta": result["meta"]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  configs = []
  for item in _CONFIGS.value:
    name, _, size = item.partition(":")
    if name == "rmac" or not size.isdigit():
      raise app.UsageError(f"--configs: descriptor:size (not rmac), got {item!r}")
    configs.append((name, int(size)))
  print(cpu_line(), flush=True)
  import jax
  import openvino

  from engine.features import quantize

  versions = {"jax": jax.__version__, "openvino": openvino.__version__, **quantize.versions()}
  print(versions, flush=True)
  rows, maps = [], {}
  with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
    calib = write_scenes(os.path.join(tmp, "calibration"), _CALIBRATION.value, seed=1000)
    held = write_scenes(os.path.join(tmp, "held-out"), _HELD_OUT.value, seed=5000)
    if os.path.isdir(SHARED_PHOTOS):
      held += sorted(os.path.join(SHARED_PHOTOS, f) for f in os.listdir(SHARED_PHOTOS))
    for name, size in configs:
      rows.append(measure(name, size, calib, held))
    if _COPYDETECT.value:
      pooled = [n for n, _ in configs if n not in ("fc1", "fc2", "pool5")]
      size = max([s for n, s in configs if n in pooled] or [320])
      names = [n for n, _ in configs]
      for precision in ("fp32", "int8"):
        maps[precision] = copydetect(precision, names, size, tmp)

  print(f"\nint8 vs fp32, OpenVINO backend, {_CONFIG.value}, random weights; {cpu_line()}")
  print(
    f"{'descriptor':12s} {'input':>16s} {'fp32 img/s':>10s} {'int8 img/s':>10s} {'x':>5s} "
    f"{'cos min':>8s} {'cos p5':>8s} {'cos med':>8s}"
  )
  for r in rows:
    print(
      f"{r['descriptor'] + '@' + str(r['size']):12s} {'x'.join(map(str, r['input'])):>16s} "
      f"{r['fp32_images_per_s']:10.2f} {r['int8_images_per_s']:10.2f} {r['speedup']:5.2f} "
      f"{r['cosine_min']:8.4f} {r['cosine_p5']:8.4f} {r['cosine_median']:8.5f}"
    )
  if maps:
    print("\ncopy detection mAP (bench.copydetect, float32 index)")
    for name in maps["fp32"]["mAP"]:
      a, b = maps["fp32"]["mAP"][name], maps["int8"]["mAP"].get(name)
      print(f"{name:8s} fp32 {a:.4f}  int8 {b:.4f}  int8 - fp32 {b - a:+.4f}")
  if _OUTPUT.value:
    atomic_write_json(
      _OUTPUT.value,
      {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "batch_size": _BATCH.value,
        "runs": _RUNS.value,
        "rows": rows,
        "copydetect": maps,
      },
    )


if __name__ == "__main__":
  app.run(main)
