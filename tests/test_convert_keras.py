"""Keras 3's own VGG16 -> the official .h5 layout -> weights.convert -> the engine, tap by tap.

`keras.applications.VGG16` is an implementation nobody here wrote. It gets seeded random weights,
which are written in the layout of the published `vgg16_weights_tf_dim_ordering_tf_kernels.h5`
(Keras 1 naming): a root attribute `layer_names` listing every layer, one group per layer with a
`weight_names` attribute, and the datasets `{layer}_W_1:0` / `{layer}_b_1:0` directly in that group,
kernels already HWIO / [in, out]. Every tap must agree to 1e-5 relative, in float32.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported anywhere

import h5py
import numpy as np
import parity
import pytest

from engine.features import (
  checkpoint,
  preprocess,
)
from engine.features import model as model_lib
from weights import convert

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
  pytest.skip("keras was imported with another backend", allow_module_level=True)

# Keras layer name -> engine tap name.
TAP_NAMES = {
  **{f"block{b}_conv{i}": f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
     for i in range(1, n + 1)},
  **{f"block{b}_pool": f"pool{b}" for b in range(1, 6)},
  "fc1": "fc1",
  "fc2": "fc2",
}  # fmt: skip


def _randomize(model, seed: int) -> None:
  """He-normal kernels and non-zero biases, seeded, so every mapping is exercised."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    kernel, bias = weights
    fan_in = int(np.prod(kernel.shape[:-1]))
    kernel = rng.standard_normal(kernel.shape, dtype=np.float32) * np.float32(np.sqrt(2 / fan_in))
    bias = rng.standard_normal(bias.shape, dtype=np.float32) * np.float32(0.1)
    layer.set_weights([kernel, bias])


def write_official_layout(model, path) -> None:
  """The published file's structure: root `layer_names`, per-layer `weight_names`, flat datasets."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([layer.name.encode("utf8") for layer in model.layers])
    for layer in model.layers:
      group = f.create_group(layer.name)
      weights = layer.get_weights()
      names = [f"{layer.name}_W_1:0", f"{layer.name}_b_1:0"][: len(weights)]
      group.attrs["weight_names"] = np.array([n.encode("utf8") for n in names], dtype="S")
      for name, value in zip(names, weights, strict=True):
        group.create_dataset(name, data=value)


@pytest.fixture(scope="module")
def keras_vgg16(tmp_path_factory):
  keras.utils.set_random_seed(0)
  model = keras.applications.VGG16(weights=None)
  _randomize(model, seed=0)
  folder = tmp_path_factory.mktemp("keras")
  path = folder / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
  write_official_layout(model, path)
  info = convert.convert("keras_h5", path, folder / "converted")
  return model, path, folder / "converted", info


@pytest.mark.slow
def test_every_tap_matches_keras(keras_vgg16):
  model, path, converted, info = keras_vgg16
  assert (info.config, info.source, info.convention) == ("vgg16", "keras_h5", "caffe")
  assert info.source_file == path.name and len(info.source_sha256) == 64
  ours_model, loaded = checkpoint.load(converted)
  assert loaded == info

  predictions = model.get_layer("predictions")
  fc2 = model.get_layer("fc2").output
  linear = keras.layers.Dense(predictions.units, activation=None, name="logits_linear")
  outputs = {ours: model.get_layer(name).output for name, ours in TAP_NAMES.items()}
  outputs["logits"] = linear(fc2)
  outputs["softmax"] = model.output
  taps_model = keras.Model(model.input, outputs)
  linear.set_weights(predictions.get_weights())  # logits = predictions without its softmax

  config = model_lib.ModelConfig.vgg16()
  images = parity.random_images(config, batch=2, seed=7)
  x = keras.applications.vgg16.preprocess_input(images.astype(np.float32))
  ref = {k: np.asarray(v) for k, v in taps_model(x, training=False).items()}
  softmax_ref = ref.pop("softmax")

  ours = parity.engine_taps(ours_model, np.asarray(x, np.float32))
  errors = parity.assert_taps_match(ours, ref)
  logits = ours["logits"].astype(np.float64)
  softmax = np.exp(logits - logits.max(-1, keepdims=True))
  softmax /= softmax.sum(-1, keepdims=True)
  errors["softmax"] = parity.rel_err(softmax, softmax_ref)
  assert errors["softmax"] <= 1e-5
  print(f"\nkeras_h5 vgg16 max relative error per tap: {errors}")
  print(f"keras_h5 vgg16 worst: {max(errors.values()):.3g}")


@pytest.mark.slow
def test_keras3_own_legacy_h5_writer_converts_identically(keras_vgg16, tmp_path):
  """Keras 3's legacy writer nests datasets (`block1_conv1/kernel`); same parameters result."""
  legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
  model, _, _, info = keras_vgg16
  path = tmp_path / "keras3.h5"
  with h5py.File(path, "w") as f:
    legacy.save_weights_to_hdf5_group(f, model)
    first = f["block1_conv1"].attrs["weight_names"][0]
    assert (first.decode() if isinstance(first, bytes) else first) == "block1_conv1/kernel"
  again = convert.convert("keras_h5", path, tmp_path / "converted")
  assert again.fingerprint == info.fingerprint


def test_caffe_preprocessing_parity():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (2, 19, 13, 3), dtype=np.uint8)
  expected = keras.applications.vgg16.preprocess_input(images.astype(np.float32).copy())
  got = np.asarray(preprocess.normalize(images, "caffe"))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(expected), rtol=0, atol=1e-5)


def _tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
  """Random arrays in Keras layout for the tiny config, keyed `layer/kernel|bias`."""
  config = model_lib.ModelConfig.tiny()
  rng = np.random.default_rng(seed)
  shapes = convert._expected_shapes(convert.keras_table(config), config)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize(
  "style", ["keras1", "keras2", "keras3", "chunked_attrs", "no_attrs", "model_weights"]
)
def test_keras_h5_naming_styles(style, tmp_path):
  """Every way Keras has written weights to HDF5 reads back to the same parameters."""
  arrays = _tiny_arrays()
  layers = sorted({k.split("/")[0] for k in arrays})
  path = tmp_path / "w.h5"
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights") if style == "model_weights" else f
    names = np.array([b"input_1", *[n.encode() for n in layers], b"flatten"])
    if style == "chunked_attrs":
      root.attrs["layer_names0"], root.attrs["layer_names1"] = names[:5], names[5:]
    elif style != "no_attrs":
      root.attrs["layer_names"] = names
    for layer in ["input_1", *layers, "flatten"]:
      group = root.create_group(layer)
      if layer in ("input_1", "flatten"):
        if style != "no_attrs":
          group.attrs["weight_names"] = np.array([], dtype="S")
        continue
      suffix = {"keras1": ("_W_1:0", "_b_1:0"), "keras3": ("/kernel", "/bias")}.get(
        style, ("/kernel:0", "/bias:0")
      )
      weight_names = [f"{layer}{suffix[0]}", f"{layer}{suffix[1]}"]
      if style != "no_attrs":
        group.attrs["weight_names"] = np.array([n.encode() for n in weight_names])
      for name, role in zip(weight_names, ("kernel", "bias"), strict=True):
        group.create_dataset(name, data=arrays[f"{layer}/{role}"])
  read = convert.read_file(str(path))
  assert sorted(read) == sorted(arrays)
  model = convert.to_model("keras_h5", read)
  assert model.config.name == "tiny"
  for key, ((module, role), _) in convert.keras_table(model.config).items():
    np.testing.assert_array_equal(
      np.asarray(getattr(getattr(model, module), role)[...]), arrays[key]
    )
