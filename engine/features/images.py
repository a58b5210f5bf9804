"""Files -> RGB uint8 pixels: decoding, orientation, odd modes, and a prefetching thread pool.

Every decode either returns an array of the policy's shape or raises `ImageError` with a reason a
person can read; callers log and skip, so one bad file never ends a run.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.common.errors import UserError
from engine.features.preprocess import Preprocessing

# Larger images are refused (decompression-bomb guard); 20000 x 20000 = 400M is over it.
MAX_PIXELS = 150_000_000
# And images whose decoding would need more memory than this: the budget is in bytes, per mode
# (`decode_bytes`), so a 16-bit or float image counts for more than an 8-bit one of its size.
MAX_DECODE_BYTES = 1_200_000_000
# Peak bytes per pixel of decoding a mode and converting it to RGB: Pillow's own buffer, the numpy
# view of a high-bit-depth image (`to_l8`), the 8-bit result and Pillow's 4-byte RGB.
_PEAK_BYTES_PER_PIXEL = {"1": 5, "L": 5, "P": 5, "I;16": 9, "I": 13, "F": 13}
_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_BLOCK_PIXELS = 1 << 20  # high-bit-depth conversion works on blocks of rows of about this many

IMAGE_EXTENSIONS = frozenset(
  ".jpg .jpeg .jpe .jfif .png .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm .ico .tga"
  " .j2k .jp2 .heic .heif .hif .avif .svg".split()
)

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


class ImageError(UserError):
  """A file that could not be turned into pixels; str() is the reason."""


@functools.cache
def register_optional_formats() -> tuple[str, ...]:
  """Registers the decoders of optional extras with Pillow, once, on first decode (not on import).

  HEIC/HEIF (phone photos) come from pillow-heif, the `heif` extra. Returns the formats added.
  """
  try:
    import pillow_heif  # the optional extra; imported on first decode, not on import
  except ImportError:
    return ()  # HEIC/HEIF files then fail with a reason that names the extra (`_unrecognised`)
  pillow_heif.register_heif_opener()
  return ("HEIF",)


_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def _unrecognised(path: str | os.PathLike) -> str:
  """The reason for a file Pillow does not recognise: HEIC/HEIF without its extra is named."""
  try:
    if hasattr(path, "read"):  # an upload's BytesIO, or any open binary file
      pos = path.tell()
      path.seek(0)
      head = path.read(12)
      path.seek(pos)
    else:
      with open(path, "rb") as f:
        head = f.read(12)
  except (OSError, ValueError):
    head = b""
  if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS and not register_optional_formats():
    return "HEIC/HEIF photo: install the heif extra (pip install pillow-heif) to read it"
  return "not a recognised image format"


def _open(path: str | os.PathLike) -> Image.Image:
  register_optional_formats()
  try:
    img = Image.open(path)
  except UnidentifiedImageError as e:
    raise ImageError(_unrecognised(path)) from e
  except Image.DecompressionBombError as e:
    raise ImageError(f"image too large ({e})") from e
  except FileNotFoundError as e:
    raise ImageError("file not found") from e
  except PermissionError as e:
    raise ImageError("permission denied") from e
  except IsADirectoryError as e:
    raise ImageError("is a directory") from e
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageError(f"cannot open: {e}") from e
  w, h = img.size
  if w < 1 or h < 1:
    img.close()
    raise ImageError(f"empty image ({w}x{h})")
  if w * h > MAX_PIXELS:
    img.close()
    raise ImageError(f"image too large ({w}x{h} pixels, limit {MAX_PIXELS})")
  need = decode_bytes(img.mode, w, h)
  if need > MAX_DECODE_BYTES:
    img.close()
    raise ImageError(
      f"image too large to decode ({w}x{h} {img.mode}: about {need / 1e6:.0f} MB, limit "
      f"{MAX_DECODE_BYTES / 1e6:.0f} MB)"
    )
  return img


def decode_bytes(mode: str, width: int, height: int) -> int:
  """Peak memory in bytes of decoding a `mode` image of this size into RGB pixels."""
  key = "I;16" if mode.startswith("I;16") else mode
  return width * height * _PEAK_BYTES_PER_PIXEL.get(key, 9)


def probe(path: str | os.PathLike) -> str | None:
  """None when the file opens as an image within the size limit (header only), else the reason."""
  try:
    _open(path).close()
  except ImageError as e:
    return str(e)
  except Exception as e:  # noqa: BLE001 - any failure means "not an image we can read"
    return f"cannot open: {e}"
  return None


def sniff(path: str | os.PathLike) -> bool:
  """True when the file's content is an image Pillow can decode (reads the header only)."""
  register_optional_formats()
  try:
    with Image.open(path):
      return True
  except Exception:  # noqa: BLE001 - any failure means "not an image we can read"
    return False


def to_rgb(img: Image.Image) -> Image.Image:
  """Any Pillow mode -> RGB; transparency is composited over white."""
  if img.mode in _HIGH_BIT_DEPTH:
    img = Image.fromarray(to_l8(img), "L")
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(background, rgba)
  return img.convert("RGB") if img.mode != "RGB" else img


