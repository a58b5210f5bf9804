"""The OpenVINO backend: same numbers as XLA (fp32), bf16 close to them, exported graphs cached."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino (the `cpu` extra)")
pytest.importorskip(
  "jax2onnx", reason="the OpenVINO backend exports with jax2onnx (the `cpu` extra)"
)
pytest.importorskip("onnx", reason="the OpenVINO backend exports with onnx (the `cpu` extra)")

from engine.features import backends
from engine.features.descriptors import DESCRIPTORS, Descriptor
from engine.features.extractor import Extractor

if not backends.available():
  pytest.skip("OpenVINO's CPU plugin needs an x86 CPU", allow_module_level=True)


def _pixels(n, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def _cosine(a, b):
  return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("exported"))


@pytest.mark.parametrize("name", DESCRIPTORS)
def test_fp32_matches_xla_for_every_descriptor(name, tiny_weights, cache):
  ex = Extractor(tiny_weights, name, batch_size=3)
  h, w = (64, 64) if ex.descriptor.needs_fixed_size else (96, 128)
  run = backends.OpenVINOExtraction(ex, precision="fp32", cache_dir=cache)
  px = _pixels(3, h, w, seed=1)
  got = run(px)
  want = np.asarray(ex.run_batch(px))
  assert got.shape == want.shape and got.dtype == np.float32
  assert _rel(got, want) <= 1e-5, (name, _rel(got, want))


def test_exported_graph_is_cached_and_reused(tiny_weights, tmp_path):
  cache = str(tmp_path)
  ex = Extractor(tiny_weights, Descriptor("gem", p=4.0), batch_size=2)
  before = backends.build_counts["export"]
  first = backends.make_runner(ex, (2, 64, 96, 3), cache_dir=cache)
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].endswith(".onnx")
  mtime = os.stat(os.path.join(cache, files[0])).st_mtime_ns
  # Another batch size and another precision: the same export, compiled again.
  second = backends.make_runner(ex, (4, 64, 96, 3), precision="bf16", cache_dir=cache)
  again = Extractor(tiny_weights, Descriptor("gem", p=4.0), batch_size=2)
  third = backends.make_runner(again, (2, 64, 96, 3), cache_dir=cache)
  assert backends.build_counts["export"] == before + 1
  assert os.listdir(cache) == files
  assert os.stat(os.path.join(cache, files[0])).st_mtime_ns == mtime
  px = _pixels(4, 64, 96)
  np.testing.assert_array_equal(first(px[:2]), third(px[:2]))
  assert second(px).shape == (4, ex.dim)
  # What the graph depends on changes the key: another exponent, another size.
  other = Extractor(tiny_weights, Descriptor("gem", p=3.0), batch_size=2)
  backends.make_runner(other, (2, 64, 96, 3), cache_dir=cache)
  backends.make_runner(other, (2, 96, 64, 3), cache_dir=cache)
  assert len(os.listdir(cache)) == 3
  with pytest.raises(ValueError, match="compiled for"):
    first(px)


def test_cache_lives_beside_converted_weights(tiny_weights):
  ex = Extractor(tiny_weights, "mac")
  assert backends.cache_dir_for(ex) == os.path.join(tiny_weights, backends.EXPORTED_DIR)
  rnd = Extractor("random", "mac", config="tiny")
  assert backends.cache_dir_for(rnd) == backends.default_cache_dir()


def test_backend_selection():
  assert backends.resolve("xla") == "xla"
  assert backends.resolve("openvino") == "openvino"
  assert backends.resolve("auto") == "openvino"  # this module only runs on x86 with openvino
  with pytest.raises(ValueError, match="backend must be"):
    backends.resolve("tensorrt")


@pytest.mark.slow
def test_vgg16_fc2_fp32_matches_xla_and_bf16_is_close(cache):
  ex = Extractor("random", "fc2", batch_size=4)
  px = _pixels(4, 224, 224, seed=2)
  want = np.asarray(ex.run_batch(px))
  fp32 = backends.make_runner(ex, px.shape, precision="fp32", cache_dir=cache)(px)
  assert _rel(fp32, want) <= 1e-5, _rel(fp32, want)
  bf16 = backends.make_runner(ex, px.shape, precision="bf16", cache_dir=cache)(px)
  assert _cosine(bf16, want).min() >= 0.9999, _cosine(bf16, want)


def test_drop_in_for_the_xla_call_in_the_extractor(tiny_weights):
  # The same streaming (padding of the last batch, keep_aspect buckets), with OpenVINO in place of
  # the jitted call; the exports land beside the weights.
  xla = Extractor(tiny_weights, "rmac", batch_size=3, image_size=96)
  ov = Extractor(tiny_weights, "rmac", batch_size=3, image_size=96, backend="openvino")
  images = [_pixels(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(64, 96)] * 4 + [(96, 64)])]
  want = xla(images)
  got = ov(images)
  assert got.shape == (5, xla.dim)
  assert _rel(got, want) <= 1e-5
  assert ov.compiled_shapes() == 3  # batches of 3 and 1 of the first bucket, 1 of the second


def test_same_top1_as_xla_on_the_shared_photos(cache, monkeypatch):
  """End to end on real photos: OpenVINO bf16 retrieves what XLA fp32 retrieves."""
  from conftest import shared_data_or_skip

  data = shared_data_or_skip()
  monkeypatch.setenv("VGG_RETRIEVAL_CACHE", cache)
  base = sorted(str(p) for p in (data / "base_images").iterdir())
  copies = [
    str(data / "mixed_images" / f"ukbench00120_{t}.jpg") for t in ("hflip", "resize", "rotation")
  ]
  queries = base + copies
  top1 = {}
  for backend, precision in (("xla", "fp32"), ("openvino", "bf16")):
    ex = Extractor(
      "random:7", "gem", image_size=224, batch_size=4, backend=backend, precision=precision
    )
    db = ex(base)
    top1[backend] = [base[i] for i in np.argmax(ex(queries) @ db.T, axis=1)]
  assert top1["openvino"] == top1["xla"]
  assert top1["xla"][: len(base)] == base  # every photo finds itself
