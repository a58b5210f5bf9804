"""Shared helpers for the conversion parity tests: input images, the engine's taps, the error metric."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from engine.features import model as model_lib


def random_images(config: model_lib.ModelConfig, batch: int = 2, seed: int = 0) -> np.ndarray:
  """Fresh random `[B, S, S, 3]` uint8 RGB images at the size the fc taps need."""
  rng = np.random.default_rng(seed)
  size = config.image_size
  return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def engine_taps(model: model_lib.VGG, x: np.ndarray) -> dict[str, np.ndarray]:
  """Every tap of the model on preprocessed `[B, H, W, 3]` float32 inputs, as numpy."""
  graphdef, state = nnx.split(model)
  taps = model.config.tap_names

  @jax.jit
  def run(state, x):
    return nnx.merge(graphdef, state)(x, taps=taps)

  return {k: np.asarray(v) for k, v in jax.device_get(run(state, x)).items()}


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  """max |a - b| / max |b|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def assert_taps_match(
  ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: float = 1e-5
) -> dict[str, float]:
  """Compares every tap; returns tap -> relative error (fails listing every tap over `tol`)."""
  assert set(ours) == set(ref), (sorted(ours), sorted(ref))
  errors = {name: rel_err(ours[name], ref[name]) for name in ref}
  assert all(np.max(np.abs(ref[n])) > 0 for n in ref), "a reference tap is all zeros"
  bad = {n: e for n, e in errors.items() if not e <= tol}
  assert not bad, f"taps over {tol}: {bad}"
  return errors
