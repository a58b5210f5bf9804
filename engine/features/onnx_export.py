"""Exports the extraction function (uint8 pixels -> descriptors) to ONNX.

The exported graph is `engine.features.forward` with the weights closed over as constants: input
`pixels` `[B, H, W, 3]` uint8 RGB, the weights' pixel convention, the network up to the
descriptor's tap, pooling and L2 normalisation; output `descriptors` `[B, D]` float32. The network
is always exported in float32; a runtime picks its own compute precision (OpenVINO's
`INFERENCE_PRECISION_HINT`). The batch may be left symbolic (`B`). Height and width are fixed:
fc1/fc2/pool5 need the model's input size, and R-MAC's regions depend on the map's shape. The
model's provenance (weights fingerprint, convention, descriptor) is written into the file's
metadata. The binary is `engine.export`.

Export uses jax2onnx (`pip install jax2onnx`; see the `cpu` extra in pyproject.toml).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from engine.common.fileio import atomic_write
from engine.features.forward import with_weights

INPUT_NAME = "pixels"
OUTPUT_NAME = "descriptors"
BATCH_DIM = "B"
FORMATS = ("onnx",)


def input_shape(extractor, batch_size: int | None = None, height=None, width=None) -> tuple:
  """(B, H, W, 3) the export takes: defaults from the extractor's preprocessing.

  With `keep_aspect` the default is the square bucket (size x size); pass height and width for
  another bucket.
  """
  size = extractor.preprocessing.size
  height, width = height or size, width or size
  if extractor.descriptor.needs_fixed_size and (height, width) != (size, size):
    raise ValueError(
      f"descriptor {extractor.descriptor.name} needs {size}x{size} inputs, got {height}x{width}"
    )
  if height < 32 or width < 32:
    raise ValueError(f"height and width must be >= 32, got {height}x{width}")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"batch_size must be >= 1 or None (symbolic), got {batch_size}")
  return (batch_size, height, width, 3)


@contextlib.contextmanager
def _jax2onnx_call_conventions():
  """Adapts two of jax2onnx's patched functions to how this project calls them, while tracing.

  jax2onnx (0.17) swaps `flax.nnx.max_pool` for a version whose `window_shape` is keyword-only
  (the model passes it positionally), and its `jnp.power` cannot broadcast a symbolic batch
  dimension. Both adapters bind the primitives the originals would (`jnp.power(x, p)` traces to
  `lax.pow(x, float32 p)` for a float p, `lax.integer_pow` for an int), so the exported numbers are
  unchanged.
  """
  patched_pool, patched_power = nnx.max_pool, jnp.power

  def max_pool(inputs, window_shape, strides=None, padding="VALID"):
    return patched_pool(inputs, window_shape=window_shape, strides=strides, padding=padding)

  def power(x, y):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      if isinstance(y, int) and not isinstance(y, bool):
        return jax.lax.integer_pow(x, y)
      if isinstance(y, float):
        return jax.lax.pow(x, jnp.asarray(y, jnp.result_type(x)))
    return patched_power(x, y)

  nnx.max_pool, jnp.power = max_pool, power
  try:
    yield
  finally:
    nnx.max_pool, jnp.power = patched_pool, patched_power


def _import_jax2onnx_plugins() -> None:
  """Registers jax2onnx's plugins except Equinox's, once per process.

  jax2onnx imports every plugin on first use, and its Equinox plugins run JAX computations at
  import time (seconds of start-up): this model needs none of them. Relies on jax2onnx 0.17
  internals; if they change, jax2onnx's own import of everything runs instead. Plugins for
  libraries that are not installed (Equinox, dm-pix) are skipped, as jax2onnx itself does.
  """
  try:
    import pathlib

    from jax2onnx.plugins import plugin_system
  except ImportError:
    return
  if getattr(plugin_system, "_already_imported_plugins", True):
    return
  root = pathlib.Path(plugin_system.__file__).parent
  for py in sorted(root.rglob("*.py")):
    rel = py.relative_to(root).with_suffix("").parts
    if rel[0] == "equinox" or py.name in ("__init__.py", "plugin_system.py"):
      continue
    try:
      importlib.import_module(".".join(("jax2onnx.plugins", *rel)))
    except Exception:  # noqa: BLE001 - like jax2onnx: a plugin whose library is missing is skipped
      continue
  plugin_system._already_imported_plugins = True


def to_onnx(
  fn: Callable[[jax.Array], jax.Array],
  shape: tuple,
  *,
  metadata: dict | None = None,
  model_name: str = "vgg_retrieval",
):
  """Converts `fn` (`[B, H, W, 3]` uint8 -> `[B, D]`) to an `onnx.ModelProto`.

  Args:
    fn: a jax-traceable function of one uint8 array.
    shape: `(B, H, W, 3)`; B None for a symbolic batch.
    metadata: string key -> JSON-able value, stored in the model's metadata_props.
    model_name: the graph's name.
  """
  try:
    import jax2onnx
  except ImportError as e:
    raise ImportError(
      "ONNX export needs jax2onnx: pip install jax2onnx onnx (or the project's `cpu` extra)"
    ) from e
  # jax2onnx logs a warning per untyped shape constant; they are harmless.
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)
  _import_jax2onnx_plugins()

  def traced(pixels):
    with _jax2onnx_call_conventions():
      return fn(pixels)

  batch = BATCH_DIM if shape[0] is None else int(shape[0])
  proto = jax2onnx.to_onnx(
    traced,
    [jax.ShapeDtypeStruct((batch, *shape[1:]), jnp.uint8)],
    model_name=model_name,
    input_names=[INPUT_NAME],
    output_names=[OUTPUT_NAME],
  )
  for key, value in (metadata or {}).items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
  return proto


def export_metadata(extractor, shape: tuple) -> dict:
  """What the exported file records about its provenance (a subset of the extractor fingerprint)."""
  return {
    "engine.weights_fingerprint": extractor.weights_info.fingerprint,
    "engine.weights_source": extractor.weights_info.source,
    "engine.model": extractor.config.name,
    "engine.convention": extractor.preprocessing.convention,
    "engine.descriptor": extractor.descriptor.to_dict(),
    "engine.input": {
      "name": INPUT_NAME,
      "shape": [BATCH_DIM if shape[0] is None else shape[0], *shape[1:]],
      "dtype": "uint8",
      "layout": "NHWC RGB in [0, 255]",
    },
  }


def export_onnx(
  extractor,
  path: str | os.PathLike | None = None,
  *,
  batch_size: int | None = None,
  height: int | None = None,
  width: int | None = None,
):
  """Exports an Extractor's computation (without whitening) to ONNX.

  Args:
    extractor: an `engine.Extractor`; its weights, descriptor and pixel convention are exported
      (in float32 whatever its precision).
    path: if given, the model is written there atomically.
    batch_size: fixed batch, or None for a symbolic one.
    height: input height; default the extractor's image size.
    width: input width; default the extractor's image size.

  Returns:
    the `onnx.ModelProto`.
  """
  shape = input_shape(extractor, batch_size, height, width)
  graphdef, state = extractor.graph(jnp.float32)
  fn = with_weights(
    graphdef,
    state,
    convention=extractor.preprocessing.convention,
    descriptor=extractor.descriptor,
  )
  proto = to_onnx(
    fn,
    shape,
    metadata=export_metadata(extractor, shape),
    model_name=f"{extractor.config.name}_{extractor.descriptor.name}",
  )
  if path is not None:
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
  return proto
