"""Crash-safe file writes and checksums.

Every file the engine writes goes through `atomic_write`: a temporary file in the same folder,
flushed and fsynced, renamed over the target, then the folder fsynced, so a reader sees either the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

UMASK = os.umask(0)
os.umask(UMASK)

CACHE_ENV = "VGG_RETRIEVAL_CACHE"


def cache_root() -> str:
  """The engine's per-user cache (converted weights, exported models, compiled kernels):
  `$VGG_RETRIEVAL_CACHE`, default `~/.cache/vgg-retrieval`."""
  return os.environ.get(CACHE_ENV) or os.path.join(
    os.path.expanduser("~"), ".cache", "vgg-retrieval"
  )


def fsync_dir(path: str | os.PathLike) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
  """Calls `write(f)` on a temporary binary file, then atomically moves it to `path`."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    os.chmod(tmp, 0o666 & ~UMASK)
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON, creating the parent folder if needed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()
