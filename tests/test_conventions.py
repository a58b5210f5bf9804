"""Pixel conventions against hand-computed values (no Keras or torch needed)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.features import preprocess

PIXELS = np.array([[[[255, 0, 10], [0, 128, 255]]]], np.uint8)  # [1, 1, 2, 3] RGB


def test_caffe_swaps_to_bgr_and_subtracts_the_bgr_mean():
  got = np.asarray(preprocess.normalize(PIXELS, "caffe"))
  # pixel (R=255, G=0, B=10) -> (B, G, R) - (103.939, 116.779, 123.68)
  want = np.array(
    [[[[10 - 103.939, 0 - 116.779, 255 - 123.68], [255 - 103.939, 128 - 116.779, 0 - 123.68]]]],
    np.float32,
  )
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert got.dtype == np.float32


def test_torch_scales_to_unit_range_then_standardises_in_rgb():
  got = np.asarray(preprocess.normalize(PIXELS, "torch"))
  want = np.array(
    [
      [
        [
          [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (10 / 255 - 0.406) / 0.225],
          [(0.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1.0 - 0.406) / 0.225],
        ]
      ]
    ],
    np.float32,
  )
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_conventions_on_random_images_against_numpy():
  x = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
  caffe = x[..., ::-1].astype(np.float64) - np.array([103.939, 116.779, 123.68])
  np.testing.assert_allclose(preprocess.normalize(x, "caffe"), caffe, atol=1e-4)
  torch = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(preprocess.normalize(x, "torch"), torch, atol=1e-5)
  # float input in [0, 255] behaves as the uint8 one
  np.testing.assert_allclose(
    preprocess.normalize(x.astype(np.float32), "caffe"), preprocess.normalize(x, "caffe")
  )


def test_unknown_convention_is_refused():
  with pytest.raises(ValueError, match="convention"):
    preprocess.normalize(PIXELS, "bgr")
  with pytest.raises(ValueError, match="convention"):
    preprocess.Preprocessing(convention="keras")
