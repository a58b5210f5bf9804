"""Pixel conventions and resize policies: what the network expects, and how an image gets there.

Two conventions exist among the published VGG-16 weights, and mixing them up silently ruins the
features, so every checkpoint records its own:

- `caffe` (the Keras file, converted from Caffe): BGR channel order, per-channel mean subtracted,
  values in [0, 255] otherwise.
- `torch` (torchvision, timm): RGB, scaled to [0, 1], then (x - mean) / std.

Resize policies (applied on the host, in `engine.images`):

- `squash`: resize to size x size, ignoring the aspect ratio (the original fc2 workflow).
- `center_crop`: shorter side to size * 256 / 224, then the central size x size crop (torchvision).
- `keep_aspect`: for conv descriptors; the longer side becomes `size` and the shape snaps to the
  nearest of a few aspect-ratio buckets (multiples of 32), so the jitted extractor compiles once per
  bucket instead of once per image shape.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

CONVENTIONS = ("caffe", "torch")
RESIZE_POLICIES = ("squash", "center_crop", "keep_aspect")

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)

# Width:height ratios of the keep_aspect buckets (their inverses are buckets too).
BUCKET_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How files become network inputs.

  Attributes:
    convention: `caffe` or `torch` (see module docstring).
    resize: one of RESIZE_POLICIES.
    size: output side for `squash` / `center_crop`; longer side for `keep_aspect`.
  """

  convention: str = "torch"
  resize: str = "squash"
  size: int = 224

  def __post_init__(self):
    if self.convention not in CONVENTIONS:
      raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
    if self.resize not in RESIZE_POLICIES:
      raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
    if self.size < 32 or self.size % 32:
      raise ValueError(f"size must be a positive multiple of 32, got {self.size}")

  def output_shape(self, width: int, height: int) -> tuple[int, int]:
    """(height, width) of the array the policy makes from a width x height image."""
    if self.resize != "keep_aspect":
      return self.size, self.size
    return bucket_shape(width, height, self.size)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def bucket_shape(width: int, height: int, max_side: int) -> tuple[int, int]:
  """(height, width) of the keep_aspect bucket nearest to the image's aspect ratio."""
  ratio = math.log(max(width, 1) / max(height, 1))
  aspects = sorted({a for b in BUCKET_ASPECTS for a in (b, 1 / b)})
  best = min(aspects, key=lambda a: abs(math.log(a) - ratio))
  short = max(32, int(round(max_side / max(best, 1 / best) / 32)) * 32)
  return (short, max_side) if best >= 1 else (max_side, short)


def bucket_shapes(max_side: int) -> list[tuple[int, int]]:
  """Every (height, width) the keep_aspect policy can produce for this max side."""
  shapes = set()
  for a in BUCKET_ASPECTS:
    w, h = a * 1000, 1000
    shapes.add(bucket_shape(int(w), h, max_side))
    shapes.add(bucket_shape(h, int(w), max_side))
  return sorted(shapes)


def normalize(images: jax.Array, convention: str) -> jax.Array:
  """Maps `[B, H, W, 3]` RGB pixels in [0, 255] (any dtype) to the network's float32 input."""
  x = images.astype(jnp.float32)
  if convention == "caffe":
    return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)
  if convention == "torch":
    mean = jnp.asarray(TORCH_MEAN_RGB, jnp.float32)
    std = jnp.asarray(TORCH_STD_RGB, jnp.float32)
    return (x / 255.0 - mean) / std
  raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
