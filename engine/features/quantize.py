"""int8 extraction: post-training quantisation of the OpenVINO model with NNCF, and its files.

`calibrate` picks a deterministic sample of the user's own images (evenly spaced over their
sorted list), decodes and prepares them exactly as extraction does (the extractor's
preprocessing, every scale of a multi-scale descriptor), and lets NNCF (OpenVINO's own
post-training quantisation library) place int8 FakeQuantize operations with ranges measured on
them (`nncf.quantize`, the `performance` preset: symmetric int8 activations and weights). The
quantised model is OpenVINO IR (`.xml` + `.bin`) identified by a sha256 over both files.

One model serves every input shape: it is quantised from the export at the square size with the
spatial dimensions left free (`gem`, `mac`, `spoc`: their graphs hold no constant that depends
on the input's shape, so OpenVINO reshapes the model to each aspect-ratio bucket) or fixed
(`fc1`, `fc2`, `pool5`: one input size). R-MAC's regions are constants of each shape's graph,
so `rmac` has no int8 path.

An index keeps the model it was built with (`save`, beside the index's own files, written before
the index's manifest) and its record in its metadata: the model's sha256, each file's sha256,
the calibration images (keys and sha256), the sample size asked for and used, the input shapes
seen, the NNCF and OpenVINO versions. `load` reads the model back and checks every sha256: a
missing or damaged model is an error, never a new quantisation, whose int8 descriptors would not
match the index's. Quantising is cached under the engine's cache root (`int8/`, keyed by
everything the model depends on), so a second index of the same images costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging as std_logging
import os
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
from absl import logging

from engine.common import fileio
from engine.common.errors import UserError
from engine.features import backends, images

QUANT_VERSION = 2
DEFAULT_SAMPLE = 32
CACHE_DIR = "int8"
FILE_PREFIX = "int8-model-"
PRESET = "performance"
# The descriptor head (pooling, GeM's powers, L2 normalisation) stays in float32: NNCF would
# otherwise quantise these operations' inputs too (a GeM whose p-th powers and norms are 8-bit
# loses most of what separates images); the convolutions and fully connected layers run int8.
HEAD_OPS = (
  "Power",
  "ReduceSum",
  "ReduceMean",
  "ReduceMax",
  "ReduceL2",
  "Divide",
  "Multiply",
  "Maximum",
  "Sqrt",
)
# Descriptors whose exported graph runs at any input shape (checked by tests/test_int8.py).
FREE_SHAPE = ("gem", "mac", "spoc")


class QuantizationError(UserError, ValueError):
  """int8 extraction cannot run here, or its model is missing or damaged."""


def unavailable_reason(descriptor_name: str | None = None) -> str | None:
  """Why int8 extraction cannot run here (for this descriptor), or None when it can."""
  why = backends.unavailable_reason()
  if why is not None:
    return f"the OpenVINO backend cannot run here ({why})"
  if descriptor_name == "rmac":
    return "rmac's regions are constants of each input shape's graph: no int8 model serves them"
  return None


def _nncf():
  backends.import_openvino()  # first: it declines OpenVINO's telemetry, which NNCF shares
  if importlib.util.find_spec("nncf") is None:
    raise QuantizationError(
      "int8 calibration needs NNCF: pip install -e .[int8] (the default set-up installs it "
      "with OpenVINO)"
    )
  import nncf

  return nncf


def versions() -> dict:
  out = {}
  for name in ("nncf", "openvino"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


class QuantizedModel:
  """An int8 OpenVINO model in memory (IR `.xml` text and `.bin` weights) and its record.

  Attributes:
    xml: the IR's XML bytes.
    weights: the IR's `.bin` bytes.
    sha256: sha256 of the two files' sha256s: the model's identity, compared by indexes.
    record: what an index records about it (see the module docstring).
  """

  def __init__(self, xml: bytes, weights: bytes, record: dict):
    self.xml = xml
    self.weights = weights
    self.record = record
    self.sha256 = record["sha256"]
    self._weights_u8: np.ndarray | None = None

  @property
  def files(self) -> dict[str, str]:
    """File names of the model in an index folder: {"xml": ..., "bin": ...}."""
    return dict(self.record["files"])

  def read(self, core):
    """The model as an `openvino.Model` of `core` (from memory, the checked bytes)."""
    ov = backends.import_openvino()
    if self._weights_u8 is None:  # one writable copy, shared by the runner of every shape
      self._weights_u8 = np.frombuffer(bytearray(self.weights), np.uint8)
    tensor = ov.Tensor(self._weights_u8, shared_memory=True)
    return core.read_model(self.xml.decode("utf-8"), tensor)


def _model_record(xml: bytes, weights: bytes, extra: dict) -> dict:
  digests = {"xml": hashlib.sha256(xml).hexdigest(), "bin": hashlib.sha256(weights).hexdigest()}
  sha = hashlib.sha256(f"{digests['xml']}\n{digests['bin']}\n".encode()).hexdigest()
  stem = f"{FILE_PREFIX}{sha[:16]}"
  return {
    **extra,
    "sha256": sha,
    "files": {"xml": f"{stem}.xml", "bin": f"{stem}.bin"},
    "file_sha256": digests,
  }


def sample_evenly(paths: Sequence[str], n: int) -> list[str]:
  """`n` paths evenly spaced over the sorted list (all of them when there are not more)."""
  ordered = sorted(paths)
  if len(ordered) <= n:
    return ordered
  picks = np.linspace(0, len(ordered) - 1, n).round().astype(int)
  return [ordered[i] for i in dict.fromkeys(picks.tolist())]


def reference_shape(extractor) -> list:
  """The input shape the model is quantised with: -1 for free dimensions."""
  size = extractor.preprocessing.size
  if extractor.descriptor.needs_fixed_size:
    return [-1, size, size, 3]
  if extractor.descriptor.name in FREE_SHAPE:
    return [-1, -1, -1, 3]
  why = unavailable_reason("rmac")
  raise QuantizationError(f"int8 extraction of {extractor.descriptor.name}: {why}")


def _inputs(extractor, pixels_hw3: np.ndarray) -> list[np.ndarray]:
  """The network inputs extraction makes of one prepared image: `[1, H, W, 3]` per scale."""
  px = pixels_hw3[None]
  return [px if scale == 1.0 else images.rescale(px, scale) for scale in extractor.scales]


def _calibration_items(extractor, chosen: list[str]) -> tuple[list, list, dict]:
  """Decodes `chosen` as extraction does: ([1, H, W, 3] uint8 inputs, used paths, skipped)."""
  items, used, skipped = [], [], {}
  decoded = images.load_many(chosen, extractor.preprocessing, workers=extractor.workers)
  for pos, pixels, err in decoded:
    if pixels is None:
      skipped[chosen[pos]] = err
      continue
    used.append(chosen[pos])
    items += _inputs(extractor, pixels)
  return items, used, skipped


def calibrate(extractor, paths: Sequence[str], sample: int = DEFAULT_SAMPLE) -> QuantizedModel:
  """Quantises `extractor`'s model to int8 on a sample of `paths` (the user's own images).

  Args:
    extractor: an `engine.Extractor` with precision int8 (weights, descriptor, preprocessing).
    paths: the images to draw the sample from (e.g. every file an index run will extract).
    sample: how many images: evenly spaced over the sorted paths; all of them when there are
      fewer (logged). Files that do not decode are left out of the sample (logged).

  Returns:
    The QuantizedModel (from the cache when the same model was built before).

  Raises:
    QuantizationError: NNCF or OpenVINO missing, an unsupported descriptor, or no image decoded.
  """
  _check(extractor, sample)
  chosen = sample_evenly(paths, sample)
  if not chosen:
    raise QuantizationError("int8 calibration found no images to calibrate on")
  _say_if_short(sample, len(chosen))
  items, used, skipped = _calibration_items(extractor, chosen)
  for path, reason in skipped.items():
    logging.warning("int8 calibration: left out %s (%s)", path, reason)
  if not used:
    raise QuantizationError(
      f"int8 calibration needs at least one image that decodes; none of {len(chosen)} did"
    )
  return _build(extractor, items, [[p, fileio.sha256_file(p)] for p in used], sample)


def calibrate_arrays(
  extractor, pixels: Sequence[np.ndarray], keys: Sequence[str], sample: int = DEFAULT_SAMPLE
) -> QuantizedModel:
  """`calibrate` for images held as `[H, W, 3]` uint8 RGB arrays (benchmarks), named by `keys`.

  The sample is evenly spaced over the sorted keys; each array is prepared by the extractor's
  policy (as `Extractor.extract_arrays` does) and recorded with the sha256 of its pixels.
  """
  _check(extractor, sample)
  if len(keys) != len(pixels):
    raise ValueError(f"{len(keys)} keys for {len(pixels)} images")
  position = {k: i for i, k in enumerate(keys)}
  chosen = sample_evenly(list(position), sample)
  _say_if_short(sample, len(chosen))
  if not chosen:
    raise QuantizationError("int8 calibration needs at least one image")
  items, record = [], []
  for key in chosen:
    px = images.from_array(np.asarray(pixels[position[key]], np.uint8), extractor.preprocessing)
    items += _inputs(extractor, px)
    record.append([key, hashlib.sha256(np.ascontiguousarray(px).tobytes()).hexdigest()])
  return _build(extractor, items, record, sample)


def _check(extractor, sample: int) -> None:
  if sample < 1:
    raise QuantizationError(f"the int8 calibration sample must hold at least 1 image, got {sample}")
  why = unavailable_reason(extractor.descriptor.name)
  if why is not None:
    raise QuantizationError(f"int8 extraction: {why}")
  reference_shape(extractor)


def _say_if_short(sample: int, have: int) -> None:
  if have < sample:
    logging.warning(
      "int8 calibration: %d images asked for, only %d available; calibrating on all of them",
      sample,
      have,
    )


def _build(extractor, items: list, images_record: list, sample: int) -> QuantizedModel:
  """The model quantised on `items` (from the cache when built before), with its record."""
  shape = reference_shape(extractor)
  size = extractor.preprocessing.size
  key = {
    "quant_version": QUANT_VERSION,
    "export": backends.export_key(extractor, size, size),
    "input_shape": shape,
    "scales": list(extractor.scales),
    "preset": PRESET,
    "images": images_record,
    **versions(),
  }
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  extra = {
    "precision": "int8",
    "export_key": key["export"],
    "method": f"nncf.quantize, preset {PRESET}, target CPU",
    "input_shape": shape,
    "calibration": {
      "sample_asked": int(sample),
      "sample_used": len(images_record),
      "images": images_record,
      "inputs": sorted({tuple(x.shape[1:3]) for x in items}),
      "key_sha256": digest,
    },
    **versions(),
  }
  cached = _from_cache(digest)
  if cached is not None:
    logging.info("int8 model %s from the cache (calibration %s)", cached.sha256[:16], digest[:12])
    # The same files (and sha256); the record says how this run asked for them.
    return QuantizedModel(
      cached.xml, cached.weights, _model_record(cached.xml, cached.weights, extra)
    )
  logging.info("int8 calibration on %d images (%d inputs)", len(images_record), len(items))
  xml, weights = _quantize(extractor, shape, items)
  model = QuantizedModel(xml, weights, _model_record(xml, weights, extra))
  backends.build_counts["quantize"] += 1
  _to_cache(digest, model)
  return model


def _quantize(extractor, shape: list, items: list) -> tuple[bytes, bytes]:
  nncf = _nncf()
  ov = backends.import_openvino()
  size = extractor.preprocessing.size
  onnx_path = backends.exported_onnx(extractor, size, size)
  core = ov.Core()
  model = core.read_model(onnx_path)
  model.reshape({0: shape})
  std_logging.getLogger("nncf").setLevel(std_logging.WARNING)
  # NNCF draws progress bars on stdout, which belongs to the binaries' results.
  with contextlib.redirect_stdout(sys.stderr):
    quantized = nncf.quantize(
      model,
      nncf.Dataset(items),
      preset=nncf.QuantizationPreset.PERFORMANCE,
      target_device=nncf.TargetDevice.CPU,
      subset_size=len(items),
      ignored_scope=nncf.IgnoredScope(types=list(HEAD_OPS), validate=False),
    )
  with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
    path = os.path.join(tmp, "model.xml")
    ov.save_model(quantized, path, compress_to_fp16=False)
    with open(path, "rb") as f:
      xml = f.read()
    with open(os.path.join(tmp, "model.bin"), "rb") as f:
      weights = f.read()
  return xml, weights


def _cache_paths(digest: str) -> dict[str, str] | None:
  if not fileio.caches_enabled():
    return None
  folder = os.path.join(fileio.cache_root(), CACHE_DIR)
  return {k: os.path.join(folder, f"{digest[:32]}.{k}") for k in ("xml", "bin", "json")}


def _from_cache(digest: str) -> QuantizedModel | None:
  paths = _cache_paths(digest)
  if paths is None or not os.path.isfile(paths["json"]):
    return None
  try:
    with open(paths["json"], encoding="utf-8") as f:
      record = json.load(f)
    if record.get("calibration", {}).get("key_sha256") != digest:
      raise ValueError("the record is of another calibration")
    return _checked(paths["xml"], paths["bin"], record)
  except (OSError, ValueError, KeyError, QuantizationError) as e:
    logging.warning("int8 cache entry %s is unusable (%s); quantising again", paths["json"], e)
    return None


def _to_cache(digest: str, model: QuantizedModel) -> None:
  paths = _cache_paths(digest)
  if paths is None:
    return
  try:
    os.makedirs(os.path.dirname(paths["json"]), exist_ok=True)
    fileio.atomic_write(paths["xml"], lambda f: f.write(model.xml))
    fileio.atomic_write(paths["bin"], lambda f: f.write(model.weights))
    fileio.atomic_write_json(paths["json"], model.record)  # last: the entry's commit point
  except OSError as e:
    logging.warning("could not cache the int8 model (%s)", e)


def _read(path: str, what: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise QuantizationError(f"the int8 model's {what} file {path} is missing") from None
  except OSError as e:
    raise QuantizationError(f"cannot read the int8 model's {what} file {path}: {e}") from None


def _checked(xml_path: str, bin_path: str, record: dict) -> QuantizedModel:
  xml, weights = _read(xml_path, "xml"), _read(bin_path, "bin")
  want = record["file_sha256"]
  for what, path, data in (("xml", xml_path, xml), ("bin", bin_path, weights)):
    have = hashlib.sha256(data).hexdigest()
    if have != want[what]:
      raise QuantizationError(
        f"the int8 model file {path} fails its checksum (sha256 {have[:16]}..., recorded "
        f"{want[what][:16]}...)"
      )
  model = QuantizedModel(xml, weights, record)
  if _model_record(xml, weights, {})["sha256"] != record["sha256"]:
    raise QuantizationError(f"the int8 model {xml_path} does not match its recorded sha256")
  return model


def save(model: QuantizedModel, folder: str) -> list[str]:
  """Writes the model's files into `folder` atomically (unless present and intact); returns
  their names."""
  os.makedirs(folder, exist_ok=True)
  names = model.files
  for what, data in (("xml", model.xml), ("bin", model.weights)):
    path = os.path.join(folder, names[what])
    try:
      intact = fileio.sha256_file(path) == model.record["file_sha256"][what]
    except OSError:
      intact = False
    if not intact:
      fileio.atomic_write(path, lambda f, data=data: f.write(data))
  return [names["xml"], names["bin"]]


def load(folder: str, record: dict) -> QuantizedModel:
  """The model `record` describes, from `folder` (an index), every sha256 checked.

  Raises:
    QuantizationError: a file missing or damaged, or a record that describes no model.
  """
  try:
    files = record["files"]
    xml_name, bin_name = files["xml"], files["bin"]
    if any(os.path.basename(n) != n or not n.startswith(FILE_PREFIX) for n in (xml_name, bin_name)):
      raise ValueError(f"unexpected file names {xml_name!r}, {bin_name!r}")
    digests = record["file_sha256"]
    if not isinstance(record["sha256"], str) or not {"xml", "bin"} <= set(digests):
      raise ValueError("no sha256 of the model or of its files")
  except (KeyError, TypeError, ValueError) as e:
    raise QuantizationError(f"{folder}: the int8 record describes no model ({e!r})") from None
  try:
    return _checked(os.path.join(folder, xml_name), os.path.join(folder, bin_name), record)
  except QuantizationError as e:
    raise QuantizationError(
      f"{e}: the index's int8 descriptors were computed with that model; restore it from a "
      "backup or build a new index (it is never quantised again silently)"
    ) from None
