r"""A generated photo collection with known near-duplicates, for demos, tests and benchmarks.

  python -m engine.sample --output=DIR [--scenes=48] [--seed=0]

Writes DIR/photos/ (synthetic scenes: gradients, shapes, textures, as JPEG and PNG),
DIR/queries/ (transformed copies of some scenes: flips, crops, rotations, rescaling, JPEG
re-compression, colour shifts, overlays) and DIR/ground_truth.json (query file -> the photo it
was made from). Everything is drawn from a seeded generator: the same seed gives the same files.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from engine.common.fileio import atomic_write, atomic_write_json


def scene(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
  """A random scene: a two-colour gradient, textured noise, and a few shapes."""
  c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  angle = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
  base = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
  freq = rng.uniform(0.01, 0.08)
  texture = np.sin(xx * freq + rng.uniform(0, 6)) * np.cos(yy * freq * rng.uniform(0.5, 2))
  base += texture[..., None] * rng.uniform(5, 40) + rng.normal(0, 6, (height, width, 3))
  img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(3, 9))):
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    w, h = rng.integers(30, width // 2), rng.integers(30, height // 2)
    box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    kind = rng.integers(0, 3)
    if kind == 0:
      draw.ellipse(box, fill=color)
    elif kind == 1:
      draw.rectangle(box, fill=color)
    else:
      draw.line(box, fill=color, width=int(rng.integers(4, 20)))
  return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
  """The image after a JPEG encode and decode at `quality`."""
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  buf.seek(0)
  return Image.open(buf).convert("RGB")


def _crop(img: Image.Image, frac: float) -> Image.Image:
  w, h = img.size
  cw, ch = int(w * frac), int(h * frac)
  left, top = (w - cw) // 2, (h - ch) // 2
  return img.crop((left, top, left + cw, top + ch))


def _overlay(img: Image.Image) -> Image.Image:
  out = img.copy()
  draw = ImageDraw.Draw(out)
  w, h = out.size
  draw.rectangle([0, int(h * 0.85), w, h], fill=(20, 20, 20))
  draw.text((10, int(h * 0.88)), "COPY  (c) overlay text", fill=(240, 240, 240))
  return out


# name -> transformation; each keeps the photo recognisable to a person.
TRANSFORMS = {
  "hflip": ImageOps.mirror,
  "crop80": lambda im: _crop(im, 0.8),
  "crop60": lambda im: _crop(im, 0.6),
  "rot90": lambda im: im.rotate(90, expand=True),
  "rot10": lambda im: im.rotate(10, resample=Image.BILINEAR, expand=False),
  "half": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
  "jpeg20": lambda im: jpeg_roundtrip(im, 20),
  "bright": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
  "colour": lambda im: ImageEnhance.Color(im).enhance(0.4),
  "gray": lambda im: ImageOps.grayscale(im).convert("RGB"),
  "overlay": _overlay,
}


def _save(img: Image.Image, path: str) -> None:
  fmt = "PNG" if path.endswith(".png") else "JPEG"
  atomic_write(path, lambda f: img.save(f, fmt, **({"quality": 90} if fmt == "JPEG" else {})))


def make_collection(
  output: str, scenes: int = 48, queries: int = 12, seed: int = 0
) -> dict[str, str]:
  """Writes photos/, queries/ and ground_truth.json under `output`; returns the ground truth."""
  rng = np.random.default_rng(seed)
  photos, qdir = os.path.join(output, "photos"), os.path.join(output, "queries")
  os.makedirs(photos, exist_ok=True)
  os.makedirs(qdir, exist_ok=True)
  names = []
  for i in range(scenes):
    w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
    ext = ".png" if i % 5 == 4 else ".jpg"
    name = os.path.join(photos, f"scene_{i:03d}{ext}")
    _save(scene(rng, w, h), name)
    names.append(name)
  truth = {}
  kinds = list(TRANSFORMS)
  for j in range(min(queries, scenes)):
    src = names[j * scenes // min(queries, scenes)]
    kind = kinds[j % len(kinds)]
    with Image.open(src) as im:
      out = TRANSFORMS[kind](im.convert("RGB"))
    qname = os.path.join(qdir, f"{os.path.splitext(os.path.basename(src))[0]}_{kind}.jpg")
    _save(out, qname)
    truth[os.path.abspath(qname)] = os.path.abspath(src)
  atomic_write_json(os.path.join(output, "ground_truth.json"), truth)
  return truth
