"""Flags and the error handler shared by the binaries (`engine.extract`, `engine.index`, ...).

Only binaries import this module: library modules never read flags. A binary that defines flags
here calls `flags.adopt_module_key_flags(cli)` so that its `--help` lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import sys

from absl import app, flags, logging

from engine import store
from engine.app import distributed, extraction
from engine.common import fileio
from engine.common.errors import UserError
from engine.features import backends, quantize
from engine.features.descriptors import DESCRIPTORS
from engine.features.extractor import PRECISIONS
from engine.features.model import PRESETS
from engine.features.preprocess import RESIZE_POLICIES

DESCRIPTOR_NAMES = list(DESCRIPTORS)

# XLA's CPU flags that measured fastest for each kind of work (bench/xla_flags.py, BUILD.md): with
# YNNPACK's library fusions off, XLA's own convolutions extract faster, while the float32 search
# products are faster with them on (XLA's defaults).
DEFAULT_XLA_FLAGS = {"extract": "--xla_cpu_experimental_ynn_fusion_type=", "search": ""}
JAX_CACHE_DIR = "jax"


def configure_process(work: str = "extract") -> None:
  """Process-wide settings a binary owns, made first thing in `main`, before JAX runs anything.

  Args:
    work: what the binary mostly does, `extract` (engine.index, engine.extract) or `search`
      (engine.query, engine.dedup): picks `DEFAULT_XLA_FLAGS[work]`.

  XLA reads `XLA_FLAGS` once, when its CPU client starts: the defaults go in only when the user
  has not set `XLA_FLAGS` (then theirs stand as given). JAX's persistent compilation cache goes
  under the engine's cache root (`jax/`), every executable cached however fast it compiled, unless
  `$VGG_RETRIEVAL_NO_CACHE` is set. Library code never does this: importing or calling it leaves
  the process's flags alone.
  """
  # JAX says at INFO level, on every run of a binary (absl shows INFO), that it found no TPU.
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  if "XLA_FLAGS" not in os.environ and DEFAULT_XLA_FLAGS[work]:
    os.environ["XLA_FLAGS"] = DEFAULT_XLA_FLAGS[work]
  if fileio.caches_enabled():
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(fileio.cache_root(), JAX_CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def define_descriptor_flags(default: str, help: str) -> None:
  """--descriptor, and --layer: its deprecated spelling (one release), read by `descriptor()`."""
  flags.DEFINE_enum("descriptor", default, DESCRIPTOR_NAMES, help)
  flags.DEFINE_enum(
    "layer",
    None,
    DESCRIPTOR_NAMES,
    "Deprecated: use --descriptor (--layer goes in the next release).",
  )


def descriptor() -> str:
  """The --descriptor value, or the deprecated --layer's with a warning."""
  f = flags.FLAGS
  if f.layer is None:
    return f.descriptor
  if f["descriptor"].present and f.descriptor != f.layer:
    raise app.UsageError(f"--layer={f.layer} and --descriptor={f.descriptor} disagree")
  logging.warning("--layer is deprecated and goes in the next release: use --descriptor")
  return f.layer


def define_extractor_flags() -> None:
  flags.DEFINE_string(
    "weights",
    "auto",
    "Converted weights folder (python -m weights.convert / weights.fetch), 'random' or "
    "'random:SEED' (seeded random weights, NOT ImageNet: for demos and tests), or 'auto': the "
    f"first converted weights in the cache (${fileio.CACHE_ENV} or ~/.cache/vgg-retrieval), else "
    "random with a warning.",
  )
  flags.DEFINE_enum("config", "vgg16", list(PRESETS), "Model preset for random weights.")
  flags.DEFINE_integer("batch_size", 16, "Images per device call.", lower_bound=1)
  flags.DEFINE_enum(
    "precision",
    "fp32",
    sorted(PRECISIONS),
    "Compute precision: fp32, bf16 (the CPU's bf16 units), or int8 (OpenVINO backend only: the "
    "model quantised with NNCF on --calibration_images of your own images, kept in the index; "
    "queries of an int8 index use it). An index never mixes precisions.",
  )
  flags.DEFINE_enum(
    "resize",
    None,
    list(RESIZE_POLICIES),
    "Resize policy (default: squash for fc1/fc2/pool5, keep_aspect for pooled descriptors).",
  )
  flags.DEFINE_integer(
    "image_size",
    None,
    "Input side (squash/center_crop) or longer side (keep_aspect), a multiple of 32. "
    "Default: the model's 224 for fc1/fc2/pool5, 320 for pooled descriptors.",
  )
  flags.DEFINE_float("gem_p", 3.0, "GeM exponent.")
  flags.DEFINE_integer("workers", None, "Image decoding threads (default: CPU count, max 8).")
  flags.DEFINE_list(
    "scales",
    ["1"],
    "Multi-scale pooled descriptors (mac, spoc, gem, rmac): describe each image at these relative "
    "sizes too and average the L2-normalised descriptors, e.g. 1,0.707,1.414 (costs one pass per "
    "scale). Recorded in the index: queries use the index's.",
  )
  flags.DEFINE_enum(
    "backend",
    "auto",
    list(backends.BACKENDS),
    "Extraction backend: xla (jit), openvino (the same model exported to ONNX, compiled by "
    "OpenVINO: the fast path on x86 CPUs; pip install .[cpu]), or auto (openvino where "
    "installed on an x86 CPU, else xla).",
  )