def to_l8(img: Image.Image) -> np.ndarray:
  """A 16-bit, 32-bit integer or float grey image -> `[H, W]` uint8, scaled to its range (16-bit
  and wide integers by their full scale, float by min..max), one block of rows at a time in float32
  so no temporary of the whole image is wider than the image itself."""
  arr = np.asarray(img)
  if img.mode == "F":
    finite = np.isfinite(arr)
    lo = float(arr.min(initial=0.0, where=finite))
    hi = float(arr.max(initial=1.0, where=finite))
    offset, scale = lo, 255.0 / max(hi - lo, 1e-12)
  else:
    top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    offset, scale = 0.0, 255.0 / top
  out = np.empty(arr.shape, np.uint8)
  step = max(1, _BLOCK_PIXELS // max(1, arr.shape[1]))
  for r in range(0, arr.shape[0], step):
    block = arr[r : r + step].astype(np.float32)
    block -= offset
    block *= scale
    block += 0.5
    np.clip(np.nan_to_num(block, nan=0.0), 0, 255, out=block)
    out[r : r + step] = block
  return out


def _resize(img: Image.Image, pre: Preprocessing) -> Image.Image:
  w, h = img.size
  if pre.resize == "center_crop":
    # torchvision's Resize + CenterCrop: long side truncated, crop offsets rounded.
    short = round(pre.size * 256 / 224)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = int(round((nw - pre.size) / 2)), int(round((nh - pre.size) / 2))
    return img.crop((left, top, left + pre.size, top + pre.size))
  out_h, out_w = pre.output_shape(w, h)
  return img.resize((out_w, out_h), Image.BILINEAR)


def _draft_size(img: Image.Image, pre: Preprocessing) -> tuple[int, int]:
  """Smallest decode size (in file orientation) that still covers the policy's output."""
  w, h = img.size
  try:
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # noqa: BLE001 - broken EXIF: decode as stored
    orientation = 1
  if orientation in _SWAPS_AXES:
    w, h = h, w
  if pre.resize == "center_crop":
    short = round(pre.size * 256 / 224)
    scale = short / min(w, h)
    need_w, need_h = w * scale, h * scale
  else:
    need_h, need_w = pre.output_shape(w, h)
  if orientation in _SWAPS_AXES:
    need_w, need_h = need_h, need_w
  return int(need_w), int(need_h)


def prepare(img: Image.Image, pre: Preprocessing) -> np.ndarray:
  """A Pillow image (any mode) -> `[H, W, 3]` uint8 RGB of the policy's shape."""
  arr = np.asarray(_resize(to_rgb(img), pre), dtype=np.uint8)
  if arr.ndim != 3 or arr.shape[2] != 3:
    raise ImageError(f"unexpected decoded shape {arr.shape}")
  return arr


def from_array(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
  """`[H, W]` or `[H, W, 1|3|4]` uint8 pixels -> the policy's `[h, w, 3]` uint8 RGB."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8:
    raise ValueError(f"pixel arrays must be uint8 in [0, 255], got {pixels.dtype}")
  if pixels.ndim == 3 and pixels.shape[2] == 1:
    pixels = pixels[..., 0]
  if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
    raise ValueError(f"pixel arrays must be [H, W], [H, W, 1|3|4], got {pixels.shape}")
  h, w = pixels.shape[:2]
  if (h, w) == pre.output_shape(w, h) and pixels.ndim == 3 and pixels.shape[2] == 3:
    return pixels
  return prepare(Image.fromarray(pixels), pre)


def load(path: str | os.PathLike, pre: Preprocessing) -> np.ndarray:
  """Decodes one file into `[H, W, 3]` uint8 RGB of the policy's shape.

  JPEGs decode at a reduced scale when the output is much smaller (draft mode); EXIF orientation
  is applied; animated images give their first frame.
  Truncated files raise under Pillow's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`, which
  this module leaves to the application.

  Raises:
    ImageError: unreadable, undecodable, truncated, too large or empty.
  """
  img = _open(path)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      if img.format == "JPEG":
        img.draft("RGB", _draft_size(img, pre))
      img.load()
      return prepare(ImageOps.exif_transpose(img), pre)
  except ImageError:
    raise
  except Image.DecompressionBombWarning as e:
    raise ImageError(f"image too large: {e}") from e
  except (
    OSError,
    ValueError,
    SyntaxError,
    MemoryError,
    EOFError,
    Image.DecompressionBombError,
  ) as e:
    raise ImageError(f"cannot decode: {e}") from e
  finally:
    img.close()


def load_many(
  paths: Iterable[str | os.PathLike],
  pre: Preprocessing,
  *,
  workers: int | None = None,
  prefetch: int = 64,
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
  """Decodes files in a thread pool, yielding `(position, pixels or None, error or None)` in order.

  At most `prefetch` decodes are in flight, so memory stays bounded on endless inputs while the
  consumer (the device) works on earlier images.
  """
  workers = workers or min(8, (os.cpu_count() or 2))

  def job(path):
    try:
      return load(path, pre), None
    except ImageError as e:
      return None, str(e)

  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
    pending = []
    it = iter(enumerate(paths))
    for pos, path in it:
      pending.append((pos, pool.submit(job, path)))
      if len(pending) >= prefetch:
        break
    while pending:
      pos, fut = pending.pop(0)
      nxt = next(it, None)
      if nxt is not None:
        pending.append((nxt[0], pool.submit(job, nxt[1])))
      arr, err = fut.result()
      yield pos, arr, err


def rescale(batch_bhw3: np.ndarray, scale: float) -> np.ndarray:
  """[B, H, W, 3] uint8 -> [B, round(H * scale), round(W * scale), 3] uint8, bilinear (Pillow),
  at least 32 pixels a side (the network's stride)."""
  b, h, w, _ = batch_bhw3.shape
  size = (max(32, round(w * scale)), max(32, round(h * scale)))
  out = np.empty((b, size[1], size[0], 3), np.uint8)
  for i in range(b):
    out[i] = np.asarray(Image.fromarray(batch_bhw3[i]).resize(size, Image.BILINEAR))
  return out
