"""Flags and helpers shared by the binaries (`engine.extract`, `engine.index`, `engine.query`, ...).

Only binaries import this module: library modules never read flags.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
from absl import flags, logging

from engine.app import walk
from engine.common import fileio
from engine.common.errors import UserError
from engine.common.fileio import atomic_write, atomic_write_text
from engine.features import backends, checkpoint, images
from engine.features.descriptors import DESCRIPTORS, Descriptor
from engine.features.extractor import PRECISIONS, Extractor
from engine.features.model import PRESETS
from engine.features.preprocess import RESIZE_POLICIES

DESCRIPTOR_NAMES = list(DESCRIPTORS)


def cache_dir() -> str:
  """Where `weights.fetch` puts converted weights (overridable with $VGG_RETRIEVAL_CACHE)."""
  return fileio.cache_root()


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
  flags.DEFINE_enum("precision", "fp32", sorted(PRECISIONS), "Compute precision.")
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
  flags.DEFINE_enum(
    "backend",
    "auto",
    list(backends.BACKENDS),
    "Extraction backend: xla (jit), openvino (the same model exported to ONNX, compiled by "
    "OpenVINO: the fast path on x86 CPUs; pip install .[cpu]), or auto (openvino where "
    "installed on an x86 CPU, else xla).",
  )


def find_cached_weights() -> str | None:
  root = cache_dir()
  if not os.path.isdir(root):
    return None
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if os.path.isfile(os.path.join(folder, checkpoint.WEIGHTS_JSON)):
      return folder
  return None


def resolve_weights(spec: str) -> str:
  """Turns `auto` into a weights folder or `random`, saying so when it falls back."""
  if spec != "auto":
    return spec
  found = find_cached_weights()
  if found:
    logging.info("using converted weights in %s", found)
    return found
  print(
    "note: no converted ImageNet weights found (python -m weights.fetch --source=keras_h5 "
    "downloads them); running on RANDOM weights (--weights=random), not ImageNet.",
    file=sys.stderr,
  )
  return "random"


def make_extractor(descriptor: str, normalize: bool = True, whitening=None) -> Extractor:
  f = flags.FLAGS
  return Extractor(
    resolve_weights(f.weights),
    Descriptor(descriptor, p=f.gem_p, normalize=normalize),
    resize=f.resize,
    image_size=f.image_size,
    batch_size=f.batch_size,
    precision=f.precision,
    config=f.config,
    whitening=whitening,
    workers=f.workers,
  )


def extractor_for_index(index_path: str, descriptor: str | None = None) -> Extractor:
  """The extractor an existing index was built with, or a new one from the flags.

  With an existing index, extractor flags given explicitly must agree with what the index
  recorded (a clear error names what differs); flags left at their defaults follow the index.
  """
  from engine import store
  from engine.features.extractor import check_compatible

  exists = store.exists(index_path)
  if not exists and descriptor is None:
    raise UserError(f"no index at {index_path}")
  if not exists:
    return make_extractor(descriptor)
  with store.Index.open(index_path, readonly=True) as idx:
    meta = idx.metadata
  f = flags.FLAGS
  settings = ["config", "precision", "resize", "image_size", "gem_p", "descriptor"]
  explicit = [n for n in settings if n in f and not f[n].using_default_value]
  if explicit:
    recorded = meta.get("extractor", {}).get("descriptor", {}).get("name")
    ex = make_extractor(f.descriptor if "descriptor" in f else (descriptor or recorded))
    check_compatible(meta, ex)
    return ex
  weights = None if f["weights"].using_default_value else resolve_weights(f.weights)
  return Extractor.from_index_metadata(
    meta, weights, batch_size=f.batch_size, workers=f.workers, backend=f.backend
  )


@contextlib.contextmanager
def user_errors():
  """Turns expected failures into a one-line message and exit code 1 (no traceback)."""
  from engine import store

  try:
    yield
  except (
    UserError,
    checkpoint.WeightsError,
    images.ImageError,
    store.StoreError,
    FileNotFoundError,
    PermissionError,
    ValueError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def extract_to_folder(extractor: Extractor, source: str, output: str) -> None:
  """Writes features.npy, paths.txt and errors.txt for every image under `source`."""
  paths, bad = walk.split_images(source)
  if not paths:
    raise UserError(f"no images found under {source}")
  logging.info("extracting %d images with %s", len(paths), extractor.descriptor.name)
  result = extractor.extract_paths(paths)
  bad += [(paths[pos], reason) for pos, reason in sorted(result.errors.items())]
  if not len(result.positions):
    raise UserError(f"none of the {len(paths)} images under {source} could be decoded")
  os.makedirs(output, exist_ok=True)
  atomic_write(os.path.join(output, "features.npy"), lambda f: np.save(f, result.features))
  kept = [paths[p] for p in result.positions]
  atomic_write_text(os.path.join(output, "paths.txt"), "".join(f"{p}\n" for p in kept))
  atomic_write_text(os.path.join(output, "errors.txt"), "".join(f"{p}\t{r}\n" for p, r in bad))
  label = " (RANDOM weights, not ImageNet)" if extractor.weights_info.is_random else ""
  print(
    f"wrote {result.features.shape[0]} x {result.features.shape[1]} {extractor.descriptor.name} "
    f"features to {output}{label}; {len(bad)} files skipped (see errors.txt)"
  )
