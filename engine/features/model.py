"""VGG-16 in Flax NNX, NHWC, returning any named layer ("tap") in one forward pass.

Layer names follow the paper's numbering so the weight-conversion tables read naturally:
`conv{block}_{i}` (3x3 conv + ReLU), `pool{block}` (2x2 max-pool), `fc1`, `fc2` (4096 + ReLU) and
`logits` (the 1000-way classifier, no softmax). Every name is also a tap.

`pool5` is flattened in (H, W, C) order before `fc1`, as in the Keras file; torchvision flattens in
(C, H, W) order and the converter permutes `fc1`'s rows to match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a VGG network.

  Attributes:
    name: preset name, recorded in checkpoints.
    blocks: output channels of each conv layer, grouped by block.
    fc_dim: width of fc1 and fc2.
    num_classes: width of the classifier.
    image_size: input side the fully connected taps need (pool5 is image_size / 32 square).
  """

  name: str
  blocks: tuple[tuple[int, ...], ...]
  fc_dim: int
  num_classes: int
  image_size: int

  @classmethod
  def vgg16(cls) -> ModelConfig:
    return cls(
      name="vgg16",
      blocks=((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
      fc_dim=4096,
      num_classes=1000,
      image_size=224,
    )

  @classmethod
  def tiny(cls) -> ModelConfig:
    """Same topology, a few channels per layer: for fast tests."""
    return cls(
      name="tiny",
      blocks=((4, 4), (8, 8), (8, 8, 8), (16, 16, 16), (16, 16, 16)),
      fc_dim=32,
      num_classes=10,
      image_size=64,
    )

  @classmethod
  def by_name(cls, name: str) -> ModelConfig:
    """The preset called `name` (a key of `PRESETS`)."""
    if name not in PRESETS:
      raise ValueError(f"unknown model config {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()

  @property
  def conv_names(self) -> tuple[str, ...]:
    return tuple(
      f"conv{b + 1}_{i + 1}" for b, widths in enumerate(self.blocks) for i in range(len(widths))
    )

  @property
  def tap_names(self) -> tuple[str, ...]:
    names = []
    for b, widths in enumerate(self.blocks):
      names += [f"conv{b + 1}_{i + 1}" for i in range(len(widths))]
      names.append(f"pool{b + 1}")
    return (*names, "fc1", "fc2", "logits")

  @property
  def last_channels(self) -> int:
    return self.blocks[-1][-1]

  @property
  def pool5_dim(self) -> int:
    side = self.image_size // 32
    return side * side * self.last_channels

  def tap_dim(self, tap: str) -> int:
    """Channel count of a conv/pool tap, or the width of a flat tap."""
    if tap == "fc1" or tap == "fc2":
      return self.fc_dim
    if tap == "logits":
      return self.num_classes
    block = int(tap[4]) - 1
    if tap.startswith("pool"):
      return self.blocks[block][-1]
    return self.blocks[block][int(tap.split("_")[1]) - 1]


# The model presets by name: every flag and choice list of presets derives from this mapping.
PRESETS = {"vgg16": ModelConfig.vgg16, "tiny": ModelConfig.tiny}

FC_TAPS = ("fc1", "fc2", "logits")


class VGG(nnx.Module):
  """VGG with named taps. Inputs are preprocessed float images `[B, H, W, 3]`.

  `dtype` is the compute dtype (parameters stay float32); with bfloat16 every product accumulates
  in float32 (`preferred_element_type`), which is what uses the CPU's matrix units.
  """

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    acc = jnp.float32 if dtype != jnp.float32 else None
    in_ch = 3
    for name, out_ch in zip(
      config.conv_names, [w for ws in config.blocks for w in ws], strict=True
    ):
      setattr(
        self,
        name,
        nnx.Conv(
          in_ch,
          out_ch,
          (3, 3),
          padding="SAME",
          dtype=dtype,
          preferred_element_type=acc,
          rngs=rngs,
        ),
      )
      in_ch = out_ch
    linear = dict(dtype=dtype, preferred_element_type=acc, rngs=rngs)
    self.fc1 = nnx.Linear(config.pool5_dim, config.fc_dim, **linear)
    self.fc2 = nnx.Linear(config.fc_dim, config.fc_dim, **linear)
    self.logits = nnx.Linear(config.fc_dim, config.num_classes, **linear)

  def __call__(self, x: jax.Array, taps: Sequence[str] = ("fc2",)) -> dict[str, jax.Array]:
    """Runs the network up to the deepest requested tap.

    Args:
      x: `[B, H, W, 3]` preprocessed images. Conv/pool taps accept any H, W; fc taps need
        `config.image_size` square.
      taps: names from `config.tap_names`.

    Returns:
      tap name -> float32 activations: `[B, h, w, C]` for conv/pool taps, `[B, D]` for fc taps.
    """
    unknown = [t for t in taps if t not in self.config.tap_names]
    if unknown:
      raise ValueError(f"unknown taps {unknown}; known: {self.config.tap_names}")
    order = self.config.tap_names
    last = max(order.index(t) for t in taps)
    wanted = set(taps)
    out = {}

    def keep(name, value):
      if name in wanted:
        out[name] = value.astype(jnp.float32)

    x = x.astype(self.dtype)
    for b, widths in enumerate(self.config.blocks):
      for i in range(len(widths)):
        name = f"conv{b + 1}_{i + 1}"
        x = nnx.relu(getattr(self, name)(x)).astype(self.dtype)
        keep(name, x)
        if order.index(name) == last:
          return out
      x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      keep(f"pool{b + 1}", x)
      if order.index(f"pool{b + 1}") == last:
        return out

    side = self.config.image_size // 32
    if x.shape[1:3] != (side, side):
      raise ValueError(
        f"fc taps need {self.config.image_size}x{self.config.image_size} inputs "
        f"(pool5 {side}x{side}); got pool5 {x.shape[1]}x{x.shape[2]}"
      )
    x = x.reshape(x.shape[0], -1)
    for name in FC_TAPS:
      x = getattr(self, name)(x)
      if name != "logits":
        x = nnx.relu(x)
      x = x.astype(self.dtype)
      keep(name, x)
      if order.index(name) == last:
        return out
    return out


def init_random(config: ModelConfig, seed: int = 0, dtype=jnp.float32) -> VGG:
  """A seeded, randomly initialised network (NOT ImageNet weights: for demos and tests)."""
  return VGG(config, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> VGG:
  """The model with shape-only parameters, to restore a checkpoint into."""
  return nnx.eval_shape(lambda: VGG(config, dtype=dtype, rngs=nnx.Rngs(0)))
