"""Shared fixtures: tiny random weights on disk, generated images, the shared photo set."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "imagededup-tests"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
  """A saved checkpoint of the tiny config with seeded random weights."""
  from engine.features import checkpoint
  from engine.features.model import ModelConfig

  model, _ = checkpoint.random(ModelConfig.tiny(), seed=3)
  out = tmp_path_factory.mktemp("weights") / "tiny"
  checkpoint.save(model, out, source="random", convention="torch")
  return str(out)


def write_image(path, seed: int = 0, size=(96, 72), mode: str = "RGB", fmt: str | None = None):
  """A random image of `size` (width, height) saved at `path`."""
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  img = Image.fromarray(arr, "RGB")
  if mode != "RGB":
    img = img.convert(mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, fmt)
  return str(path)


@pytest.fixture
def image_dir(tmp_path) -> pathlib.Path:
  folder = tmp_path / "images"
  for i in range(5):
    write_image(folder / f"img_{i}.jpg", seed=i, size=(80 + 16 * i, 64))
  return folder


def shared_data_or_skip() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(
      f"shared photo set not present at {SHARED_DATA} (only in the project's CI checkout)"
    )
  return SHARED_DATA
