"""The manifest: the commit point of an index, replaced atomically on every commit.

It holds {format, version, generation, dim, dtype, normalize, keep_float32, metadata,
next_segment, segments: [{name, rows, keys_sha256, files: {role: {file, bytes, sha256,
sample_sha256}}}], statistics_policy, statistics}: `statistics_policy` is "none", "center" or
"whiten[:DIM]" (what `engine.app.indexing` re-learns), `statistics` null or {kind, dim, rows,
learned_at, file, bytes, sha256} (engine/store/statistics.py); both optional, absent in indexes
written before them (no statistics).
"""

from __future__ import annotations

import json
import os
import re

from engine.common import fileio
from engine.store import faults, segments
from engine.store import statistics as stats_lib
from engine.store.errors import IndexCorruptError, IndexNotFoundError

FORMAT = "vgg-retrieval-index"
VERSION = 1
MANIFEST = "MANIFEST.json"
# fileio.atomic_write's temporary name for it: .MANIFEST.json.<8 random chars>.tmp
TEMP_RE = re.compile(r"^\.MANIFEST\.json\.[A-Za-z0-9_]{8}\.tmp$")


def path_of(folder: str) -> str:
  return os.path.join(folder, MANIFEST)


def new(dim: int, dtype: str, normalize: bool, keep_float32: bool, metadata: dict) -> dict:
  return {
    "format": FORMAT,
    "version": VERSION,
    "generation": 0,
    "dim": int(dim),
    "dtype": dtype,
    "normalize": bool(normalize),
    "keep_float32": bool(keep_float32) and dtype != "float32",
    "metadata": metadata,
    "next_segment": 1,
    "segments": [],
  }


def generation_on_disk(folder: str) -> int | None:
  """The generation of the manifest now on disk (None if unreadable)."""
  try:
    with open(path_of(folder), encoding="utf-8") as f:
      return json.load(f).get("generation")
  except (OSError, ValueError, AttributeError):
    return None


def read(folder: str) -> dict:
  """Reads and validates the manifest of `folder`."""
  mpath = path_of(folder)
  try:
    with open(mpath, encoding="utf-8") as f:
      m = json.load(f)
  except FileNotFoundError:
    raise IndexNotFoundError(f"manifest {mpath} is missing") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise IndexCorruptError(f"manifest {mpath} is not valid JSON: {e}") from None
  try:
    if m["format"] != FORMAT:
      raise IndexCorruptError(f"manifest {mpath}: format {m['format']!r} is not {FORMAT!r}")
    if m["version"] != VERSION:
      raise IndexCorruptError(
        f"manifest {mpath}: format version {m['version']} is not supported (expected {VERSION})"
      )
    if m["dtype"] not in segments.DTYPES or int(m["dim"]) <= 0:
      raise IndexCorruptError(f"manifest {mpath}: bad dtype/dim {m['dtype']!r}/{m['dim']!r}")
    numbers = set()
    for seg in m["segments"]:
      files = seg["files"]
      if (
        not segments.NAME_RE.match(seg["name"])
        or int(seg["rows"]) < 0
        or "vectors" not in files
        or any(f["file"] != seg["name"] + segments.SUFFIXES[r] for r, f in files.items())
      ):
        raise IndexCorruptError(f"manifest {mpath}: bad segment entry {seg!r}")
      numbers.add(segments.segment_number(seg["name"]))
    if len(numbers) != len(m["segments"]):
      raise IndexCorruptError(f"manifest {mpath} lists a segment twice")
    int(m["generation"])
    stats_lib.parse_policy(m.get("statistics_policy", "none"))
    if m.get("statistics") is not None:
      stats_lib.check_entry(m["statistics"], int(m["dim"]))
    if int(m["next_segment"]) <= max(numbers, default=0):
      raise IndexCorruptError(
        f"manifest {mpath}: next_segment {m['next_segment']} is not above every segment (the "
        "next commit would overwrite a live one)"
      )
  except (KeyError, TypeError, ValueError) as e:
    raise IndexCorruptError(f"manifest {mpath} is malformed: {e!r}") from None
  return m


def write(folder: str, m: dict) -> None:
  """Replaces the manifest atomically: the commit point."""
  fileio.atomic_write_json(path_of(folder), m)
  faults.reached("manifest")
