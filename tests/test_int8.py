"""int8 extraction (OpenVINO + NNCF) on the tiny network: close to fp32, recorded in the index,
the index's model used by queries, never mixed with another precision or another model."""

from __future__ import annotations

import importlib.util
import json
import os

import binlib
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openvino", reason="int8 extraction runs on OpenVINO (the `cpu` extra)")
pytest.importorskip("jax2onnx", reason="the OpenVINO backend exports with jax2onnx")
if importlib.util.find_spec("nncf") is None:  # found, not imported: NNCF takes seconds to import
  pytest.skip("int8 calibration needs NNCF (the `int8` extra)", allow_module_level=True)

from engine import store
from engine.app import extraction, indexing, sample
from engine.common import fileio
from engine.common.errors import UserError
from engine.features import backends, quantize
from engine.features.extractor import Extractor, IncompatibleExtractorError

if not backends.available():
  pytest.skip("OpenVINO's CPU plugin needs an x86 CPU", allow_module_level=True)

# The tiny model on the OpenVINO backend (binlib.TINY is XLA's).
TINY_OV = ["--weights=random:5", "--config=tiny", "--image_size=64", "--batch_size=4"]
INT8 = [*TINY_OV, "--backend=openvino", "--precision=int8", "--calibration_images=4"]


