"""Converts a published VGG-16 weights file into an engine weights folder.

    python -m weights.convert --source=keras_h5|torchvision|timm --input=FILE --output=DIR \
        [--config=vgg16|tiny] [--overwrite]

Each source has a table from its own parameter names to (path in the model's `nnx.Param` state,
transform), and the transforms are data too (`TRANSFORMS`): OIHW -> HWIO for torch convolutions, a
transpose for torch `Linear`, and for `fc1` the permutation from torch's (C, H, W) flatten order to
the engine's (H, W, C). Conversion is strict: every missing parameter, every unused key in the file
and every shape mismatch is collected, then reported together in one error.

File formats are detected from the file's first bytes, so a source's table works with any container
its publisher uses: HDF5 (Keras), a torch zip/pickle (read only with
`torch.load(weights_only=True)`, never unpickled otherwise) or safetensors.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

from engine.common.errors import UserError
from engine.common.fileio import sha256_file
from engine.features import checkpoint
from engine.features import model as model_lib
from weights import sources

Shape = tuple[int, ...]
Target = tuple[str, str]  # (module name, "kernel" | "bias") in the model's nnx.Param state


class ConvertError(UserError):
  """A file that cannot be converted; str() is one line a person can act on."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """How one source array becomes one model parameter.

  Attributes:
    name: key in TRANSFORMS, used in the tables.
    apply: (source array, config) -> array in the model's layout.
    source_shape: (model parameter shape, config) -> the shape the source array must have.
  """

  name: str
  apply: Callable[[np.ndarray, model_lib.ModelConfig], np.ndarray]
  source_shape: Callable[[Shape, model_lib.ModelConfig], Shape]


def _pool5_side(config: model_lib.ModelConfig) -> int:
  return config.image_size // 32


def _chw_rows_to_hwc(w_ocss: np.ndarray) -> np.ndarray:
  """`[O, C, S, S]` -> `[S * S * C, O]`: rows in the engine's (H, W, C) flatten order."""
  return w_ocss.transpose(2, 3, 1, 0).reshape(-1, w_ocss.shape[0])


def _torch_fc1(w_oi: np.ndarray, config: model_lib.ModelConfig) -> np.ndarray:
  side = _pool5_side(config)
  return _chw_rows_to_hwc(w_oi.reshape(w_oi.shape[0], config.last_channels, side, side))


TRANSFORMS: dict[str, Transform] = {
  t.name: t
  for t in (
    Transform("identity", lambda w, c: w, lambda s, c: s),
    # torch Conv2d [O, I, kh, kw] -> flax Conv [kh, kw, I, O].
    Transform(
      "oihw_to_hwio",
      lambda w, c: w.transpose(2, 3, 1, 0),
      lambda s, c: (s[3], s[2], s[0], s[1]),
    ),
    # torch Linear [out, in] -> flax Linear [in, out].
    Transform("linear_to_dense", lambda w, c: w.T, lambda s, c: (s[1], s[0])),
    # torchvision's fc1: a Linear on pool5 flattened in (C, H, W) order.
    Transform("torch_fc1_to_dense", _torch_fc1, lambda s, c: (s[1], s[0])),
    # timm's pre_logits.fc1: a Conv2d(C, O, S) over the S x S pool5, i.e. the same matrix unflattened.
    Transform(
      "conv_fc1_to_dense",
      lambda w, c: _chw_rows_to_hwc(w),
      lambda s, c: (s[1], c.last_channels, _pool5_side(c), _pool5_side(c)),
    ),
    # timm's pre_logits.fc2: a 1x1 Conv2d [O, I, 1, 1].
    Transform(
      "conv1x1_to_dense",
      lambda w, c: w[:, :, 0, 0].T,
      lambda s, c: (s[1], s[0], 1, 1),
    ),
  )
}

Table = dict[str, tuple[Target, str]]


def keras_table(config: model_lib.ModelConfig) -> Table:
  """Keras application layout: `block{b}_conv{i}`, `fc1`, `fc2`, `predictions`, HWIO kernels."""
  table: Table = {}
  for name in config.conv_names:
    block, i = name[4:].split("_")
    for role in ("kernel", "bias"):
      table[f"block{block}_conv{i}/{role}"] = ((name, role), "identity")
  for src, dst in (("fc1", "fc1"), ("fc2", "fc2"), ("predictions", "logits")):
    for role in ("kernel", "bias"):
      table[f"{src}/{role}"] = ((dst, role), "identity")
  return table


