"""Extraction backends: XLA (the jitted Flax model) or OpenVINO (the same model, exported).

On x86 CPUs OpenVINO's CPU plugin runs VGG-16 faster than XLA (in bf16 it uses the AMX matrix
units for convolutions, which XLA's CPU convolution does not; BUILD.md has the measurements), so
`auto` picks it there when it is installed. The Flax model stays the single source of truth:
`onnx_export` traces the body of `engine.features.forward`, the very function XLA compiles, to
ONNX, and OpenVINO compiles that.

The exported graph is cached, so it is built once per weights, descriptor and input size:
`WEIGHTS_DIR/exported/` beside converted weights (when writable), else
`$VGG_RETRIEVAL_CACHE/exported/` (default `~/.cache/vgg-retrieval/exported/`). The file name
carries a sha256 of everything the graph depends on (weights fingerprint, model, pixel convention,
descriptor, height and width); the batch is symbolic in the file and fixed when OpenVINO compiles
it, with the precision (`INFERENCE_PRECISION_HINT`). OpenVINO's own cache of compiled models
(`CACHE_DIR`) lives in `$VGG_RETRIEVAL_CACHE/openvino/` unless `$VGG_RETRIEVAL_NO_CACHE` is set.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import platform
import sys
import threading

import jax
import numpy as np
from absl import logging

from engine.common import fileio
from engine.features import onnx_export

BACKENDS = ("xla", "openvino", "auto")
# int8 models carry their own int8 operations (quantize.py); what is left of them runs in f32.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
EXPORT_VERSION = 1
EXPORTED_DIR = "exported"
OPENVINO_CACHE_DIR = "openvino"

# How often a graph was exported / compiled in this process (tests check the cache with it).
build_counts: collections.Counter = collections.Counter()
_export_lock = threading.Lock()


def is_x86() -> bool:
  return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def import_openvino():
  """`import openvino`, without OpenVINO's usage telemetry unless the user opted in.

  Importing openvino sends a usage event to Google Analytics from a forked process (a fork of a
  multithreaded JAX process, which can deadlock) unless a consent file says no. The engine treats
  "no consent file" as "declined" for its own process; a user who opted in with OpenVINO's
  `opt_in_out --opt_in` keeps their choice. Nothing is written to the user's consent file.
  """
  if "openvino" not in sys.modules:
    try:
      from openvino_telemetry.utils import opt_in_checker
    except ImportError:  # no telemetry package: nothing to decline
      pass
    else:
      checker = opt_in_checker.OptInChecker
      if not getattr(checker.check, "_engine_declines", False):
        check = checker.check

        def declined_without_consent(self, *args, **kwargs):
          result = check(self, *args, **kwargs)
          if result == opt_in_checker.ConsentCheckResult.NO_FILE:
            return opt_in_checker.ConsentCheckResult.DECLINED
          return result

        declined_without_consent._engine_declines = True
        checker.check = declined_without_consent
  import openvino

  return openvino


def unavailable_reason() -> str | None:
  """Why the OpenVINO backend cannot run here, or None when it can (an x86 CPU, OpenVINO
  importable, the exporter installed)."""
  if not is_x86():
    return f"this CPU ({platform.machine()}) is not x86"
  try:
    import_openvino()
  except Exception as e:  # noqa: BLE001 - a broken install raises anything; all mean "not here"
    return f"openvino cannot be imported ({type(e).__name__}: {e})"
  missing = [m for m in ("jax2onnx", "onnx") if importlib.util.find_spec(m) is None]
  if missing:
    return f"the exporter is not installed ({', '.join(missing)})"
  return None


def available() -> bool:
  """Whether the OpenVINO backend can run here."""
  return unavailable_reason() is None


def resolve(backend: str) -> str:
  """`auto` -> `openvino` on an x86 CPU with OpenVINO importable (and JAX on CPU), else `xla`;
  `auto` logs one line saying which and why.

  Raises:
    ValueError: unknown backend, or `openvino` requested where it cannot run.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    platform_name = jax.default_backend()
    if platform_name != "cpu":  # with an accelerator, XLA is the fast path
      logging.info("extraction backend: xla (auto: JAX runs on %s)", platform_name)
      return "xla"
    why = unavailable_reason()
    if why is None:
      logging.info("extraction backend: openvino (auto: installed, x86 CPU)")
      return "openvino"
    logging.warning(
      "extraction backend: xla, the slower CPU path (auto: %s; the default install has "
      "OpenVINO where it ships wheels: pip install -e .[cpu])",
      why,
    )
    return "xla"
  if backend == "openvino":
    why = unavailable_reason()
    if why is not None:
      raise ValueError(
        f"backend openvino cannot run here ({why}); pip install openvino jax2onnx onnx "
        "(the project's `cpu` extra), or use --backend=xla"
      )
  return backend


def default_cache_dir() -> str:
  return os.path.join(fileio.cache_root(), EXPORTED_DIR)


def compiled_cache_dir() -> str | None:
  """Where OpenVINO caches compiled models (its `CACHE_DIR`), or None with caches disabled."""
  if not fileio.caches_enabled():
    return None
  return os.path.join(fileio.cache_root(), OPENVINO_CACHE_DIR)


def cache_dir_for(extractor) -> str:
  """Beside converted weights when that folder is writable, else the user cache."""
  spec = str(extractor.weights_spec)
  if not (spec == "random" or spec.startswith("random:")) and os.path.isdir(spec):
    beside = os.path.join(os.path.abspath(spec), EXPORTED_DIR)
    if os.access(beside if os.path.isdir(beside) else spec, os.W_OK):
      return beside
  return default_cache_dir()


