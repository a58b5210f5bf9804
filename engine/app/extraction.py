"""Extractors built from a user's settings: weights resolution, an index's own extractor, and the
extraction of a folder into feature files (the work of `engine.extract`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
from collections.abc import Collection, Iterator

import numpy as np
from absl import logging

from engine import store
from engine.app import walk
from engine.common import textio
from engine.common.errors import SettingsError, UserError
from engine.common.fileio import atomic_write, atomic_write_json, cache_root
from engine.features import checkpoint, quantize
from engine.features.descriptors import Descriptor
from engine.features.extractor import Extractor, check_compatible

# Settings an index records and compares: given explicitly, they must agree with the index's.
COMPARED = ("config", "precision", "resize", "image_size", "gem_p", "descriptor", "scales")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to build an extractor, as a user gives it (the binaries' extractor flags).

  Attributes:
    weights: a converted weights folder, `random[:SEED]` or `auto` (see `resolve_weights`).
    config: model preset for random weights (`vgg16`, `tiny`).
    precision: compute precision (`fp32`, `bf16`, `int8`: OpenVINO only, a model quantised on a
      sample of the user's images, see `engine.features.quantize`).
    resize: resize policy, or None for the descriptor's default.
    image_size: input side, or None for the descriptor's default.
    gem_p: GeM exponent.
    batch_size: images per device call.
    workers: image decoding threads, or None for the default.
    backend: extraction backend (`auto`: OpenVINO where it can run, else XLA).
    scales: relative input sizes of multi-scale pooled descriptors ((1.0,): one scale).
  """

  weights: str = "auto"
  config: str = "vgg16"
  precision: str = "fp32"
  resize: str | None = None
  image_size: int | None = None
  gem_p: float = 3.0
  batch_size: int = 16
  workers: int | None = None
  backend: str = "auto"
  scales: tuple[float, ...] = (1.0,)


def find_cached_weights(root: str | None = None) -> str | None:
  """The first converted weights folder in `root` (default: the engine's cache), or None."""
  root = root or cache_root()
  if not os.path.isdir(root):
    return None
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if os.path.isfile(os.path.join(folder, checkpoint.WEIGHTS_JSON)):
      return folder
  return None


def resolve_weights(spec: str) -> str:
  """Turns `auto` into a cached weights folder or `random`, saying so when it falls back."""
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


@contextlib.contextmanager
def _refused_settings() -> Iterator[None]:
  # The extractor checks its arguments with ValueError; built from a user's settings, a refusal is
  # the user's to fix (say --image_size=100), so it reads as one line, not a traceback.
  try:
    yield
  except UserError:
    raise
  except ValueError as e:
    raise SettingsError(str(e)) from e


def build(
  descriptor: str, settings: Settings, *, normalize: bool = True, whitening=None
) -> Extractor:
  """A new extractor of `descriptor` from the user's settings.

  Raises:
    SettingsError: settings the extractor refuses (e.g. an image size that is not a multiple of 32).
    WeightsError: weights that do not exist or do not load.
  """
  weights = resolve_weights(settings.weights)
  with _refused_settings():
    return Extractor(
      weights,
      Descriptor(descriptor, p=settings.gem_p, normalize=normalize),
      resize=settings.resize,
      image_size=settings.image_size,
      batch_size=settings.batch_size,
      precision=settings.precision,
      config=settings.config,
      whitening=whitening,
      workers=settings.workers,
      scales=settings.scales,
      backend=settings.backend,
    )


def for_index(
  index_path: str,
  settings: Settings,
  *,
  descriptor: str | None = None,
  explicit: Collection[str] = (),
) -> Extractor:
  """The extractor an existing index was built with, or a new one of `descriptor`.

  Args:
    index_path: the index folder; without an index there, a new extractor of `descriptor`.
    settings: the user's settings.
    descriptor: the descriptor of a new index; None when an index must exist.
    explicit: names of the settings the user gave (`weights`, `descriptor` or a `Settings`
      field). Given ones of `COMPARED` must agree with what the index recorded (a clear error
      names what differs); the others follow the index.

  Raises:
    UserError: no index at `index_path` and no `descriptor`.
    IncompatibleExtractorError: explicit settings that disagree with the index's.
    SettingsError: settings or recorded metadata the extractor refuses.
  """
  if not store.exists(index_path):
    if descriptor is None:
      raise UserError(f"no index at {index_path}")
    return build(descriptor, settings)
  with store.Index.open(index_path, readonly=True) as idx:
    meta = idx.metadata
  if any(name in explicit for name in COMPARED):
    # Settings not given come from the index, so one flag does not reset the others to defaults.
    fp = meta.get("extractor", {})
    desc, pre = fp.get("descriptor", {}), fp.get("preprocessing", {})
    recorded = {
      "weights": meta.get("weights_spec"),
      "config": fp.get("model"),
      "precision": fp.get("precision"),
      "resize": pre.get("resize"),
      "image_size": pre.get("size"),
      "gem_p": desc.get("p"),
      "scales": tuple(fp.get("scales", (1.0,))),
    }
    settings = dataclasses.replace(
      settings,
      **{k: v for k, v in recorded.items() if k not in explicit and v is not None},
    )
    name = descriptor if "descriptor" in explicit else desc.get("name", descriptor)
    ex = build(name, settings, normalize=desc.get("normalize", True))
    if ex.precision == "int8" and fp.get("precision") == "int8":
      ex.use_quantized(quantize.load(index_path, meta.get("int8") or {}))
    check_compatible(meta, ex)
    return ex
  weights = resolve_weights(settings.weights) if "weights" in explicit else None
  with _refused_settings():
    return Extractor.from_index_metadata(
      meta,
      weights,
      folder=index_path,
      batch_size=settings.batch_size,
      workers=settings.workers,
      backend=settings.backend,
    )


