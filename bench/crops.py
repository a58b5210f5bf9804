r"""Many distinct images from a few real photos: random crops, flips and JPEG qualities.

For measuring search on real extracted features where no large photo collection can be
downloaded: every crop is a different image, and crops of one photo overlap, so their descriptors
form the tight, uneven clusters of a real collection (near-duplicates, bursts, re-framings).

  python -m bench.crops --photos=../shared/data/imagededup-tests --n=3000 --output=/tmp/crops
  python -m engine.extract --images=/tmp/crops --descriptor=gem --weights=random --output=/tmp/feats
  python -m bench.search --features=/tmp/feats/features.npy --q=100
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from PIL import Image, ImageOps

from engine.app import walk
from engine.common.fileio import atomic_write

_PHOTOS = flags.DEFINE_string("photos", None, "Folder of source photos (searched recursively).")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the crops (JPEG).")
_N = flags.DEFINE_integer("n", 3000, "Number of crops.", lower_bound=1)
_SIDE = flags.DEFINE_integer("side", 320, "Longer side of each saved crop.", lower_bound=32)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
flags.mark_flags_as_required(["photos", "output"])


def load_photos(folder: str) -> list[Image.Image]:
  """Every decodable raster image under `folder`, RGB; undecodable files are skipped."""
  out = []
  for path in sorted(walk.split_images(os.path.abspath(folder))[0]):
    try:
      with Image.open(path) as im:
        out.append(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError) as e:
      print(f"skipping {path}: {e}")
  return out


def crop(img: Image.Image, rng: np.random.Generator, side: int) -> Image.Image:
  """A random box covering 25-100% of each side, maybe mirrored, resized to `side`."""
  w, h = img.size
  cw, ch = (max(8, int(s * rng.uniform(0.25, 1.0))) for s in (w, h))
  x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
  out = img.crop((x0, y0, x0 + cw, y0 + ch))
  if rng.random() < 0.5:
    out = ImageOps.mirror(out)
  out.thumbnail((side, side), Image.BILINEAR)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  photos = load_photos(_PHOTOS.value)
  if not photos:
    raise app.UsageError(f"no decodable photos under {_PHOTOS.value}")
  os.makedirs(_OUTPUT.value, exist_ok=True)
  rng = np.random.default_rng(_SEED.value)
  for i in range(_N.value):
    src = int(rng.integers(len(photos)))
    img = crop(photos[src], rng, _SIDE.value)
    quality = int(rng.integers(60, 96))
    path = os.path.join(_OUTPUT.value, f"crop_{i:05d}_of_{src:02d}.jpg")
    atomic_write(path, lambda f, img=img, q=quality: img.save(f, "JPEG", quality=q))
  print(f"wrote {_N.value} crops of {len(photos)} photos to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
