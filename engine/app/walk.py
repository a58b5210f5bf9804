"""Finding images in a folder: recursive, symlink-loop safe, by content as well as by extension."""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator

from engine.features import images


@dataclasses.dataclass(frozen=True)
class Found:
  """A file met while walking.

  Attributes:
    path: the file's path (as walked, not resolved).
    error: why it is not usable, or None for an image.
  """

  path: str
  error: str | None = None


def _is_candidate(path: str) -> str | None:
  """None if `path` is a decodable image; a reason if it looks like an image but is not; "" if
  it is some other kind of file (skipped silently)."""
  ext = os.path.splitext(path)[1].lower()
  try:
    if os.path.getsize(path) == 0:
      return "empty file (0 bytes)" if ext in images.IMAGE_EXTENSIONS else ""
  except OSError as e:
    return f"cannot stat: {e.strerror}"
  reason = images.probe(path)
  if reason is None:
    return None
  if "too large" in reason:  # an image, refused by the decompression-bomb guard
    return reason
  if ext in images.IMAGE_EXTENSIONS:
    if not os.access(path, os.R_OK):
      return "permission denied"
    return "not a decodable image (unknown format or corrupt header)"
  return ""


def find_images(root: str | os.PathLike) -> Iterator[Found]:
  """Yields every image under `root` (or `root` itself if it is a file), sorted per folder.

  Symlinks to folders are followed once: a folder already visited (same device and inode) is
  skipped, so loops end. Files whose name says image but whose content does not are yielded with
  an error; other non-image files are skipped silently.
  """
  root = os.fspath(root)
  if not os.path.exists(root):
    raise FileNotFoundError(f"{root}: no such file or folder")
  if not os.path.isdir(root):
    reason = _is_candidate(root)
    yield Found(root, reason or (None if reason is None else "not an image"))
    return
  seen: set[tuple[int, int]] = set()
  stack = [root]
  while stack:
    folder = stack.pop()
    try:
      st = os.stat(folder)
    except OSError:
      continue
    if (st.st_dev, st.st_ino) in seen:
      continue
    seen.add((st.st_dev, st.st_ino))
    try:
      with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
      yield Found(folder, f"cannot list folder: {e.strerror}")
      continue
    subfolders = []
    for entry in entries:
      try:
        is_dir = entry.is_dir(follow_symlinks=True)
        is_file = entry.is_file(follow_symlinks=True)
      except OSError:
        is_dir = is_file = False
      if is_dir:
        subfolders.append(entry.path)
      elif is_file:
        reason = _is_candidate(entry.path)
        if reason != "":
          yield Found(entry.path, reason)
      elif (
        entry.is_symlink() and os.path.splitext(entry.name)[1].lower() in images.IMAGE_EXTENSIONS
      ):
        yield Found(entry.path, _link_target_kind(entry.path))
    stack.extend(reversed(subfolders))


def _link_target_kind(path: str) -> str:
  """Why a symbolic link that is neither a file nor a folder is skipped."""
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return "broken symbolic link"
  for test, kind in (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
  ):
    if test(mode):
      return f"symbolic link to {kind}, not a file"
  return "symbolic link to something that is not a file"


def split_images(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
  """(image paths, [(path, reason)] for files that look like images but are not) under `root`."""
  good, bad = [], []
  for found in find_images(root):
    if found.error:
      bad.append((found.path, found.error))
    else:
      good.append(found.path)
  return good, bad
