"""Shared fixtures: one JAX compilation cache per session, tiny random weights on disk, shared
tiny extractors, generated images, the shared photo set.

For binaries, `binlib.run` runs them in this process (see tests/binlib.py); BUILD.md, "Tests",
says which fixture to use for what.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "imagededup-tests"


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache in a folder of this session (of this xdist worker).

  Every program compiled once, here or in a child Python (which inherits the settings through the
  environment: binaries run as subprocesses, forked fault runs), is read back instead of compiled
  again: a binary's child spends about 4 s of CPU instead of 30 on a tiny model.
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  folder = str(tmp_path_factory.mktemp("jax-compilation-cache"))
  settings = {
    "jax_compilation_cache_dir": folder,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  old = {name: getattr(jax.config, name) for name in settings}
  with pytest.MonkeyPatch.context() as mp:
    for name, value in settings.items():
      jax.config.update(name, value)
      mp.setenv(name.upper(), str(value))
    cc.reset_cache()  # anything compiled before (at collection) left it checked and unused
    yield folder
  for name, value in old.items():
    jax.config.update(name, value)
  cc.reset_cache()


@pytest.fixture(scope="session")
def tiny_extractor():
  """Extractors of the tiny model shared by the whole session, one per set of arguments.

  `tiny_extractor(descriptor="gem", weights="random:5", **kwargs)` builds
  `Extractor(weights, descriptor, config="tiny", image_size=64, batch_size=4, backend="xla",
  **kwargs)` once (the settings of `binlib.TINY`, so in-process binaries reuse its compiled
  shapes). Shared: treat it as read-only.
  """
  from engine.features.extractor import Extractor

  built = {}

  def get(descriptor="gem", weights="random:5", **kwargs):
    kwargs = {"config": "tiny", "image_size": 64, "batch_size": 4, "backend": "xla", **kwargs}
    key = (weights, descriptor, tuple(sorted(kwargs.items())))
    if key not in built:
      built[key] = Extractor(weights, descriptor, **kwargs)
    return built[key]

  return get


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
