"""Image retrieval with VGG-16 descriptors in JAX.

The public API: `Extractor` (images -> descriptors), `Index` (the on-disk vector index),
`topk` (the pure jit-compiled similarity kernel) and the descriptor names.
"""

from engine.features.descriptors import DESCRIPTORS, Descriptor, Whitening
from engine.features.extractor import Extractor
from engine.features.model import VGG, ModelConfig
from engine.kernels.topk import merge_topk, topk
from engine.store import Index

__all__ = [
  "DESCRIPTORS",
  "Descriptor",
  "Extractor",
  "Index",
  "ModelConfig",
  "VGG",
  "Whitening",
  "merge_topk",
  "topk",
]
