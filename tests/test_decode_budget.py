"""The decompression budget counts bytes per mode, and high-bit-depth images convert without
float64 copies of the whole image."""

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from engine.features import images
from engine.features.preprocess import Preprocessing

PRE = Preprocessing(size=64, resize="keep_aspect")


def _png16(path, w, h):
  arr = (np.arange(w * h, dtype=np.uint64).reshape(h, w) * 7919 % 65536).astype(np.uint16)
  Image.fromarray(arr).save(path)
  return arr


def test_16_bit_conversion_stays_near_the_image_size(tmp_path):
  w, h = 3000, 2000
  _png16(tmp_path / "deep.png", w, h)
  tracemalloc.start()
  try:
    out = images.load(tmp_path / "deep.png", PRE)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert out.shape[2] == 3 and out.dtype == np.uint8
  # numpy's share: the array of Pillow's buffer (16-bit PNGs open as mode I: 4 B), the uint8
  # result (1 B) and small float32 blocks; the float64 conversion this replaces needed over 24 B.
  assert peak < 6 * w * h, peak / (w * h)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_scaling_matches_a_float64_reference(mode):
  rng = np.random.default_rng(1)
  if mode == "I;16":
    arr = rng.integers(0, 65536, (37, 53)).astype(np.uint16)
    ref = arr / 65535.0 * 255.0
  elif mode == "I":
    arr = rng.integers(0, 4000, (37, 53)).astype(np.int32)
    ref = arr / 65535.0 * 255.0
  else:
    arr = rng.normal(3.0, 2.0, (37, 53)).astype(np.float32)
    arr[0, 0] = np.nan
    finite = arr[np.isfinite(arr)].astype(np.float64)
    ref = np.nan_to_num((arr - finite.min()) / (finite.max() - finite.min()) * 255.0)
  img = Image.fromarray(arr, mode if mode != "I;16" else None)
  assert img.mode == mode
  got = images.to_l8(img)
  want = np.clip(np.floor(ref + 0.5), 0, 255).astype(np.uint8)
  assert np.abs(got.astype(int) - want).max() <= 1  # float32 rounding at .5 boundaries


def test_budget_counts_bytes_per_mode(tmp_path, monkeypatch):
  w, h = 400, 300
  Image.new("L", (w, h), 128).save(tmp_path / "grey.png")
  _png16(tmp_path / "deep.png", w, h)
  # Room for an 8-bit image of this size, not for a 16-bit one.
  budget = (images.decode_bytes("L", w, h) + images.decode_bytes("I;16", w, h)) // 2
  monkeypatch.setattr(images, "MAX_DECODE_BYTES", budget)
  assert images.load(tmp_path / "grey.png", PRE).shape[2] == 3
  with pytest.raises(images.ImageError, match="too large to decode"):
    images.load(tmp_path / "deep.png", PRE)
  assert "too large to decode" in images.probe(tmp_path / "deep.png")
