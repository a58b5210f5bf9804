"""The forward pass, uint8 pixels -> descriptors: the one computation every backend runs.

Everything happens on the device: the weights' pixel convention (BGR/mean or mean/std), the network
up to the taps the descriptors need, pooling and L2 normalisation. `forward` is the jitted function
the extractor and the benchmarks call, with the network passed in as `(graphdef, state)`;
`with_weights` closes the same body over the weights, for a tracer that turns them into constants
(the ONNX export).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from engine.features import descriptors
from engine.features.descriptors import Descriptor
from engine.features.preprocess import normalize


@functools.partial(jax.jit, static_argnames=("graphdef", "convention", "descriptor"))
def forward(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  pixels: jax.typing.ArrayLike,
  *,
  convention: str,
  descriptor: Descriptor | tuple[Descriptor, ...],
) -> jax.Array | tuple[jax.Array, ...]:
  """`[B, H, W, 3]` uint8 RGB -> `[B, D]` float32 descriptors.

  Args:
    graphdef: the network's graph (its compute dtype included), from `nnx.split`.
    state: its parameters.
    pixels: `[B, H, W, 3]` uint8 RGB in [0, 255].
    convention: the weights' pixel convention (`engine.features.preprocess.CONVENTIONS`).
    descriptor: a Descriptor, or a tuple of them computed from one pass through the network.

  Returns:
    `[B, D]` float32, or a tuple of them (one per descriptor) when `descriptor` is a tuple.
  """
  model = nnx.merge(graphdef, state)
  descs = descriptor if isinstance(descriptor, tuple) else (descriptor,)
  taps = model(normalize(pixels, convention), taps=tuple(sorted({d.model_tap for d in descs})))
  out = tuple(descriptors.describe(taps, d) for d in descs)
  return out if isinstance(descriptor, tuple) else out[0]


def with_weights(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  *,
  convention: str,
  descriptor: Descriptor | tuple[Descriptor, ...],
) -> Callable[[jax.Array], jax.Array | tuple[jax.Array, ...]]:
  """`forward`'s body with the network closed over: `pixels -> descriptors`.

  The body unjitted: a tracer that patches functions while it traces (jax2onnx) must trace it
  afresh, not reuse a jaxpr that `forward` cached for the same shapes.
  """
  body = forward.__wrapped__
  return functools.partial(body, graphdef, state, convention=convention, descriptor=descriptor)