def _torch_features(config: model_lib.ModelConfig) -> Table:
  """`features.{n}` of torchvision's Sequential: conv, ReLU per layer, a max-pool per block."""
  table: Table = {}
  index = 0
  for b, widths in enumerate(config.blocks):
    for i in range(len(widths)):
      name = f"conv{b + 1}_{i + 1}"
      table[f"features.{index}.weight"] = ((name, "kernel"), "oihw_to_hwio")
      table[f"features.{index}.bias"] = ((name, "bias"), "identity")
      index += 2
    index += 1
  return table


def torchvision_table(config: model_lib.ModelConfig) -> Table:
  """torchvision `VGG`: `features.*`, `classifier.{0,3,6}` (Linear; fc1 sees C, H, W order)."""
  table = _torch_features(config)
  for idx, dst, transform in (
    (0, "fc1", "torch_fc1_to_dense"),
    (3, "fc2", "linear_to_dense"),
    (6, "logits", "linear_to_dense"),
  ):
    table[f"classifier.{idx}.weight"] = ((dst, "kernel"), transform)
    table[f"classifier.{idx}.bias"] = ((dst, "bias"), "identity")
  return table


def timm_table(config: model_lib.ModelConfig) -> Table:
  """timm `VGG`: `features.*`, `pre_logits.fc1/fc2` (Conv2d), `head.fc` (Linear)."""
  table = _torch_features(config)
  for src, dst, transform in (
    ("pre_logits.fc1", "fc1", "conv_fc1_to_dense"),
    ("pre_logits.fc2", "fc2", "conv1x1_to_dense"),
    ("head.fc", "logits", "linear_to_dense"),
  ):
    table[f"{src}.weight"] = ((dst, "kernel"), transform)
    table[f"{src}.bias"] = ((dst, "bias"), "identity")
  return table


TABLES: dict[str, Callable[[model_lib.ModelConfig], Table]] = {
  "keras_h5": keras_table,
  "torchvision": torchvision_table,
  "timm": timm_table,
}

PRESETS = tuple(model_lib.PRESETS)


# --- Readers: file -> {key: array}. ---------------------------------------------------------------


def _attr_strings(group, name: str) -> list[str] | None:
  """A Keras string-list attribute, also when Keras split it into `name0`, `name1`, ... chunks."""
  if name in group.attrs:
    values = list(group.attrs[name])
  elif f"{name}0" in group.attrs:
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
      values += list(group.attrs[f"{name}{chunk}"])
      chunk += 1
  else:
    return None
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


_KERNEL = re.compile(r"(^|_)(kernel|W)(_\d+)?$")
_BIAS = re.compile(r"(^|_)(bias|b)(_\d+)?$")


def _weight_role(weight_name: str) -> str:
  """`block1_conv1_W_1:0`, `block1_conv1/kernel:0`, `kernel` -> `kernel`; biases -> `bias`."""
  base = re.sub(r":\d+$", "", weight_name.rsplit("/", 1)[-1])
  if _KERNEL.search(base):
    return "kernel"
  if _BIAS.search(base):
    return "bias"
  return base


def _dataset_names(group) -> list[str]:
  import h5py

  names = []
  group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
  return names


def read_keras_h5(path: str) -> dict[str, np.ndarray]:
  """Reads a Keras legacy HDF5 weights file into `{"{layer}/kernel" | "{layer}/bias": array}`.

  The official file lists its layers in the root attribute `layer_names` and each layer's datasets
  in the layer group's `weight_names` (paths relative to that group: `block1_conv1_W_1:0` in the
  Keras 1 file, `block1_conv1/kernel:0` from Keras 2, `block1_conv1/kernel` from Keras 3). Files
  without those attributes are walked instead. A full-model file's `model_weights` group works too.
  """
  import h5py

  out: dict[str, np.ndarray] = {}
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ConvertError(f"{path}: not a readable HDF5 file ({e})") from e
  with f:
    root = f.get("model_weights", f)
    layer_names = _attr_strings(root, "layer_names")
    if layer_names is None:
      layer_names = [k for k in root if isinstance(root[k], h5py.Group)]
    for layer in layer_names:
      if layer not in root:
        out[f"{layer} (listed in layer_names, no such group)"] = np.zeros((0,))
        continue
      group = root[layer]
      weight_names = _attr_strings(group, "weight_names")
      if weight_names is None:
        weight_names = _dataset_names(group)
      for weight_name in weight_names:
        key = f"{layer}/{_weight_role(weight_name)}"
        if weight_name not in group:
          key = f"{layer}/{weight_name} (listed in weight_names, no such dataset)"
          out[key] = np.zeros((0,))
          continue
        if key in out:
          key = f"{layer}/{weight_name}"
        out[key] = np.asarray(group[weight_name])
  return out