@dataclasses.dataclass
class FolderFeatures:
  """What `extract_to_folder` wrote.

  Attributes:
    count: images described (rows of features.npy).
    dim: descriptor length (columns of features.npy).
    skipped: (path, reason) of every file left out.
  """

  count: int
  dim: int
  skipped: list[tuple[str, str]]


EXTRACT_FILES = ("features.npy", "paths.txt", "errors.txt")
EXTRACT_MANIFEST = "extract.json"


def extract_to_folder(
  extractor: Extractor,
  source: str,
  output: str,
  *,
  calibration_images: int = quantize.DEFAULT_SAMPLE,
) -> FolderFeatures:
  """Writes `features.npy` (float32 `[N, D]`), `paths.txt` (N lines, same order), `errors.txt`
  (path<TAB>reason) for every image under `source`, then `extract.json` (their sha256 and N) into
  the folder `output`.

  Paths are written with `engine.common.textio.encode`: one line each whatever the name holds
  (backslash, newline, tab and other control characters escaped; non-UTF-8 names keep their
  bytes). Everything is encoded before anything is written, and extract.json, written last, is the
  commit point: `read_folder` refuses a folder whose files do not match it.

  An int8 extractor without a model is calibrated on `calibration_images` of the folder's images
  first; extract.json then records the model (`int8`: its sha256 and calibration images).

  Raises:
    UserError: no image under `source`, or none of them could be decoded.
  """
  paths, bad = walk.split_images(source)
  if not paths:
    raise UserError(f"no images found under {source}")
  if extractor.precision == "int8" and extractor.quantized is None:
    extractor.calibrate(paths, calibration_images)
  logging.info("extracting %d images with %s", len(paths), extractor.descriptor.name)
  result = extractor.extract_paths(paths)
  bad += [(paths[pos], reason) for pos, reason in sorted(result.errors.items())]
  if not len(result.positions):
    raise UserError(f"none of the {len(paths)} images under {source} could be decoded")
  buf = io.BytesIO()
  np.save(buf, result.features)
  data = {
    "features.npy": buf.getvalue(),
    "paths.txt": textio.encode([[paths[p]] for p in result.positions]),
    "errors.txt": textio.encode([[p, r] for p, r in bad]),
  }
  manifest = {
    "rows": int(result.features.shape[0]),
    "dim": int(result.features.shape[1]),
    "descriptor": extractor.descriptor.name,
    "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in data.items()},
    **({"int8": extractor.quantized.record} if extractor.quantized is not None else {}),
  }
  os.makedirs(output, exist_ok=True)
  with contextlib.suppress(FileNotFoundError):  # the old outputs stop being valid first
    os.unlink(os.path.join(output, EXTRACT_MANIFEST))
  for name, b in data.items():
    atomic_write(os.path.join(output, name), lambda f, b=b: f.write(b))
  atomic_write_json(os.path.join(output, EXTRACT_MANIFEST), manifest)
  return FolderFeatures(manifest["rows"], manifest["dim"], bad)


def read_folder(output: str) -> tuple[np.ndarray, list[str]]:
  """The `[N, D]` features and N paths `extract_to_folder` wrote, checked against extract.json.

  Raises:
    UserError: a file is missing, or the files are not the ones extract.json describes (an
      interrupted or mixed write).
  """
  try:
    with open(os.path.join(output, EXTRACT_MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
    data = {}
    for name in ("features.npy", "paths.txt"):
      with open(os.path.join(output, name), "rb") as f:
        data[name] = f.read()
  except (OSError, ValueError) as e:
    raise UserError(f"{output} holds no complete extraction: {e}") from None
  for name, b in data.items():
    if hashlib.sha256(b).hexdigest() != manifest.get("sha256", {}).get(name):
      raise UserError(f"{os.path.join(output, name)} does not match {EXTRACT_MANIFEST}")
  features = np.load(io.BytesIO(data["features.npy"]), allow_pickle=False)
  paths = [fields[0] for fields in textio.decode(data["paths.txt"])]
  if features.shape[0] != len(paths):
    raise UserError(f"{output}: {features.shape[0]} feature rows but {len(paths)} paths")
  return features, paths