def define_calibration_flag() -> None:
  """--calibration_images: the int8 calibration sample of engine.index / engine.extract."""
  flags.DEFINE_integer(
    "calibration_images",
    quantize.DEFAULT_SAMPLE,
    "With --precision=int8 and a new index: how many of the images (evenly spaced over their "
    "sorted paths) calibrate the int8 quantisation; all of them when there are fewer.",
    lower_bound=1,
  )


def settings() -> extraction.Settings:
  """The extractor flags' values (after `define_extractor_flags` and flag parsing)."""
  f = flags.FLAGS
  return extraction.Settings(
    weights=f.weights,
    config=f.config,
    precision=f.precision,
    resize=f.resize,
    image_size=f.image_size,
    gem_p=f.gem_p,
    batch_size=f.batch_size,
    workers=f.workers,
    backend=f.backend,
    scales=_scales(f.scales),
  )


def _scales(values: list[str]) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise UserError(f"--scales must be numbers, got {','.join(values)!r}") from None


def explicit_settings() -> set[str]:
  """Names of the extractor settings given on the command line (not left at their defaults)."""
  f = flags.FLAGS
  names = ["descriptor", *(field.name for field in dataclasses.fields(extraction.Settings))]
  given = {n for n in names if n in f and not f[n].using_default_value}
  if "layer" in f and f.layer is not None:
    given.add("descriptor")
  return given


def check_output_file(path: str | None) -> None:
  """Refuses an output file whose folder does not exist, before any work is done."""
  if path:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
      raise UserError(f"cannot write {path}: the folder {folder} does not exist")


@contextlib.contextmanager
def user_errors():
  """Turns the errors a user can act on into one line on stderr and exit code 1.

  Those are `UserError` (bad input, files, settings, indexes, weights) and `OSError` (missing files,
  permissions, a full disk). Anything else is a bug and keeps its traceback.
  """
  try:
    yield
  except distributed.LostProcessError as e:
    # JAX's exit handler would wait for the lost process's heartbeat timeout, then abort.
    print(f"error: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except (FileNotFoundError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def define_distributed_flags() -> None:
  """--coordinator_address, --num_processes, --process_id: one `jax.distributed` run of several
  processes (hosts) over one index. Unset: one process, unless a cluster environment that JAX
  detects is used by giving any of them."""
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 of a multi-process run (jax.distributed); process 0 listens there.",
  )
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.", lower_bound=1)
  flags.DEFINE_integer("process_id", None, "This process's number in [0, --num_processes).")
  flags.DEFINE_integer(
    "distributed_timeout",
    60,
    "Seconds a process waits for the coordinator and the other processes.",
    lower_bound=1,
  )


def join_cluster(index: str | None = None) -> distributed.Cluster:
  """Joins the run the distributed flags describe, then checks that every process was given the
  same flags (all but --process_id) and, with `index`, the same index folder and manifest."""
  f = flags.FLAGS
  cluster = distributed.initialize(
    f.coordinator_address, f.num_processes, f.process_id, timeout_s=f.distributed_timeout
  )
  if cluster.distributed:
    main = sys.modules["__main__"]
    values = {
      f"--{fl.name}": repr(fl.value)
      for fl in f.get_key_flags_for_module(main)
      if fl.name not in ("process_id",)
    }
    if index is not None:
      values["index folder"] = os.path.abspath(index)
      mpath = os.path.join(index, store.MANIFEST)
      values["index manifest sha256"] = (
        fileio.sha256_file(mpath) if os.path.exists(mpath) else "(none)"
      )
    distributed.agree(cluster, values)
  return cluster