def _scene(path, seed, size):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sample.scene(np.random.default_rng(seed), *size).save(path)
  return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """The engine's cache (random weights, exports, int8 models) in a folder of this module."""
  folder = tmp_path_factory.mktemp("int8-cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fileio.CACHE_ENV, str(folder))
    mp.delenv(fileio.NO_CACHE_ENV, raising=False)
    yield str(folder)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
  """Calibration scenes and held-out ones, landscape and portrait (two aspect buckets)."""
  root = tmp_path_factory.mktemp("scenes")
  sizes = [(96, 72), (72, 96), (80, 80)]
  calib = [_scene(root / "calib" / f"c{i}.jpg", 10 + i, sizes[i % 3]) for i in range(6)]
  held = [_scene(root / "held" / f"h{i}.jpg", 50 + i, sizes[i % 3]) for i in range(6)]
  return calib, held


def _cosine(a, b):
  return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _fake_quantize_ops(model: quantize.QuantizedModel) -> int:
  ov = backends.import_openvino()
  return sum(op.get_type_name() == "FakeQuantize" for op in model.read(ov.Core()).get_ops())


@pytest.mark.parametrize(
  "name, scales", [("gem", (1.0,)), ("mac", (1.0,)), ("fc2", (1.0,)), ("gem", (1.0, 0.7))]
)
def test_int8_descriptors_are_close_to_fp32_on_images_outside_the_sample(
  name, scales, tiny_weights, cache, scenes
):
  calib, held = scenes
  size = None if name == "fc2" else 96
  kwargs = dict(batch_size=4, backend="openvino", image_size=size, scales=scales)
  fp32 = Extractor(tiny_weights, name, **kwargs)
  int8 = Extractor(tiny_weights, name, precision="int8", **kwargs)
  model = int8.calibrate(calib, sample=4)
  assert len(model.record["calibration"]["inputs"]) >= len(scales)  # every scale's input shapes
  assert _fake_quantize_ops(model) >= 10  # every convolution's input, not a float32 copy
  want, got = fp32(held), int8(held)
  cos = _cosine(got, want)
  # A quantised head (GeM's powers, the L2 norm) gives 0.89-0.93 here, the body alone 0.9997
  # (gem). The tiny net's 16 channels (mac) and 32-unit fc layers (fc2) leave each rounding more
  # weight than VGG-16's 512 and 4096: 0.987-0.993 at worst (BUILD.md has VGG-16's figures).
  assert cos.min() >= 0.98 and np.median(cos) >= 0.995, cos
  assert np.abs(got - want).max() > 1e-4  # really another computation than fp32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_calibration_sample_is_deterministic_recorded_and_cached(tiny_weights, cache, scenes):
  calib, _ = scenes
  assert quantize.sample_evenly([f"{c}" for c in "fbdaec"], 3) == ["a", "c", "f"]
  assert quantize.sample_evenly(["b", "a"], 5) == ["a", "b"]
  ex = Extractor(tiny_weights, "gem", precision="int8", backend="openvino", image_size=96)
  before = backends.build_counts["quantize"]
  model = ex.calibrate(list(reversed(calib)), sample=3)
  rec = model.record["calibration"]
  assert [k for k, _ in rec["images"]] == quantize.sample_evenly(calib, 3)
  assert all(sha == fileio.sha256_file(k) for k, sha in rec["images"])
  assert rec["sample_asked"] == rec["sample_used"] == 3
  buckets = {ex.preprocessing.output_shape(*Image.open(k).size) for k, _ in rec["images"]}
  assert sorted(map(tuple, rec["inputs"])) == sorted(buckets)  # decoded as extraction does
  assert model.record["nncf"] and model.record["openvino"]
  again = Extractor(tiny_weights, "gem", precision="int8", backend="openvino", image_size=96)
  assert again.calibrate(calib, sample=3).sha256 == model.sha256
  assert backends.build_counts["quantize"] in (before, before + 1)  # the second from the cache
  other = Extractor(tiny_weights, "gem", precision="int8", backend="openvino", image_size=96)
  assert other.calibrate(calib, sample=2).sha256 != model.sha256  # other images, other model


def test_fewer_images_than_the_sample_and_undecodable_ones(tiny_weights, cache, scenes, tmp_path):
  calib, _ = scenes
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
  ex = Extractor(tiny_weights, "gem", precision="int8", backend="openvino", image_size=96)
  model = ex.calibrate([*calib[:2], str(broken)], sample=10)
  rec = model.record["calibration"]
  assert rec["sample_asked"] == 10 and rec["sample_used"] == 2
  assert [k for k, _ in rec["images"]] == sorted(calib[:2])
  # The same images asked for differently: the cached model, recorded as this run asked.
  again = Extractor(tiny_weights, "gem", precision="int8", backend="openvino", image_size=96)
  second = again.calibrate([*calib[:2], str(broken)], sample=20)
  assert second.sha256 == model.sha256 and second.record["calibration"]["sample_asked"] == 20
  with pytest.raises(quantize.QuantizationError, match="at least one image that decodes"):
    Extractor(tiny_weights, "gem", precision="int8", backend="openvino").calibrate([str(broken)])


def test_int8_needs_openvino_and_a_descriptor_it_can_serve(tiny_weights):
  with pytest.raises(quantize.QuantizationError, match="OpenVINO backend only"):
    Extractor(tiny_weights, "gem", precision="int8", backend="xla")
  with pytest.raises(quantize.QuantizationError, match="rmac"):
    Extractor(tiny_weights, "rmac", precision="int8", backend="openvino")
  ex = Extractor(tiny_weights, "gem", precision="int8", backend="openvino")
  with pytest.raises(quantize.QuantizationError, match="no quantised model yet"):
    ex(np.zeros((1, 64, 64, 3), np.uint8))


def test_index_records_the_model_and_queries_use_it(tmp_path, scenes):
  calib, held = scenes
  folder = os.path.dirname(calib[0])
  index = str(tmp_path / "idx")
  first = binlib.run(
    "engine.index", f"--images={folder}", f"--index={index}", "--dtype=float32", *INT8
  )
  assert "indexed 6" in first.out, first.out
  assert "calibrated on 4 images (of 4 asked), kept in the index" in first.out, first.out
  with store.Index.open(index, readonly=True) as idx:
    meta = idx.metadata
    keys = idx.keys()
    stored = idx.get_vectors(keys)
  rec = meta["int8"]
  assert meta["extractor"]["precision"] == "int8"
  assert meta["extractor"]["int8_model"] == rec["sha256"]
  assert [k for k, _ in rec["calibration"]["images"]] == quantize.sample_evenly(calib, 4)
  for what in ("xml", "bin"):
    path = os.path.join(index, rec["files"][what])
    assert fileio.sha256_file(path) == rec["file_sha256"][what]

  # An index's extractor runs the index's model, wherever the cache is.
  settings = extraction.Settings(batch_size=4)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fileio.CACHE_ENV, str(tmp_path / "another-cache"))
    ex = extraction.for_index(index, settings)
  assert ex.precision == "int8" and ex.quantized.sha256 == rec["sha256"]
  np.testing.assert_allclose(ex(keys), stored, atol=2e-5)
  fp32 = Extractor("random:5", "gem", config="tiny", image_size=64, backend="openvino")
  assert np.abs(fp32(keys) - stored).max() > 1e-4  # the check above can tell them apart

  q = binlib.run("engine.query", f"--index={index}", f"--query={calib[1]}", "--format=json")
  top = json.loads(q.out)["results"][0]["matches"][0]
  assert top["key"] == calib[1] and top["score"] > 0.9999

  # An incremental run adds with the index's model: no new calibration.
  _scene(os.path.join(folder, "new.jpg"), 77, (96, 72))
  before = backends.build_counts["quantize"]
  again = binlib.run("engine.index", f"--images={folder}", f"--index={index}", *TINY_OV)
  assert "indexed 1, unchanged 6" in again.out, again.out
  explicit = binlib.run("engine.index", f"--images={folder}", f"--index={index}", *INT8)
  assert "indexed 0, unchanged 7" in explicit.out, explicit.out
  assert backends.build_counts["quantize"] == before
  os.remove(os.path.join(folder, "new.jpg"))
  del held


