"""Image retrieval with VGG-16 descriptors in JAX.

The public API: `Extractor` (images -> descriptors), `Index` (the on-disk vector index),
`topk` (the pure jit-compiled similarity kernel) and the descriptor names.
"""

from engine.descriptors import DESCRIPTORS, Descriptor, Whitening
from engine.extractor import Extractor
from engine.model import VGG, ModelConfig
from engine.search import merge_topk, topk
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
