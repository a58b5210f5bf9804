"""Extraction: descriptors against numpy references, fixed shapes, padding, errors, whitening."""

from __future__ import annotations

import numpy as np
import pytest

from engine.features import checkpoint, descriptors
from engine.features.extractor import Extractor, IncompatibleExtractorError, check_compatible
from engine.features.model import PRESETS, ModelConfig

RNG = np.random.default_rng(0)


def _pixels(n, h=64, w=64, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_poolings_match_numpy():
  fmap = RNG.uniform(0, 2, (2, 6, 9, 5)).astype(np.float32)
  np.testing.assert_allclose(descriptors.mac(fmap), fmap.max((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(descriptors.spoc(fmap), fmap.mean((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(
    descriptors.gem(fmap, 3.0), np.cbrt((fmap.astype(np.float64) ** 3).mean((1, 2))), rtol=1e-5
  )
  np.testing.assert_allclose(descriptors.gem(fmap, 1.0), fmap.mean((1, 2)), rtol=1e-5)
  # The published grid for a 6x9 map, L = 3 (one extra region on the long side), by hand.
  regions = [(0, 0, 6, 9)] + [(0, left, 6, 6) for left in (0, 3)]
  regions += [(top, left, 4, 4) for top in (0, 2) for left in (0, 2, 5)]
  regions += [(top, left, 3, 3) for top in (0, 1, 3) for left in (0, 2, 4, 6)]
  assert descriptors.rmac_regions(6, 9, 3) == regions
  ref = 0
  for top, left, h, w in regions:
    v = fmap[:, top : top + h, left : left + w].max((1, 2))
    ref = ref + v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(descriptors.rmac(fmap, 3), ref, rtol=1e-5)


def test_rmac_regions_cover_the_map_inside_bounds():
  for h, w in [(7, 7), (6, 9), (14, 10), (3, 20)]:
    regions = descriptors.rmac_regions(h, w, 3)
    assert regions[0] == (0, 0, h, w)
    covered = np.zeros((h, w), bool)
    for top, left, rh, rw in regions[1:]:
      assert top >= 0 and left >= 0 and top + rh <= h and left + rw <= w and rh > 0 and rw > 0
      covered[top : top + rh, left : left + rw] = True
    assert covered.all(), (h, w)
  # square 7x7, level 1: one region of side floor(2*7/2) = 7; level 2: 2x2 of side 4.
  assert (0, 0, 4, 4) in descriptors.rmac_regions(7, 7, 2)


def test_presets_are_named_by_their_key():
  assert {"vgg16", "tiny"} <= set(PRESETS)
  for name in PRESETS:
    assert ModelConfig.by_name(name).name == name  # the name checkpoints record
  with pytest.raises(ValueError, match="unknown model config"):
    ModelConfig.by_name("vgg19")


@pytest.mark.parametrize("name", descriptors.DESCRIPTORS)
def test_every_descriptor_is_normalised_with_the_documented_dim(name):
  ex = Extractor("random:1", name, config="tiny", batch_size=3)
  feats = ex(_pixels(4))
  assert feats.shape == (4, ex.dim) and feats.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
  if name == "pool5":
    assert ex.dim == 2 * 2 * 16  # (H, W, C) flatten of the tiny pool5


def test_pool5_is_flattened_in_hwc_order():
  ex = Extractor("random:1", descriptors.Descriptor("pool5", normalize=False), config="tiny")
  px = _pixels(2)
  model, _ = checkpoint.random(ModelConfig.tiny(), seed=1)
  from engine.features.preprocess import normalize

  pool5 = np.asarray(model(normalize(px, "torch"), taps=("pool5",))["pool5"])
  np.testing.assert_allclose(ex(px), pool5.reshape(2, -1), rtol=1e-5, atol=1e-6)


def test_batch_shapes_adapt_and_padding_does_not_change_results():
  ex = Extractor("random:2", "gem", config="tiny", batch_size=4)
  assert [ex.padded_batch(n) for n in range(1, 5)] == [1, 2, 4, 4]
  px = _pixels(10, 64, 96, seed=5)
  first = ex(px[:4])
  batched = ex(px)  # batches of 4, 4 and 2: one more shape
  compiled = ex.compiled_shapes()
  ex(px)
  assert ex.compiled_shapes() == compiled  # the same shapes again: nothing new
  np.testing.assert_allclose(batched[:4], first, rtol=1e-5, atol=1e-6)
  alone = ex(px[9:10])  # one image runs as a batch of one
  np.testing.assert_allclose(batched[9:10], alone, rtol=1e-5, atol=1e-6)
  three = ex(px[:3])  # padded to 4: the padding rows do not leak into the results
  np.testing.assert_allclose(three, first[:3], rtol=1e-5, atol=1e-6)
  assert ex.compiled_shapes() == compiled + 1


def test_extract_paths_skips_bad_files_and_keeps_order(tmp_path, image_dir):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 broken")
  paths = sorted(str(p) for p in image_dir.iterdir())
  paths.insert(2, str(bad))
  ex = Extractor("random:1", "mac", config="tiny", batch_size=2)
  result = ex.extract_paths(paths)
  assert list(result.errors) == [2]
  assert list(result.positions) == [0, 1, 3, 4, 5]
  direct = ex([paths[i] for i in result.positions])
  np.testing.assert_allclose(result.features, direct, rtol=1e-6)


def test_checkpoint_round_trip_and_tamper_detection(tiny_weights):
  ex_disk = Extractor(tiny_weights, "fc2", config="tiny")
  ex_mem = Extractor("random:3", "fc2", config="tiny")
  px = _pixels(3)
  np.testing.assert_allclose(ex_disk(px), ex_mem(px), rtol=1e-6)
  assert ex_disk.weights_info.fingerprint != ex_mem.weights_info.fingerprint
  with pytest.raises(checkpoint.WeightsError, match="does not exist"):
    Extractor("/nonexistent/weights", "fc2")


def test_fc_descriptors_refuse_other_sizes():
  with pytest.raises(ValueError, match="needs 64x64"):
    Extractor("random", "fc2", config="tiny", resize="keep_aspect")


def test_bf16_features_agree_with_fp32():
  px = _pixels(4, 96, 128, seed=7)
  f32 = Extractor("random:4", "gem", config="tiny")(px)
  bf16 = Extractor("random:4", "gem", config="tiny", precision="bf16")(px)
  cos = (f32 * bf16).sum(1)
  assert cos.min() > 0.999, cos


def test_incompatible_extractors_are_named():
  a = Extractor("random:1", "gem", config="tiny")
  b = Extractor("random:1", "mac", config="tiny")
  check_compatible(a.index_metadata(), a)
  with pytest.raises(IncompatibleExtractorError, match="descriptor"):
    check_compatible(a.index_metadata(), b)
  rebuilt = Extractor.from_index_metadata(a.index_metadata())
  np.testing.assert_allclose(rebuilt(_pixels(2)), a(_pixels(2)), rtol=1e-6)


def test_whitening_decorrelates_and_round_trips(tmp_path):
  x = RNG.normal(size=(500, 8)) @ RNG.normal(size=(8, 8)) + 3
  w = descriptors.Whitening.learn(x, dim=6)
  y = (x - w.mean) @ w.projection
  np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(6), atol=1e-3)
  w.save(tmp_path / "w.npz")
  w2 = descriptors.Whitening.load(tmp_path / "w.npz")
  np.testing.assert_allclose(w2(x[:5]), w(x[:5]), rtol=1e-6)
  assert np.allclose(np.linalg.norm(w(x[:5]), axis=1), 1.0)


def test_whitened_extractor(tmp_path, image_dir):
  base = Extractor("random:1", "gem", config="tiny")
  sample = base(_pixels(40, seed=9))
  w = descriptors.Whitening.learn(sample, dim=8)
  ex = Extractor("random:1", "gem", config="tiny", whitening=w)
  assert ex.dim == 8
  feats = ex(_pixels(3))
  np.testing.assert_allclose(feats, w(base(_pixels(3))), rtol=1e-5, atol=1e-6)


def test_image_files_and_arrays_agree(tmp_path):
  px = _pixels(1, 64, 64, seed=11)[0]
  path = tmp_path / "a.png"
  from PIL import Image

  Image.fromarray(px).save(path)
  ex = Extractor("random:1", "spoc", config="tiny", resize="squash", image_size=64)
  np.testing.assert_allclose(ex([str(path)]), ex(px[None]), rtol=1e-6)
