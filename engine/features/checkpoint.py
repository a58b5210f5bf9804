"""Converted weights on disk: an orbax checkpoint plus `weights.json` recording where they came from.

Layout of a weights folder:

    DIR/weights.json   {"format_version", "config", "source", "source_file", "source_sha256",
                        "convention", "fingerprint"}
    DIR/params/        orbax StandardCheckpointer output of the model's nnx.Param state

`fingerprint` is the sha256 of every parameter (name, dtype, shape, bytes), checked on load; indexes
record it so a query is never answered with features from other weights.

Seeded random weights (`random[:SEED]`) are built once and cached under the engine's cache root
(`random-weights/`): an uncompressed `.npz` of the parameters (read without pickles) and a JSON
record of its sha256, keyed by everything the initialisation depends on (model config, seed, jax
and flax versions). A file that does not match its checksum is rebuilt with one warning;
`$VGG_RETRIEVAL_NO_CACHE=1` builds them afresh every time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from engine.common import fileio
from engine.common.errors import UserError
from engine.common.fileio import atomic_write_json, current_umask, fsync_dir
from engine.features import model as model_lib
from engine.features.preprocess import CONVENTIONS

FORMAT_VERSION = 1
WEIGHTS_JSON = "weights.json"
PARAMS_DIR = "params"
RANDOM_CONVENTION = "torch"
RANDOM_CACHE_DIR = "random-weights"
RANDOM_CACHE_VERSION = 1


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
  import orbax.checkpoint as ocp  # only here and in `load`: importing it costs a query 0.4 s

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
  import orbax.checkpoint as ocp

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


def random_info(config: model_lib.ModelConfig, seed: int = 0) -> WeightsInfo:
  return WeightsInfo(
    config=config.name,
    source="random",
    convention=RANDOM_CONVENTION,
    fingerprint=f"random:{config.name}:seed={seed}",
  )


def random(
  config: model_lib.ModelConfig, seed: int = 0, dtype=jnp.float32
) -> tuple[model_lib.VGG, WeightsInfo]:
  """Seeded random weights: NOT ImageNet; for demos and tests. Always built afresh."""
  return model_lib.init_random(config, seed, dtype), random_info(config, seed)


def random_cache_key(config: model_lib.ModelConfig, seed: int) -> dict:
  """Everything seeded random weights depend on: the same key gives the same parameters."""
  key = {
    "version": RANDOM_CACHE_VERSION,
    "config": dataclasses.asdict(config),
    "seed": int(seed),
    "jax": jax.__version__,
    "flax": flax.__version__,
  }
  return json.loads(json.dumps(key))  # as the JSON record reads back (tuples become lists)


def random_cache_paths(config: model_lib.ModelConfig, seed: int, root: str | None = None):
  """(`.npz` of the parameters, `.json` record with its sha256) in the cache."""
  key = random_cache_key(config, seed)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  stem = os.path.join(
    root or fileio.cache_root(), RANDOM_CACHE_DIR, f"{config.name}-{seed}-{digest}"
  )
  return stem + ".npz", stem + ".json"


def _param_leaves(state) -> tuple[list[str], list, object]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  return [jax.tree_util.keystr(p) for p, _ in leaves], [v for _, v in leaves], treedef


def _read_random(config, seed, dtype, root) -> model_lib.VGG | None:
  """The cached random model, or None when absent; raises ValueError when it fails its checks."""
  npz_path, json_path = random_cache_paths(config, seed, root)
  try:
    with open(json_path, encoding="utf-8") as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ValueError(f"{json_path}: unreadable ({e})") from e
  if not isinstance(record, dict) or record.get("key") != random_cache_key(config, seed):
    raise ValueError(f"{json_path}: records other weights")
  try:
    with open(npz_path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"{npz_path}: unreadable ({e})") from e
  if hashlib.sha256(data).hexdigest() != record.get("sha256"):
    raise ValueError(f"{npz_path}: checksum mismatch")
  graphdef, abstract, rest = nnx.split(model_lib.abstract_model(config, dtype), nnx.Param, ...)
  names, specs, treedef = _param_leaves(abstract)
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    if sorted(npz.files) != sorted(names):
      raise ValueError(f"{npz_path}: holds other parameters")
    arrays = [npz[n] for n in names]
  for n, a, spec in zip(names, arrays, specs, strict=True):
    if a.shape != spec.shape or a.dtype != spec.dtype:
      raise ValueError(f"{npz_path}: {n} is {a.dtype}{a.shape}, want {spec.dtype}{spec.shape}")
  params = jax.tree_util.tree_unflatten(treedef, jax.device_put(arrays))
  return nnx.merge(graphdef, params, rest)


def _write_random(model: model_lib.VGG, config, seed, root) -> None:
  npz_path, json_path = random_cache_paths(config, seed, root)
  names, values, _ = _param_leaves(nnx.state(model, nnx.Param))
  arrays = dict(zip(names, (np.asarray(jax.device_get(v)) for v in values), strict=True))
  os.makedirs(os.path.dirname(npz_path), exist_ok=True)
  fileio.atomic_write(npz_path, lambda f: np.savez(f, **arrays))
  # The record, written last, is the commit point: it names the bytes now on disk.
  record = {"key": random_cache_key(config, seed), "sha256": fileio.sha256_file(npz_path)}
  atomic_write_json(json_path, record)


def cached_random(
  config: model_lib.ModelConfig, seed: int = 0, dtype=jnp.float32, *, root: str | None = None
) -> tuple[model_lib.VGG, WeightsInfo]:
  """`random(config, seed, dtype)`, read from the engine's cache when there (else built and
  written there). A cached file that fails its checks is rebuilt with one warning; with
  `$VGG_RETRIEVAL_NO_CACHE` set, or a cache that cannot be written, the weights are just built.
  """
  info = random_info(config, seed)
  if not fileio.caches_enabled():
    return model_lib.init_random(config, seed, dtype), info
  try:
    model = _read_random(config, seed, dtype, root)
  except ValueError as e:
    logging.warning("cached random weights are damaged (%s); rebuilding them", e)
    model = None
  if model is not None:
    return model, info
  model = model_lib.init_random(config, seed, dtype)
  try:
    _write_random(model, config, seed, root)
  except OSError as e:
    logging.warning("cannot cache random weights under %s (%s)", root or fileio.cache_root(), e)
  return model, info


def _random_seed(spec: str) -> int | None:
  """The seed of `random` / `random:SEED`, None for any other spec."""
  if not (spec == "random" or spec.startswith("random:")):
    return None
  try:
    return int(spec.split(":", 1)[1]) if ":" in spec else 0
  except ValueError as e:
    raise WeightsError(f"bad random seed in --weights={spec!r} (want random:INT)") from e


def resolve_info(spec: str, config: str = "vgg16") -> WeightsInfo:
  """What `resolve(spec, config)` would give as info, without loading any parameter."""
  seed = _random_seed(spec)
  if seed is not None:
    return random_info(model_lib.ModelConfig.by_name(config), seed)
  _check_folder(spec)
  info = read_info(spec)
  try:
    model_lib.ModelConfig.by_name(info.config)
  except ValueError as e:
    raise WeightsError(f"{spec}: {e}") from e
  return info


def resolve(spec: str, config: str = "vgg16", dtype=jnp.float32):
  """`random`, `random:SEED` or a weights folder -> (model, info)."""
  seed = _random_seed(spec)
  if seed is not None:
    return cached_random(model_lib.ModelConfig.by_name(config), seed, dtype)
  _check_folder(spec)
  return load(spec, dtype)


def _check_folder(spec: str) -> None:
  if not os.path.isdir(spec):
    raise WeightsError(
      f"weights folder {spec!r} does not exist; convert a published file with "
      "`python -m weights.convert`, fetch one with `python -m weights.fetch`, or use "
      "--weights=random"
    )
