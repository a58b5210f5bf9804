"""Self-contained HTML pages of results: thumbnails embedded as data URIs, every name escaped."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
import stat

from PIL import Image, ImageOps

from engine.common.fileio import atomic_write
from engine.features import images

THUMB_SIDE = 160

_STYLE = """
body { font-family: sans-serif; margin: 1em; background: #fafafa; color: #222; }
h1 { font-size: 1.3em; } .note { color: #a00; font-weight: bold; }
.row { display: flex; gap: 10px; align-items: flex-start; margin: 12px 0; padding: 8px;
       background: #fff; border: 1px solid #ddd; overflow-x: auto; }
figure { margin: 0; width: 170px; flex: none; text-align: center; font-size: 11px; }
figure.query { border-right: 3px solid #36c; padding-right: 10px; }
figure img, .missing { width: 160px; height: 160px; object-fit: contain; background: #eee; }
.missing { display: flex; align-items: center; justify-content: center; color: #888; }
figcaption { word-break: break-all; } .score { font-weight: bold; color: #363; }
"""


@dataclasses.dataclass
class Row:
  """One query (or one group) and its matches: (path, score) pairs."""

  title: str
  query: str | None
  matches: list[tuple[str, float]]


def thumbnail_jpeg(path: str, side: int = THUMB_SIDE) -> bytes | None:
  """A small JPEG of the image (longer side at most `side`), or None when it cannot be decoded."""
  images.register_optional_formats()
  try:
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
      return None
    with Image.open(path) as img:
      if img.width * img.height > images.MAX_PIXELS:
        return None
      img.draft("RGB", (side, side))
      img = ImageOps.exif_transpose(img)
      img = images.to_rgb(img)
      img.thumbnail((side, side))
      buf = io.BytesIO()
      img.save(buf, "JPEG", quality=80)
  except Exception:  # noqa: BLE001 - a thumbnail is optional: any failure shows a placeholder
    return None
  return buf.getvalue()


def thumbnail_uri(path: str, side: int = THUMB_SIDE) -> str | None:
  """`thumbnail_jpeg` as a data: URI, or None when the image cannot be decoded."""
  jpeg = thumbnail_jpeg(path, side)
  if jpeg is None:
    return None
  return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _figure(path: str, caption: str, cls: str = "") -> str:
  uri = thumbnail_uri(path)
  name = html.escape(os.path.basename(path) or path)
  full = html.escape(path)
  pic = (
    f'<img src="{uri}" alt="{name}" title="{full}">'
    if uri
    else f'<div class="missing" title="{full}">no preview</div>'
  )
  return f'<figure class="{cls}">{pic}<figcaption>{caption}<br>{name}</figcaption></figure>'


def render(title: str, rows: list[Row], note: str | None = None) -> str:
  parts = [
    "<!DOCTYPE html>",
    '<html lang="en"><head><meta charset="utf-8">',
    f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
    f"<h1>{html.escape(title)}</h1>",
  ]
  if note:
    parts.append(f'<p class="note">{html.escape(note)}</p>')
  for row in rows:
    parts.append(f"<h2>{html.escape(row.title)}</h2>")
    parts.append('<div class="row">')
    if row.query is not None:
      parts.append(_figure(row.query, "query", "query"))
    for rank, (path, score) in enumerate(row.matches, 1):
      parts.append(_figure(path, f'#{rank} <span class="score">{score:.4f}</span>'))
    if not row.matches:
      parts.append("<p>no match</p>")
    parts.append("</div>")
  parts.append("</body></html>")
  return "\n".join(parts) + "\n"


def write(path: str, title: str, rows: list[Row], note: str | None = None) -> None:
  # A file name that is not UTF-8 shows its odd bytes as \udcXX escapes.
  text = render(title, rows, note).encode("utf-8", "backslashreplace")
  atomic_write(path, lambda f: f.write(text))
