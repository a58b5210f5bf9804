"""Resize policies of engine.images against references computed with Pillow directly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.features import images
from engine.features.preprocess import BUCKET_ASPECTS, Preprocessing, bucket_shape, bucket_shapes


def _png(tmp_path, width: int, height: int, seed: int = 0) -> tuple[str, Image.Image]:
  """A random RGB PNG (lossless, no JPEG draft decoding) and the image it holds."""
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
  path = str(tmp_path / f"img_{width}x{height}_{seed}.png")
  img.save(path)
  return path, img


def _torchvision_center_crop(img: Image.Image, size: int = 224, resize: int = 256) -> np.ndarray:
  """torchvision's Resize(256) + CenterCrop(224) on a PIL image, written out with Pillow.

  Resize: the shorter side becomes `resize`, the longer `int(resize * long / short)` (truncated).
  CenterCrop: offsets `int(round((side - size) / 2))`.
  """
  w, h = img.size
  if w <= h:
    nw, nh = resize, int(resize * h / w)
  else:
    nw, nh = int(resize * w / h), resize
  resized = img.resize((nw, nh), Image.BILINEAR)
  left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
  return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("width,height", [(300, 200), (200, 300), (224, 224), (97, 61)])
def test_squash_to_224(tmp_path, width, height):
  path, img = _png(tmp_path, width, height)
  got = images.load(path, Preprocessing("torch", "squash", 224))
  assert got.shape == (224, 224, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, np.asarray(img.resize((224, 224), Image.BILINEAR)))


@pytest.mark.parametrize(
  "width,height",
  # 333x250 has a long side whose torchvision size truncates (340.99 -> 340); 479x256 and 256x479
  # leave an odd margin whose centre rounds; 300x200 is the easy case; 100x80 is upscaled.
  [(300, 200), (333, 250), (250, 333), (479, 256), (256, 479), (100, 80), (256, 256)],
)
def test_center_crop_matches_torchvision_policy(tmp_path, width, height):
  path, img = _png(tmp_path, width, height, seed=1)
  got = images.load(path, Preprocessing("torch", "center_crop", 224))
  assert got.shape == (224, 224, 3)
  np.testing.assert_array_equal(got, _torchvision_center_crop(img))


def test_center_crop_from_array_equals_from_file(tmp_path):
  path, img = _png(tmp_path, 333, 250, seed=2)
  pre = Preprocessing("torch", "center_crop", 224)
  np.testing.assert_array_equal(images.from_array(np.asarray(img), pre), images.load(path, pre))


@pytest.mark.parametrize(
  "width,height,expected",
  [
    (400, 300, (160, 224)),  # 4:3 landscape
    (300, 400, (224, 160)),  # portrait
    (500, 500, (224, 224)),
    (1920, 1080, (128, 224)),  # 16:9
    (3000, 300, (128, 224)),  # 10:1 clamps to the widest bucket, 2:1 (112 -> 128)
    (301, 200, (160, 224)),  # 1.505 is nearest the 3:2 bucket
  ],
)
def test_keep_aspect_buckets(tmp_path, width, height, expected):
  pre = Preprocessing("torch", "keep_aspect", 224)
  assert pre.output_shape(width, height) == expected
  path, img = _png(tmp_path, width, height, seed=3)
  got = images.load(path, pre)
  assert got.shape == (*expected, 3)
  np.testing.assert_array_equal(got, np.asarray(img.resize(expected[::-1], Image.BILINEAR)))


def test_keep_aspect_bucket_set_is_small_and_aligned():
  shapes = bucket_shapes(448)
  assert len(shapes) == 2 * len(BUCKET_ASPECTS) - 1
  for h, w in shapes:
    assert h % 32 == 0 and w % 32 == 0 and max(h, w) == 448
  rng = np.random.default_rng(4)
  for _ in range(200):
    w, h = (int(v) for v in rng.integers(1, 5000, 2))
    assert bucket_shape(w, h, 448) in shapes
