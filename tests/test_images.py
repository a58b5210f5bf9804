"""Decoding: odd modes and formats, orientation, bad files, folder walking."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from conftest import shared_data_or_skip, write_image
from PIL import Image

from engine.app import walk
from engine.features import images
from engine.features.preprocess import Preprocessing

SQUASH = Preprocessing("torch", "squash", 64)
ASPECT = Preprocessing("torch", "keep_aspect", 128)


def _decode(path, pre=SQUASH):
  arr = images.load(path, pre)
  assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
  return arr


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "1", "I;16", "I", "F"])
def test_any_mode_decodes_to_rgb(tmp_path, mode):
  fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF", "I;16": "PNG"}.get(mode, "PNG")
  path = tmp_path / f"x.{fmt.lower()}"
  write_image(path, seed=1, mode=mode, fmt=fmt)
  assert _decode(path).shape == (64, 64, 3)


def test_sixteen_bit_png_keeps_its_range(tmp_path):
  arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
  path = tmp_path / "deep.png"
  Image.frombytes("I;16", (64, 64), arr.astype("<u2").tobytes()).save(path)
  out = _decode(path)
  assert out.min() <= 2 and out.max() >= 250, "16-bit values must be scaled, not clipped"


def test_palette_transparency_is_composited_over_white(tmp_path):
  img = Image.new("P", (64, 64), 0)
  img.putpalette([0, 0, 0] * 256)
  img.info["transparency"] = 0
  path = tmp_path / "pal.png"
  img.save(path, transparency=0)
  assert (_decode(path) == 255).all()


def test_animated_gif_gives_first_frame(tmp_path):
  frames = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 0, 255)]]
  path = tmp_path / "anim.gif"
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
  out = _decode(path)
  assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_exif_orientation_is_applied(tmp_path):
  arr = np.zeros((60, 120, 3), np.uint8)
  arr[:, :60] = 255  # left half white, stored landscape
  img = Image.fromarray(arr)
  exif = img.getexif()
  exif[0x0112] = 6  # rotate 90 CW on display: portrait, white on top
  path = tmp_path / "rot.jpg"
  img.save(path, exif=exif.tobytes(), quality=95)
  out = _decode(path, ASPECT)
  assert out.shape[0] > out.shape[1], "portrait after orientation"
  assert out[: out.shape[0] // 3].mean() > 200 and out[-out.shape[0] // 3 :].mean() < 50


def test_jpeg_draft_decodes_large_files_at_reduced_scale(tmp_path):
  path = write_image(tmp_path / "big.jpg", seed=2, size=(2048, 1536))
  img = Image.open(path)
  img.draft("RGB", images._draft_size(img, SQUASH))
  assert img.size[0] < 2048 and min(img.size) >= 64
  assert _decode(path).shape == (64, 64, 3)


@pytest.mark.parametrize(
  "content,reason",
  [
    (b"", "cannot"),
    (b"not an image at all", "not a recognised image format"),
  ],
)
def test_bad_files_raise_image_error(tmp_path, content, reason):
  path = tmp_path / "bad.jpg"
  path.write_bytes(content)
  with pytest.raises(images.ImageError):
    images.load(path, SQUASH)


def test_truncated_jpeg_raises(tmp_path):
  write_image(tmp_path / "t.jpg", seed=4, size=(256, 256))
  data = (tmp_path / "t.jpg").read_bytes()
  (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
  with pytest.raises(images.ImageError, match="decode"):
    images.load(tmp_path / "cut.jpg", SQUASH)


def _png_with_size(path, width, height):
  """A tiny valid PNG whose header claims width x height (a decompression bomb's header)."""

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  raw = zlib.compress(b"\x00" * 16)
  path.write_bytes(
    b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
  )


def test_decompression_bomb_is_refused(tmp_path):
  path = tmp_path / "bomb.png"
  _png_with_size(path, 20000, 20000)
  with pytest.raises(images.ImageError, match="too large"):
    images.load(path, SQUASH)


def test_real_svg_is_skipped_with_reason(tmp_path):
  path = tmp_path / "vector.svg"
  path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>')
  (found,) = walk.find_images(tmp_path)
  assert found.error == "not a decodable image (unknown format or corrupt header)"


def test_one_pixel_image(tmp_path):
  path = tmp_path / "one.png"
  Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
  out = _decode(path)
  assert (out == [10, 20, 30]).all()


def test_keep_aspect_buckets():
  assert ASPECT.output_shape(640, 480) == (96, 128)
  assert ASPECT.output_shape(480, 640) == (128, 96)
  assert ASPECT.output_shape(500, 500) == (128, 128)
  assert ASPECT.output_shape(10000, 100) == (64, 128)  # panoramas clamp to 2:1


def test_walk_finds_images_by_content_and_survives_symlink_loops(tmp_path):
  root = tmp_path / "root"
  write_image(root / "a.jpg", 0)
  write_image(root / "sub" / "b.png", 1, fmt="PNG")
  write_image(root / "sub" / "renamed.dat", 2, fmt="JPEG")  # image content, odd extension
  (root / "notes.txt").write_text("hello")
  (root / "broken.jpg").write_bytes(b"garbage")
  (root / "empty.png").write_bytes(b"")
  os.symlink(root, root / "sub" / "loop")
  found = {os.path.relpath(f.path, root): f.error for f in walk.find_images(root)}
  assert found.pop("a.jpg") is None
  assert found.pop(os.path.join("sub", "b.png")) is None
  assert found.pop(os.path.join("sub", "renamed.dat")) is None
  assert "decodable" in found.pop("broken.jpg")
  assert "empty" in found.pop("empty.png")
  assert found == {}, f"unexpected entries {found} (a symlink loop must be visited once)"


def test_shared_formats_decode_or_skip_with_reason():
  data = shared_data_or_skip()
  results = {}
  for f in walk.find_images(data / "formats_images"):
    if f.error:
      results[os.path.basename(f.path)] = f.error
      continue
    try:
      results[os.path.basename(f.path)] = images.load(f.path, SQUASH).shape
    except images.ImageError as e:
      results[os.path.basename(f.path)] = str(e)
  # This ".svg" holds a JPEG: content decides, not the extension.
  for name in [
    "ukbench09380.svg",
    "ukbench09380.bmp",
    "ukbench09380.jpeg",
    "ukbench09380.png",
    "ukbench09380.webp",
    "baboon.pgm",
    "marbles.pbm",
    "Iggy.1024.ppm",
    "copyleft.tiff",
    "giphy.gif",
  ]:
    assert results[name] == (64, 64, 3), (name, results[name])
  corrupt = images.sniff(data / "mixed_images" / "ukbench09268_corrupt.jpg")
  if corrupt:
    with pytest.raises(images.ImageError):
      images.load(data / "mixed_images" / "ukbench09268_corrupt.jpg", SQUASH)


def test_unrecognised_bytes_in_memory_fail_with_the_reason():
  """An upload (a BytesIO) that is no image fails like a file does, not with a crash."""
  import io

  with pytest.raises(images.ImageError, match="not a recognised image format"):
    images.load(io.BytesIO(b"not an image at all"), Preprocessing("torch", "squash", 32))
