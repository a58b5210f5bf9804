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

CACHE_ENV = "VGG_RETRIEVAL_CACHE"
# Set to 1 (or true/yes) to neither read nor write the caches of derived artefacts: seeded random
# weights, JAX's compiled executables and OpenVINO's compiled models (recomputed every run).
NO_CACHE_ENV = "VGG_RETRIEVAL_NO_CACHE"


def cache_root() -> str:
  """The one per-user cache every reader and writer uses: `$VGG_RETRIEVAL_CACHE`, default
  `~/.cache/vgg-retrieval`. It holds fetched and converted weights (`weights.fetch`, found by
  `--weights=auto`), exported graphs (`exported/`), compiled kernels (`native/`), seeded random weights
  (`random-weights/`), JAX's compiled executables (`jax/`) and OpenVINO's (`openvino/`)."""
  return os.environ.get(CACHE_ENV) or os.path.join(
    os.path.expanduser("~"), ".cache", "vgg-retrieval"
  )


def caches_enabled() -> bool:
  """False when `$VGG_RETRIEVAL_NO_CACHE` asks for no caches of derived artefacts."""
  return os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def current_umask() -> int:
  """The process umask, read without changing it where the OS allows (Linux: /proc/self/status).

  Elsewhere it is set and restored at once, which another thread could observe.
  """
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


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
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), 0o666 & ~current_umask())  # as open() would; mkstemp gives 0o600
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


def file_digests(path: str | os.PathLike, *algorithms: str, chunk: int = 1 << 22) -> dict[str, str]:
  """Hex digests of a file's bytes in one pass, by hashlib name (default: sha256)."""
  hashes = {a: hashlib.new(a, usedforsecurity=False) for a in algorithms or ("sha256",)}
  with open(path, "rb") as f:
    while block := f.read(chunk):
      for h in hashes.values():
        h.update(block)
  return {a: h.hexdigest() for a, h in hashes.items()}


def sha256_file(path: str | os.PathLike) -> str:
  """The sha256 of a file's bytes, in hex: the checksum every manifest and record uses."""
  return file_digests(path, "sha256")["sha256"]
