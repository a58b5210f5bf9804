"""Converted weights on disk: an orbax checkpoint plus `weights.json` recording where they came from.

Layout of a weights folder:

    DIR/weights.json   {"format_version", "config", "source", "source_file", "source_sha256",
                        "convention", "fingerprint"}
    DIR/params/        orbax StandardCheckpointer output of the model's nnx.Param state

`fingerprint` is the sha256 of every parameter (name, dtype, shape, bytes), checked on load; indexes
record it so a query is never answered with features from other weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from engine.common.errors import UserError
from engine.common.fileio import atomic_write_json, current_umask, fsync_dir
from engine.features import model as model_lib
from engine.features.preprocess import CONVENTIONS

FORMAT_VERSION = 1
WEIGHTS_JSON = "weights.json"
PARAMS_DIR = "params"
RANDOM_CONVENTION = "torch"


class WeightsError(UserError):
  """Missing, unreadable or inconsistent weights."""


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
  """Provenance of a set of weights.

  Attributes:
    config: model preset name (`vgg16`, `tiny`).
    source: `keras_h5`, `torchvision`, `timm` or `random`.
    convention: the pixel convention the weights expect (`caffe` or `torch`).
    fingerprint: sha256 of the parameters.
    source_file: name of the converted file, if any.
    source_sha256: sha256 of that file, if any.
  """

  config: str
  source: str
  convention: str
  fingerprint: str
  source_file: str | None = None
  source_sha256: str | None = None

  @property
  def is_random(self) -> bool:
    return self.source == "random"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def params_fingerprint(model: model_lib.VGG) -> str:
  h = hashlib.sha256()
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, var in sorted(flat, key=lambda kv: tuple(map(str, kv[0]))):
    arr = np.asarray(jax.device_get(var.get_value() if hasattr(var, "get_value") else var.value))
    h.update("/".join(map(str, path)).encode())
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def save(
  model: model_lib.VGG,
  out_dir: str | os.PathLike,
  *,
  source: str,
  convention: str,
  source_file: str | None = None,
  source_sha256: str | None = None,
  overwrite: bool = False,
) -> WeightsInfo:
  """Writes a weights folder atomically (built beside `out_dir`, then renamed into place)."""
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise WeightsError(f"{out_dir} already exists (pass overwrite to replace it)")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  info = WeightsInfo(
    config=model.config.name,
    source=source,
    convention=convention,
    fingerprint=params_fingerprint(model),
    source_file=source_file,
    source_sha256=source_sha256,
  )
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), nnx.state(model, nnx.Param))
    atomic_write_json(
      os.path.join(tmp, WEIGHTS_JSON), {"format_version": FORMAT_VERSION, **info.to_dict()}
    )
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0o700
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    fsync_dir(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return info


def read_info(path: str | os.PathLike) -> WeightsInfo:
  meta_path = os.path.join(path, WEIGHTS_JSON)
  if not os.path.isfile(meta_path):
    raise WeightsError(
      f"{path} is not a converted weights folder (no {WEIGHTS_JSON}); convert a published file "
      "with `python -m weights.convert` or use --weights=random"
    )
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f"{meta_path}: unreadable ({e})") from e
  if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
    raise WeightsError(f"{meta_path}: unsupported format (want format_version {FORMAT_VERSION})")
  fields = {f.name for f in dataclasses.fields(WeightsInfo)}
  try:
    info = WeightsInfo(**{k: v for k, v in meta.items() if k in fields})
  except TypeError as e:
    raise WeightsError(f"{meta_path}: missing fields ({e})") from e
  if info.convention not in CONVENTIONS:
    raise WeightsError(f"{meta_path}: unknown convention {info.convention!r}")
  return info


def load(path: str | os.PathLike, dtype=jnp.float32) -> tuple[model_lib.VGG, WeightsInfo]:
  """Restores a converted weights folder and verifies its fingerprint."""
  path = os.path.abspath(os.fspath(path))
  info = read_info(path)
  try:
    config = model_lib.ModelConfig.by_name(info.config)
  except ValueError as e:
    raise WeightsError(f"{path}: {e}") from e
  abstract = model_lib.abstract_model(config, dtype)
  graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(path, PARAMS_DIR), abstract_params)
  except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean "bad checkpoint"
    raise WeightsError(f"{path}/{PARAMS_DIR}: cannot restore checkpoint ({e})") from e
  model = nnx.merge(graphdef, params, rest)
  if params_fingerprint(model) != info.fingerprint:
    raise WeightsError(f"{path}: parameters do not match the fingerprint in {WEIGHTS_JSON}")
  return model, info


def random(
  config: model_lib.ModelConfig, seed: int = 0, dtype=jnp.float32
) -> tuple[model_lib.VGG, WeightsInfo]:
  """Seeded random weights: NOT ImageNet; for demos and tests."""
  model = model_lib.init_random(config, seed, dtype)
  info = WeightsInfo(
    config=config.name,
    source="random",
    convention=RANDOM_CONVENTION,
    fingerprint=f"random:{config.name}:seed={seed}",
  )
  return model, info


def resolve(spec: str, config: str = "vgg16", dtype=jnp.float32):
  """`random`, `random:SEED` or a weights folder -> (model, info)."""
  if spec == "random" or spec.startswith("random:"):
    seed = 0
    if ":" in spec:
      try:
        seed = int(spec.split(":", 1)[1])
      except ValueError as e:
        raise WeightsError(f"bad random seed in --weights={spec!r} (want random:INT)") from e
    return random(model_lib.ModelConfig.by_name(config), seed, dtype)
  if not os.path.isdir(spec):
    raise WeightsError(
      f"weights folder {spec!r} does not exist; convert a published file with "
      "`python -m weights.convert`, fetch one with `python -m weights.fetch`, or use "
      "--weights=random"
    )
  return load(spec, dtype)
