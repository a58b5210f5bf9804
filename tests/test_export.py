"""ONNX export: ONNX Runtime runs the exported graph to the same numbers as the jitted XLA path."""

from __future__ import annotations

import json
import os

import binlib
import numpy as np
import pytest

pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx (the `cpu` extra)")
pytest.importorskip("onnx", reason="ONNX export needs onnx (the `cpu` extra)")
ort = pytest.importorskip("onnxruntime", reason="the export test runs the graph in ONNX Runtime")

from engine.features import (
  checkpoint,
  onnx_export,
)
from engine.features.descriptors import DESCRIPTORS, Descriptor
from engine.features.extractor import Extractor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pixels(n, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _ort_run(proto, pixels):
  sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  return sess.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: pixels})[0]


@pytest.mark.parametrize("name", DESCRIPTORS)
def test_onnxruntime_matches_xla_for_every_descriptor(name, tiny_weights):
  ex = Extractor(tiny_weights, name, batch_size=3)
  # Non-square for the pooled descriptors, so R-MAC's regions are not all squares of the map.
  h, w = (64, 64) if ex.descriptor.needs_fixed_size else (96, 128)
  proto = onnx_export.export_onnx(ex, batch_size=None, height=h, width=w)
  assert proto.graph.input[0].type.tensor_type.elem_type == 2  # uint8
  for n, seed in ((3, 0), (5, 1)):  # the batch is symbolic: two sizes, one graph
    px = _pixels(n, h, w, seed)
    got = _ort_run(proto, px)
    want = np.asarray(ex.run_batch(px))
    assert got.shape == (n, ex.dim) and got.dtype == np.float32
    assert _rel(got, want) <= 1e-5, (name, _rel(got, want))


def test_caffe_convention_and_gem_variants_export(tmp_path, tiny_weights):
  model, _ = checkpoint.load(tiny_weights)
  folder = tmp_path / "caffe_tiny"
  checkpoint.save(model, folder, source="random", convention="caffe")
  # An integer GeM exponent traces to another primitive (integer_pow) than a float one.
  for desc in (
    Descriptor("fc2"),
    Descriptor("gem", p=2.5, normalize=False),
    Descriptor("gem", p=3),
  ):
    ex = Extractor(str(folder), desc, batch_size=2)
    assert ex.preprocessing.convention == "caffe"
    px = _pixels(2, 64, 64, seed=7)
    got = _ort_run(onnx_export.export_onnx(ex, batch_size=None, height=64, width=64), px)
    assert _rel(got, np.asarray(ex.run_batch(px))) <= 1e-5, desc


def test_bf16_extractor_exports_the_float32_network(tiny_weights):
  ex = Extractor(tiny_weights, "mac", precision="bf16", batch_size=2)
  ref = Extractor(tiny_weights, "mac", batch_size=2)
  px = _pixels(2, 64, 64)
  got = _ort_run(onnx_export.export_onnx(ex, batch_size=2, height=64, width=64), px)
  assert _rel(got, np.asarray(ref.run_batch(px))) <= 1e-5


def test_fixed_size_descriptors_refuse_other_sizes(tiny_weights):
  ex = Extractor(tiny_weights, "fc2")
  with pytest.raises(ValueError, match="needs 64x64"):
    onnx_export.export_onnx(ex, height=96, width=64)
  with pytest.raises(ValueError, match="batch_size"):
    onnx_export.export_onnx(ex, batch_size=0)


def test_export_binary_writes_a_runnable_model_with_provenance(tmp_path, tiny_weights):
  out = tmp_path / "tiny_rmac.onnx"
  binlib.run(
    "engine.export",
    f"--weights={tiny_weights}",
    "--layer=rmac",
    "--format=onnx",
    f"--output={out}",
    "--batch_size=2",
    "--height=64",
    "--width=96",
  )
  import onnx

  proto = onnx.load(str(out))
  meta = {p.key: p.value for p in proto.metadata_props}
  ex = Extractor(tiny_weights, "rmac", batch_size=2)
  assert meta["engine.weights_fingerprint"] == ex.weights_info.fingerprint
  assert json.loads(meta["engine.descriptor"])["name"] == "rmac"
  px = _pixels(2, 64, 96, seed=3)
  assert _rel(_ort_run(proto, px), np.asarray(ex.run_batch(px))) <= 1e-5
