r"""Where the time of `engine.index` goes: file reading, decoding, the model, or the index.

  python -m bench.pipeline [--images=200] [--descriptor=gem] [--output=results/pipeline.json]
  python -m bench.pipeline --small            # tiny model, 24 images: a check in seconds

Generates a folder of 1024x768 JPEGs (synthetic scenes, quality 90) and measures, in images/s:

  read        reading every file's bytes (warm page cache: the I/O floor of a local SSD is lower)
  decode      engine.images.load_many: JPEG decode (draft mode) + resize, all decoding threads
  decode 1T   the same with one thread (per-core cost)
  model       Extractor.extract_arrays on pre-decoded pixels: the network alone
  extract     Extractor.extract_paths: decoding overlapped with the model, no index
  index       engine.indexer.index_folder into a fresh index: the whole path (walk, sha256 of
              every file, decode, model, int8 quantisation, commits)
  native OV   (--descriptor=fc2 at 224 on OpenVINO, with torch installed) the peer: a plain
              PyTorch VGG-16 to fc2 exported to ONNX and run by OpenVINO itself on batches of
              --batch_size, model only (no decoding); the table then gives index / native OV

The model is compiled before any timing (one warm-up call per input shape). Light stages are
medians of --runs runs, model stages of --model_runs runs. The last column gives each stage's
time per image as a fraction of the end-to-end time: the stage near 100% is the bottleneck.
Prints a table last; writes JSON with --output.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

from engine.common.fileio import atomic_write_json
from engine.features.model import PRESETS


def make_folder(folder: str, n: int, width: int, height: int, seed: int = 0) -> list[str]:
  """Writes n generated JPEG scenes of width x height into folder (kept if already there)."""
  from engine.app import sample

  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    path = os.path.join(folder, f"img_{i:05d}_{width}x{height}.jpg")
    if not os.path.exists(path):
      sample.scene(rng, width, height).save(path, "JPEG", quality=90)
    paths.append(path)
  return paths


def _median(fn, runs: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def native_openvino(batch: int, precision: str, workdir: str, n: int):
  """Seconds for n images through plain OpenVINO on a torch-exported VGG-16 to fc2 (model only)."""
  from bench.peers import native_openvino_fc2

  one = native_openvino_fc2(batch, precision, workdir)
  one()  # warm-up
  calls = -(-n // batch)
  return lambda: [one() for _ in range(calls)]


def measure(paths: list[str], extractor, dtype: str, runs: int, model_runs: int, workdir: str):
  """Times every stage on `paths`; returns rows {stage, seconds, runs, images_per_s}."""
  from engine.app import indexing
  from engine.features import images

  pre = extractor.preprocessing
  n = len(paths)

  def read():
    for p in paths:
      with open(p, "rb") as f:
        f.read()

  def decode(workers):
    out = []
    for _, px, err in images.load_many(paths, pre, workers=workers):
      if err:
        raise RuntimeError(err)
      out.append(px)
    return out

  decoded = decode(extractor.workers)  # also the model stage's input
  t = time.perf_counter()
  extractor.extract_arrays(decoded[: extractor.batch_size])  # compiles every shape used
  compile_s = time.perf_counter() - t

  counter = iter(range(1 << 30))

  def index():
    path = os.path.join(workdir, f"index-{next(counter)}")
    rep = indexing.index_folder(
      os.path.dirname(paths[0]), path, extractor, dtype=dtype, progress=False
    )
    if rep.indexed != n:
      raise RuntimeError(f"indexed {rep.indexed} of {n}: {rep.failed[:3]}")
    shutil.rmtree(path)

  stages = [
    ("read", read, runs),
    ("decode", lambda: decode(extractor.workers), runs),
    ("decode 1T", lambda: decode(1), runs),
    ("model", lambda: extractor.extract_arrays(decoded), model_runs),
    ("extract", lambda: extractor.extract_paths(paths), model_runs),
    ("index", index, model_runs),
  ]
  if extractor.backend == "openvino" and extractor.descriptor.name == "fc2":
    try:
      peer = native_openvino(extractor.batch_size, extractor.precision, workdir, n)
      stages.append(("native OV", peer, model_runs))
    except ImportError as e:
      print(f"native OpenVINO peer skipped: {e}")
  rows = []
  for name, fn, r in stages:
    sec, all_s = _median(fn, r)
    rows.append(
      {"stage": name, "seconds": sec, "all_seconds": all_s, "runs": r, "images_per_s": n / sec}
    )
    print(f"{name:10s} {n / sec:8.1f} images/s", flush=True)
  total = next(r["seconds"] for r in rows if r["stage"] == "index")
  for row in rows:
    row["fraction_of_index"] = row["seconds"] / total
  return rows, compile_s


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bench.xla_flags import cpu_line
  from engine import cli
  from engine.features.extractor import Extractor

  cli.configure_process()  # what engine.index does: its XLA flags (unless XLA_FLAGS is set)
  print(cpu_line(), flush=True)
  small = _SMALL.value
  n = 24 if small else _IMAGES.value
  config = "tiny" if small else _CONFIG.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="pipeline-")
  try:
    t = time.perf_counter()
    paths = make_folder(
      os.path.join(workdir, "images"), n, _WIDTH.value, _HEIGHT.value, seed=_SEED.value
    )
    print(f"{n} JPEGs of {_WIDTH.value}x{_HEIGHT.value} ready in {time.perf_counter() - t:.1f} s")
    extractor = Extractor(
      "random",
      _DESCRIPTOR.value,
      image_size=_IMAGE_SIZE.value or None,
      batch_size=_BATCH.value,
      precision=_PRECISION.value,
      config=config,
      backend=_BACKEND.value,
    )
    rows, compile_s = measure(
      paths, extractor, _DTYPE.value, _RUNS.value, _MODEL_RUNS.value, workdir
    )
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)
  pre = extractor.preprocessing
  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "images": n,
    "image_size": [_WIDTH.value, _HEIGHT.value],
    "config": config,
    "descriptor": extractor.descriptor.name,
    "preprocessing": pre.to_dict(),
    "dtype": _DTYPE.value,
    "batch_size": _BATCH.value,
    "precision": _PRECISION.value,
    "decode_workers": extractor.workers,
    "cpus": os.cpu_count(),
    "compile_s": compile_s,
    "backend": extractor.backend,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "cpu": cpu_line(),
  }
  if _OUTPUT.value:
    atomic_write_json(_OUTPUT.value, {"meta": meta, "rows": rows})
  print(
    f"\n{n} JPEGs {_WIDTH.value}x{_HEIGHT.value} -> {extractor.descriptor.name} "
    f"({pre.resize} {pre.size}), {config} {_PRECISION.value}, batch {_BATCH.value}, "
    f"{extractor.workers} decoding threads, {os.cpu_count()} cores; compile {compile_s:.1f} s"
  )
  print(f"{'stage':10s} {'images/s':>9s} {'ms/image':>9s} {'of index':>9s} {'runs':>5s}")
  for r in rows:
    print(
      f"{r['stage']:10s} {r['images_per_s']:9.1f} {1e3 / r['images_per_s']:9.1f} "
      f"{r['fraction_of_index']:9.0%} {r['runs']:5d}"
    )
  by = {r["stage"]: r["images_per_s"] for r in rows}
  if "native OV" in by:
    print(
      f"index / native OpenVINO model-only: {by['index'] / by['native OV']:.2f}x "
      f"(target >= 0.9x); XLA_FLAGS={meta['xla_flags']!r}; backend {extractor.backend}"
    )


if __name__ == "__main__":
  # Flags exist only when run as a program, so the module stays importable next to others.
  _IMAGES = flags.DEFINE_integer("images", 200, "Number of generated JPEGs.", lower_bound=1)
  _WIDTH = flags.DEFINE_integer("width", 1024, "JPEG width.")
  _HEIGHT = flags.DEFINE_integer("height", 768, "JPEG height.")
  _DESCRIPTOR = flags.DEFINE_string("descriptor", "gem", "Descriptor (engine.index's default).")
  _IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Input size; 0: the extractor's default.")
  _DTYPE = flags.DEFINE_string("dtype", "int8", "Index storage dtype.")
  _BATCH = flags.DEFINE_integer("batch_size", 16, "Images per device call.")
  _PRECISION = flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "Compute precision.")
  _CONFIG = flags.DEFINE_enum("config", "vgg16", list(PRESETS), "Model preset.")
  _BACKEND = flags.DEFINE_enum(
    "backend", "auto", ["xla", "openvino", "auto"], "Extraction backend."
  )
  _SMALL = flags.DEFINE_bool("small", False, "Quick check: tiny model, 24 images.")
  _RUNS = flags.DEFINE_integer("runs", 3, "Timed runs of the light stages (median).")
  _MODEL_RUNS = flags.DEFINE_integer("model_runs", 1, "Timed runs of the model stages (median).")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the generated images.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Keep the images (and reuse them) here.")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
  app.run(main)
