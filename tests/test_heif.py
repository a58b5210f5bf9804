"""HEIC/HEIF photos through the optional pillow-heif extra: decoded, walked, extracted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.app import sample, walk
from engine.features import images
from engine.features.preprocess import Preprocessing

pillow_heif = pytest.importorskip(
  "pillow_heif", reason="pillow-heif (the `heif` extra) is not installed"
)


def _write_heic(path, seed: int = 3) -> np.ndarray:
  """Writes a photo-like scene as HEIC with pillow-heif's own encoder; returns its pixels."""
  img = sample.scene(np.random.default_rng(seed), 96, 64)
  heif = pillow_heif.from_pillow(img)
  heif.save(str(path), quality=95)
  return np.asarray(img)


def test_heic_decodes_like_its_source(tmp_path):
  path = tmp_path / "phone.heic"
  src = _write_heic(path)
  assert "HEIF" in images.register_optional_formats()
  arr = images.load(path, Preprocessing("torch", "keep_aspect", 96))
  assert arr.shape == (64, 96, 3)
  # Lossy HEVC at quality 95: close to the source pixels, far from any other scene.
  err = np.abs(arr.astype(np.float32) - src).mean()
  assert err < 6, err
  other = np.asarray(sample.scene(np.random.default_rng(4), 96, 64), np.float32)
  assert np.abs(arr.astype(np.float32) - other).mean() > 4 * err


def test_heif_is_found_by_content_under_any_name(tmp_path):
  _write_heic(tmp_path / "a.heif")
  _write_heic(tmp_path / "no_extension", seed=5)
  (tmp_path / "broken.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40)
  found = {f.path.rsplit("/", 1)[1]: f.error for f in walk.find_images(tmp_path)}
  assert found["a.heif"] is None and found["no_extension"] is None
  assert found["broken.heic"], "a corrupt HEIC is reported with a reason, not decoded"
  with pytest.raises(images.ImageError):
    images.load(tmp_path / "broken.heic", Preprocessing("torch", "squash", 32))


def test_heic_extracts_through_the_engine(tmp_path, tiny_weights):
  from engine.features.extractor import Extractor

  path = tmp_path / "x.heic"
  Image.fromarray(_write_heic(path)).save(tmp_path / "source.png")
  sample.scene(np.random.default_rng(4), 96, 64).save(tmp_path / "other.png")
  ex = Extractor(tiny_weights, "gem", config="tiny", image_size=64, batch_size=2)
  res = ex.extract_paths([str(path), str(tmp_path / "source.png"), str(tmp_path / "other.png")])
  assert not res.errors
  heic, source, other = res.features
  assert np.isfinite(heic).all()
  assert float(heic @ source) > float(heic @ other), "a HEIC matches its own source best"


def test_without_the_extra_a_heic_file_names_the_extra(tmp_path):
  """Where pillow-heif is missing, a HEIC photo fails with a reason that says what to install."""
  import os
  import subprocess
  import sys

  path = tmp_path / "phone.heic"
  _write_heic(path)
  child = (
    "import sys\n"
    "sys.modules['pillow_heif'] = None  # as if the extra were not installed\n"
    "from engine.features import images\n"
    "print(images.probe(sys.argv[1]))\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", child, str(path)],
    cwd=root,
    env={**os.environ, "PYTHONPATH": root},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  assert "heif extra" in out.stdout, out.stdout