def test_an_index_never_mixes_precisions_or_models(tmp_path, scenes, cache):
  calib, held = scenes
  folder = os.path.dirname(calib[0])
  int8_index, fp32_index = str(tmp_path / "int8"), str(tmp_path / "fp32")
  binlib.run("engine.index", f"--images={folder}", f"--index={int8_index}", *INT8)
  binlib.run(
    "engine.index", f"--images={folder}", f"--index={fp32_index}", *TINY_OV, "--backend=openvino"
  )
  to_fp32 = binlib.run(
    "engine.index",
    f"--images={folder}",
    f"--index={int8_index}",
    *TINY_OV,
    "--precision=fp32",
    ok=False,
  )
  assert "precision: index 'int8', now 'fp32'" in to_fp32.err, to_fp32.err
  to_int8 = binlib.run(
    "engine.index", f"--images={folder}", f"--index={fp32_index}", *INT8, ok=False
  )
  assert "precision: index 'fp32', now 'int8'" in to_int8.err, to_int8.err
  q = binlib.run(
    "engine.query", f"--index={int8_index}", f"--query={held[0]}", "--precision=bf16", ok=False
  )
  assert "precision: index 'int8', now 'bf16'" in q.err, q.err

  # A model calibrated on other images is another model: refused, both named.
  with store.Index.open(int8_index, readonly=True) as idx:
    recorded = idx.metadata["int8"]["sha256"]
  other = Extractor(
    "random:5", "gem", config="tiny", image_size=64, precision="int8", backend="openvino"
  )
  model = other.calibrate(held, sample=3)
  with pytest.raises(IncompatibleExtractorError) as e:
    indexing.index_folder(folder, int8_index, other, progress=False)
  assert recorded in str(e.value) and model.sha256 in str(e.value)


def test_a_missing_or_damaged_model_is_an_error_never_a_new_quantisation(tmp_path, scenes):
  calib, _ = scenes
  folder = os.path.dirname(calib[0])
  index = str(tmp_path / "idx")
  binlib.run("engine.index", f"--images={folder}", f"--index={index}", *INT8)
  with store.Index.open(index, readonly=True) as idx:
    rec = idx.metadata["int8"]
  weights = os.path.join(index, rec["files"]["bin"])
  with open(weights, "r+b") as f:
    f.seek(os.path.getsize(weights) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x40]))
  before = backends.build_counts["quantize"]
  q = binlib.run("engine.query", f"--index={index}", f"--query={calib[0]}", ok=False)
  assert "fails its checksum" in q.err and "never quantised again" in q.err, q.err
  again = binlib.run("engine.index", f"--images={folder}", f"--index={index}", *TINY_OV, ok=False)
  assert "fails its checksum" in again.err, again.err
  os.remove(os.path.join(index, rec["files"]["xml"]))
  q = binlib.run("engine.query", f"--index={index}", f"--query={calib[0]}", ok=False)
  assert "is missing" in q.err, q.err
  assert backends.build_counts["quantize"] == before


def test_xla_and_int8_is_one_line_error(tmp_path, scenes):
  calib, _ = scenes
  r = binlib.run(
    "engine.index",
    f"--images={os.path.dirname(calib[0])}",
    f"--index={tmp_path / 'idx'}",
    *TINY_OV,
    "--backend=xla",
    "--precision=int8",
    ok=False,
  )
  assert "int8 runs on the OpenVINO backend only" in r.err, r.err
  assert not os.path.exists(tmp_path / "idx" / store.MANIFEST)


def test_nothing_to_calibrate_on_is_one_line_error_and_no_index(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("not an image")
  r = binlib.run(
    "engine.index", f"--images={empty}", f"--index={tmp_path / 'idx'}", *INT8, ok=False
  )
  assert "no images to calibrate on" in r.err, r.err
  assert not os.path.exists(tmp_path / "idx" / store.MANIFEST)


def test_a_new_int8_index_is_not_calibrated_by_several_processes(tmp_path, scenes):
  from engine.app import process_indexing

  calib, _ = scenes
  ex = Extractor(
    "random:5", "gem", config="tiny", image_size=64, precision="int8", backend="openvino"
  )
  with pytest.raises(UserError, match="calibrated by a one-process run"):
    process_indexing.index_folder(os.path.dirname(calib[0]), str(tmp_path / "idx"), ex, None)
  assert not os.path.exists(tmp_path / "idx")


def test_the_service_runs_the_index_int8_model(tmp_path, scenes, cache):
  pytest.importorskip("starlette")
  pytest.importorskip("uvicorn")
  from test_serve import Server

  calib, _ = scenes
  index = str(tmp_path / "idx")
  binlib.run("engine.index", f"--images={os.path.dirname(calib[0])}", f"--index={index}", *INT8)
  srv = Server(index, "--backend=openvino", "--warmup=none")  # the last --backend wins
  try:
    status, stats = srv.json("/stats")
    assert status == 200 and stats["backend"] == "openvino", stats
    status, out = srv.upload(calib[2], "?k=1")
    assert status == 200, out
    assert out["matches"][0]["key"] == calib[2] and out["matches"][0]["score"] > 0.9999
  finally:
    srv.stop()