def export_key(extractor, height: int, width: int) -> dict:
  """Everything the exported graph depends on."""
  return {
    "export_version": EXPORT_VERSION,
    "weights": extractor.weights_info.fingerprint,
    "model": extractor.config.name,
    "convention": extractor.preprocessing.convention,
    "descriptor": extractor.descriptor.to_dict(),
    "height": int(height),
    "width": int(width),
  }


def export_path(extractor, height: int, width: int, cache_dir: str | None = None) -> str:
  key = export_key(extractor, height, width)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  name = f"{key['model']}-{extractor.descriptor.name}-{height}x{width}-{digest}.onnx"
  return os.path.join(cache_dir or cache_dir_for(extractor), name)


def exported_onnx(extractor, height: int, width: int, cache_dir: str | None = None) -> str:
  """Path of the cached ONNX export (symbolic batch), exporting it first if missing."""
  path = export_path(extractor, height, width, cache_dir)
  with _export_lock:
    if not os.path.isfile(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      onnx_export.export_onnx(extractor, path, batch_size=None, height=height, width=width)
      build_counts["export"] += 1
  return path


class OpenVINORunner:
  """One compiled OpenVINO model for a fixed `[B, H, W, 3]` uint8 input.

  Args:
    onnx_path: an `engine.export` ONNX file (input `pixels`, output `descriptors`).
    shape: the fixed input shape `(B, H, W, 3)`.
    precision: `fp32` or `bf16` (OpenVINO's INFERENCE_PRECISION_HINT; bf16 runs the convolutions
      and matrix products on AMX with float32 accumulation where the CPU has it), or `int8` for
      a quantised model (`quantized`).
    compiled_cache: OpenVINO's `CACHE_DIR` for compiled models, or None for no cache.
    quantized: an int8 `engine.features.quantize.QuantizedModel` to run instead of `onnx_path`.
  """

  def __init__(
    self,
    onnx_path: str | None,
    shape: tuple[int, ...],
    precision: str = "fp32",
    compiled_cache: str | None = None,
    *,
    quantized=None,
  ):
    ov = import_openvino()

    if precision not in PRECISION_HINTS:
      raise ValueError(f"precision must be one of {sorted(PRECISION_HINTS)}, got {precision!r}")
    if (precision == "int8") != (quantized is not None):
      raise ValueError("precision int8 runs a quantised model, and a quantised model runs int8")
    self.shape = tuple(int(d) for d in shape)
    self.precision = precision
    core = ov.Core()
    model = quantized.read(core) if quantized is not None else core.read_model(onnx_path)
    model.reshape({0: list(self.shape)})
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
    if compiled_cache:
      os.makedirs(compiled_cache, exist_ok=True)
      config["CACHE_DIR"] = compiled_cache
    self._compiled = core.compile_model(model, "CPU", config)
    self._request = self._compiled.create_infer_request()
    build_counts["compile"] += 1

  def __call__(self, batch_bhw3: np.ndarray) -> np.ndarray:
    """`[B, H, W, 3]` uint8 -> `[B, D]` float32 (a new array)."""
    batch = np.ascontiguousarray(batch_bhw3, np.uint8)
    if batch.shape != self.shape:
      raise ValueError(f"this runner was compiled for {self.shape}, got {batch.shape}")
    out = self._request.infer({0: batch}, share_inputs=True, share_outputs=False)
    return np.asarray(out[0], np.float32)


def make_runner(
  extractor,
  shape: tuple[int, ...],
  *,
  precision: str | None = None,
  cache_dir: str | None = None,
) -> OpenVINORunner:
  """An OpenVINO runner computing what `extractor` computes (before whitening) for one shape.

  Args:
    extractor: an `engine.Extractor` (weights, descriptor, pixel convention).
    shape: `(B, H, W, 3)` of the uint8 batches it will get.
    precision: `fp32`, `bf16` or `int8` (the extractor's quantised model); default the
      extractor's.
    cache_dir: where exported graphs live; default `cache_dir_for(extractor)`.
  """
  precision = precision or extractor.precision
  if precision == "int8":
    if extractor.quantized is None:
      raise ValueError("an int8 extractor needs its quantised model before it runs")
    return OpenVINORunner(None, shape, "int8", compiled_cache_dir(), quantized=extractor.quantized)
  _, height, width, _ = shape
  path = exported_onnx(extractor, height, width, cache_dir)
  return OpenVINORunner(path, shape, precision, compiled_cache_dir())


class OpenVINOExtraction:
  """Per-shape OpenVINO runners for one extractor, built on first use of each shape (bucket).

  `OpenVINOExtraction(extractor)(batch)` does what the jitted `forward` does in
  `Extractor.run_batch`: `[B, H, W, 3]` uint8 -> `[B, D]` float32 numpy.
  """

  def __init__(self, extractor, *, precision: str | None = None, cache_dir: str | None = None):
    self._extractor = extractor
    self._precision = precision
    self._cache_dir = cache_dir
    self._runners: dict[tuple[int, ...], OpenVINORunner] = {}

  def __call__(self, batch_bhw3: np.ndarray) -> np.ndarray:
    shape = tuple(batch_bhw3.shape)
    runner = self._runners.get(shape)
    if runner is None:
      runner = make_runner(
        self._extractor, shape, precision=self._precision, cache_dir=self._cache_dir
      )
      self._runners[shape] = runner
    return runner(batch_bhw3)

  def compiled_shapes(self) -> int:
    return len(self._runners)
