"""Provenance of the published VGG-16 ImageNet weight files, as data.

Each entry says where the file lives, what it is checked against, which pixel convention the weights
expect and under which licence they are published. Only hashes published by someone other than this
project are recorded; where no full sha256 is published, `sha256` is None and `weights.fetch` checks
what is known (Keras's md5, torchvision's sha256 prefix in the filename) and prints the sha256 it
computed.

Where each checksum comes from:

- Keras: `keras.applications.vgg16` downloads the file with
  `get_file(..., file_hash="64373286793e3c8b2b4e3219cbf3544b")` (32 hex digits: md5). Keras's own
  download log shows 553467096 bytes.
- torchvision: the filename carries the first 8 hex digits of the file's sha256 (`397923af`); the full
  sha256 and the size (553433881 bytes) are the ones recorded by many independent projects that pin
  this file.
- timm: the Hugging Face hub shows the Git LFS object's sha256 (the file's sha256) on the file's page;
  the hub rounds the size (553 MB), so no exact size is recorded.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Source:
  """One published weights file.

  Attributes:
    name: the `--source` value (`keras_h5`, `torchvision`, `timm`).
    filename: the published file name.
    url: where `weights.fetch` downloads it from.
    convention: pixel convention the weights expect (`caffe` or `torch`, see engine.preprocess).
    licence: licence the weights are published under.
    homepage: where the publisher documents the file.
    sha256: full sha256 of the file, or None when none is published.
    sha256_prefix: leading hex digits of the sha256 that the publisher embeds in the filename.
    md5: md5 the publisher checks downloads against, or None.
    size: size in bytes, or None when not known exactly.
  """

  name: str
  filename: str
  url: str
  convention: str
  licence: str
  homepage: str
  sha256: str | None = None
  sha256_prefix: str | None = None
  md5: str | None = None
  size: int | None = None


KERAS_H5 = Source(
  name="keras_h5",
  filename="vgg16_weights_tf_dim_ordering_tf_kernels.h5",
  url=(
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
  ),
  convention="caffe",
  # The VGG authors' Caffe weights (CC BY 4.0), converted to Keras layout by the Keras authors.
  licence="CC-BY-4.0",
  homepage="https://keras.io/api/applications/vgg/",
  md5="64373286793e3c8b2b4e3219cbf3544b",
  size=553467096,
)

TORCHVISION = Source(
  name="torchvision",
  filename="vgg16-397923af.pth",
  url="https://download.pytorch.org/models/vgg16-397923af.pth",
  convention="torch",
  licence="BSD-3-Clause",
  homepage="https://pytorch.org/vision/stable/models/generated/torchvision.models.vgg16.html",
  sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
  sha256_prefix="397923af",
  size=553433881,
)

TIMM = Source(
  name="timm",
  filename="model.safetensors",
  url="https://huggingface.co/timm/vgg16.tv_in1k/resolve/main/model.safetensors",
  convention="torch",
  licence="BSD-3-Clause",
  homepage="https://huggingface.co/timm/vgg16.tv_in1k",
  sha256="57b026918159a6bf9faf8405c3a551903768e7138989d9c6224a14227203fad8",
)

SOURCES: dict[str, Source] = {s.name: s for s in (KERAS_H5, TORCHVISION, TIMM)}


def get(name: str) -> Source:
  """The source called `name`; ValueError naming the known ones otherwise."""
  if name not in SOURCES:
    raise ValueError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
  return SOURCES[name]
