"""Descriptors: how a network tap becomes one vector per image.

- `fc1`, `fc2`: the fully connected activations (after ReLU), 224x224 inputs.
- `pool5`: the last max-pool flattened in (H, W, C) order, the order `fc1` reads it in
  (7 * 7 * 512 = 25088-d for VGG-16).
- `mac`, `spoc`, `gem`, `rmac`: global poolings of a conv map (default `conv5_3`, after ReLU) that
  work at any input size: max (MAC), mean (SPoC), generalised mean with exponent p (GeM; p=1 is SPoC,
  p -> inf is MAC) and regional MAC (R-MAC: MAC over a multi-scale grid of square regions, each
  L2-normalised, summed).

All are L2-normalised by default. Optional PCA whitening (`Whitening`) is learned from a sample of
descriptors and applied after normalisation, followed by another L2 normalisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from engine.features.model import ModelConfig

DESCRIPTORS = ("fc2", "fc1", "pool5", "mac", "spoc", "gem", "rmac")
POOLED = ("mac", "spoc", "gem", "rmac")
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Descriptor:
  """Which descriptor to compute.

  Attributes:
    name: one of DESCRIPTORS.
    tap: the conv tap pooled by mac/spoc/gem/rmac.
    p: GeM exponent.
    levels: R-MAC scale levels.
    normalize: L2-normalise the output.
  """

  name: str = "gem"
  tap: str = "conv5_3"
  p: float = 3.0
  levels: int = 3
  normalize: bool = True

  def __post_init__(self):
    if self.name not in DESCRIPTORS:
      raise ValueError(f"descriptor must be one of {DESCRIPTORS}, got {self.name!r}")
    if self.name == "gem" and not self.p > 0:
      raise ValueError(f"GeM exponent p must be > 0, got {self.p}")
    if self.levels < 1:
      raise ValueError(f"R-MAC levels must be >= 1, got {self.levels}")

  @property
  def model_tap(self) -> str:
    return self.name if self.name in ("fc1", "fc2", "pool5") else self.tap

  @property
  def needs_fixed_size(self) -> bool:
    return self.name in ("fc1", "fc2", "pool5")

  def dim(self, config: ModelConfig) -> int:
    if self.name == "pool5":
      return config.pool5_dim
    return config.tap_dim(self.model_tap)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    if self.name != "gem":
      d.pop("p")
    if self.name != "rmac":
      d.pop("levels")
    if self.name not in POOLED:
      d.pop("tap")
    return d


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), EPS)


def mac(fmap: jax.Array) -> jax.Array:
  """`[B, H, W, C]` -> `[B, C]` max over space."""
  return fmap.max(axis=(1, 2))


def spoc(fmap: jax.Array) -> jax.Array:
  """`[B, H, W, C]` -> `[B, C]` mean over space."""
  return fmap.mean(axis=(1, 2))


def gem(fmap: jax.Array, p: float = 3.0) -> jax.Array:
  """`[B, H, W, C]` -> `[B, C]` generalised mean (mean of x^p)^(1/p) over space."""
  return jnp.power(jnp.power(jnp.maximum(fmap, EPS), p).mean(axis=(1, 2)), 1.0 / p)


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
  """R-MAC regions (top, left, h, w) of a height x width map (Tolias et al. 2016).

  Level l has square regions of side 2 * min(H, W) / (l + 1), placed on a uniform grid with about
  40% overlap; the longer side gets extra regions so it is covered too. The whole map comes first.
  """
  regions = [(0, 0, height, width)]
  side = min(height, width)
  overlap = 0.4
  steps = np.arange(2, 8)
  b = (max(height, width) - side) / (steps - 1)
  extra = int(np.argmin(np.abs((side**2 - side * b) / side**2 - overlap))) + 1
  extra_w = extra if width > height else 0
  extra_h = extra if height > width else 0
  for level in range(1, levels + 1):
    wl = math.floor(2 * side / (level + 1))
    if wl < 1:
      break
    n_w, n_h = level + extra_w, level + extra_h
    step_w = (width - wl) / (n_w - 1) if n_w > 1 else 0
    step_h = (height - wl) / (n_h - 1) if n_h > 1 else 0
    for i in range(n_h):
      for j in range(n_w):
        top = int(math.floor(i * step_h))
        left = int(math.floor(j * step_w))
        regions.append((top, left, min(wl, height - top), min(wl, width - left)))
  return list(dict.fromkeys(regions))


def rmac(fmap: jax.Array, levels: int = 3) -> jax.Array:
  """`[B, H, W, C]` -> `[B, C]`: sum of L2-normalised region maxima."""
  _, h, w, _ = fmap.shape
  total = 0.0
  for top, left, rh, rw in rmac_regions(h, w, levels):
    total = total + l2_normalize(fmap[:, top : top + rh, left : left + rw, :].max(axis=(1, 2)))
  return total


def describe(taps: dict[str, jax.Array], desc: Descriptor) -> jax.Array:
  """Model taps -> `[B, D]` float32 descriptors."""
  x = taps[desc.model_tap]
  if desc.name in ("fc1", "fc2"):
    out = x
  elif desc.name == "pool5":
    out = x.reshape(x.shape[0], -1)
  elif desc.name == "mac":
    out = mac(x)
  elif desc.name == "spoc":
    out = spoc(x)
  elif desc.name == "gem":
    out = gem(x, desc.p)
  else:
    out = rmac(x, desc.levels)
  out = out.astype(jnp.float32)
  return l2_normalize(out) if desc.normalize else out


@dataclasses.dataclass(frozen=True)
class Whitening:
  """PCA whitening: `x -> normalize(diag(1/sqrt(eig)) P^T (x - mean))`, optionally reducing dims.

  Attributes:
    mean: `[D]` sample mean.
    projection: `[D, D']` eigenvectors scaled by 1/sqrt(eigenvalue + shrinkage).
  """

  mean: np.ndarray
  projection: np.ndarray

  @classmethod
  def learn(cls, x_nd: np.ndarray, dim: int | None = None, shrinkage: float = 1e-5) -> Whitening:
    """Learns whitening from a `[N, D]` sample (N should exceed the output dim)."""
    x = np.asarray(x_nd, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
      raise ValueError(f"need a [N >= 2, D] sample to learn whitening, got {x.shape}")
    dim = dim or min(x.shape)
    if not 0 < dim <= min(x.shape):
      raise ValueError(f"whitening dim must be in 1..{min(x.shape)}, got {dim}")
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    eig, vec = np.linalg.eigh(cov)
    order = np.argsort(eig)[::-1][:dim]
    scale = 1.0 / np.sqrt(np.maximum(eig[order], 0) + shrinkage * max(eig.max(), EPS))
    return cls(mean.astype(np.float32), (vec[:, order] * scale).astype(np.float32))

  def __call__(self, x_nd: np.ndarray) -> np.ndarray:
    y = (np.asarray(x_nd, np.float32) - self.mean) @ self.projection
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), EPS)

  @property
  def in_dim(self) -> int:
    return self.mean.shape[0]

  def fingerprint(self) -> dict:
    """sha256 of the mean and projection (float32 bytes) and the output dim."""
    h = hashlib.sha256(np.ascontiguousarray(self.mean, np.float32).tobytes())
    h.update(np.ascontiguousarray(self.projection, np.float32).tobytes())
    return {"sha256": h.hexdigest(), "dim": self.out_dim}

  @property
  def out_dim(self) -> int:
    return self.projection.shape[1]

  def save(self, path: str | os.PathLike) -> None:
    from engine.common.fileio import atomic_write

    def write(f):
      np.savez(f, mean=self.mean, projection=self.projection)

    atomic_write(path, write)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Whitening:
    with np.load(path, allow_pickle=False) as z:
      mean, proj = z["mean"], z["projection"]
    if mean.ndim != 1 or proj.ndim != 2 or proj.shape[0] != mean.shape[0]:
      raise ValueError(f"{path}: inconsistent whitening shapes {mean.shape}, {proj.shape}")
    if not (np.isfinite(mean).all() and np.isfinite(proj).all()):
      raise ValueError(f"{path}: whitening contains non-finite values")
    return cls(mean.astype(np.float32), proj.astype(np.float32))