def read_torch(path: str) -> dict[str, np.ndarray]:
  """Reads a torch state dict with `torch.load(weights_only=True)` (no arbitrary unpickling)."""
  try:
    import torch
  except ImportError as e:
    raise ConvertError(
      f"{path} is a PyTorch file; reading it safely needs PyTorch: pip install torch"
    ) from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
    msg = " ".join(str(e).split())[:300]
    raise ConvertError(f"{path}: not a loadable PyTorch state dict ({msg})") from e
  if (
    isinstance(state, Mapping)
    and "state_dict" in state
    and isinstance(state["state_dict"], Mapping)
  ):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ConvertError(f"{path}: holds a {type(state).__name__}, not a state dict")
  out = {}
  for key, value in state.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.is_floating_point() and value.dtype != torch.float32:
        value = value.float()
      out[str(key)] = value.numpy()
    else:
      out[f"{key} (not a tensor)"] = np.zeros((0,))
  return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file with the numpy API."""
  from safetensors.numpy import load_file

  try:
    return dict(load_file(path))
  except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
    raise ConvertError(f"{path}: not a readable safetensors file ({e})") from e


def read_file(path: str) -> dict[str, np.ndarray]:
  """Any supported container, detected from its first bytes."""
  with open(path, "rb") as f:
    head = f.read(9)
  if head.startswith(b"\x89HDF\r\n\x1a\n"):
    return read_keras_h5(path)
  if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip, or legacy pickle
    return read_torch(path)
  if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
    return read_safetensors(path)
  raise ConvertError(f"{path}: unknown file format (expected HDF5, a PyTorch file or safetensors)")


# --- Conversion. ---------------------------------------------------------------------------------


def _param_shapes(config: model_lib.ModelConfig) -> dict[Target, Shape]:
  params = nnx.state(model_lib.abstract_model(config), nnx.Param)
  return {
    tuple(map(str, path)): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(params)
  }


def _expected_shapes(table: Table, config: model_lib.ModelConfig) -> dict[str, Shape]:
  targets = _param_shapes(config)
  return {
    key: tuple(TRANSFORMS[tname].source_shape(targets[target], config))
    for key, (target, tname) in table.items()
  }


def infer_config(source: str, arrays: Mapping[str, np.ndarray]) -> model_lib.ModelConfig:
  """The preset whose expected shapes match the most arrays (all of them for a good file)."""
  best, best_score = None, -1
  for name in PRESETS:
    config = model_lib.ModelConfig.by_name(name)
    expected = _expected_shapes(TABLES[source](config), config)
    score = sum(k in arrays and tuple(arrays[k].shape) == s for k, s in expected.items())
    if score > best_score:
      best, best_score = config, score
  return best


def _short(items: list[str], limit: int = 40) -> str:
  more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def to_model(
  source: str,
  arrays: Mapping[str, np.ndarray],
  config: model_lib.ModelConfig | None = None,
) -> model_lib.VGG:
  """Maps a source's arrays onto the model, strictly.

  Args:
    source: a key of TABLES.
    arrays: source key -> array, as the readers return them.
    config: the model preset; inferred from the arrays' shapes when None.

  Returns:
    A float32 VGG holding exactly the file's parameters.

  Raises:
    ConvertError: naming every missing key, unused key and shape mismatch at once.
  """
  if source not in TABLES:
    raise ConvertError(f"unknown source {source!r}; known: {', '.join(sorted(TABLES))}")
  config = config or infer_config(source, arrays)
  table = TABLES[source](config)
  expected = _expected_shapes(table, config)
  targets = _param_shapes(config)

  missing = sorted(k for k in table if k not in arrays)
  unused = sorted(k for k in arrays if k not in table)
  mismatched = []
  for key in sorted(k for k in table if k in arrays):
    arr = arrays[key]
    if tuple(arr.shape) != expected[key]:
      mismatched.append(f"{key} {list(arr.shape)} (want {list(expected[key])})")
    elif not np.issubdtype(arr.dtype, np.floating):
      mismatched.append(f"{key} dtype {arr.dtype} (want floating point)")
  uncovered = sorted("/".join(t) for t in set(targets) - {t for t, _ in table.values()})
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {_short(missing)}")
  if unused:
    problems.append(f"{len(unused)} unused: {_short(unused)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatches: {_short(mismatched)}")
  if uncovered:
    problems.append(f"{len(uncovered)} model parameters with no source: {_short(uncovered)}")
  if problems:
    raise ConvertError(
      f"the arrays do not match the {source} layout of {config.name}: " + "; ".join(problems)
    )

  values: dict[Target, np.ndarray] = {}
  for key, (target, tname) in table.items():
    value = TRANSFORMS[tname].apply(np.asarray(arrays[key], np.float32), config)
    assert value.shape == targets[target], (key, value.shape, targets[target])
    values[target] = np.ascontiguousarray(value)

  abstract = model_lib.abstract_model(config)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  filled = [
    (path, var.replace(jnp.asarray(values[tuple(map(str, path))])))
    for path, var in nnx.to_flat_state(params)
  ]
  return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


def convert(
  source: str,
  input_path: str | os.PathLike,
  output_dir: str | os.PathLike,
  *,
  config: str | None = None,
  overwrite: bool = False,
) -> checkpoint.WeightsInfo:
  """Converts a published weights file into a weights folder.

  Args:
    source: `keras_h5`, `torchvision` or `timm` (selects the table and the pixel convention).
    input_path: the published file.
    output_dir: the weights folder to write (orbax checkpoint plus weights.json).
    config: `vgg16` or `tiny`; inferred from the file's shapes when None.
    overwrite: replace an existing output folder.

  Returns:
    The provenance recorded in the folder (source, file name, sha256, convention, fingerprint).

  Raises:
    ConvertError: unreadable file, wrong layout (every problem listed), or bad arguments.
    checkpoint.WeightsError: the output folder exists and overwrite is False.
  """
  try:
    src = sources.get(source)
  except ValueError as e:
    raise ConvertError(str(e)) from e
  input_path = os.fspath(input_path)
  if not os.path.isfile(input_path):
    raise ConvertError(f"input file {input_path} does not exist")
  if os.path.exists(output_dir) and not overwrite:
    raise ConvertError(f"output {os.fspath(output_dir)} already exists (pass --overwrite)")
  model_config = None
  if config is not None:
    try:
      model_config = model_lib.ModelConfig.by_name(config)
    except ValueError as e:
      raise ConvertError(str(e)) from e
  try:
    arrays = read_file(input_path)
  except OSError as e:
    raise ConvertError(f"{input_path}: cannot read ({e})") from e
  try:
    model = to_model(source, arrays, model_config)
  except ConvertError as e:
    raise ConvertError(f"{input_path}: {e}") from e
  del arrays
  return checkpoint.save(
    model,
    output_dir,
    source=source,
    convention=src.convention,
    source_file=os.path.basename(input_path),
    source_sha256=sha256_file(input_path),
    overwrite=overwrite,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    info = convert(
      _SOURCE.value,
      _INPUT.value,
      _OUTPUT.value,
      config=_CONFIG.value,
      overwrite=_OVERWRITE.value,
    )
  except UserError as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(
    f"wrote {os.path.abspath(_OUTPUT.value)} ({info.config}, source {info.source}, "
    f"convention {info.convention}, sha256 {info.source_sha256})"
  )


if __name__ == "__main__":
  from absl import flags

  _SOURCE = flags.DEFINE_enum("source", None, sorted(TABLES), "Which published file this is.")
  _INPUT = flags.DEFINE_string("input", None, "The published weights file.")
  _OUTPUT = flags.DEFINE_string("output", None, "Weights folder to write.")
  _CONFIG = flags.DEFINE_enum(
    "config", None, list(PRESETS), "Model preset; inferred from the file when unset."
  )
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")
  flags.mark_flags_as_required(["source", "input", "output"])
  app.run(main)
