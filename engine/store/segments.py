"""Segment files: the vectors of one commit as .npy files, written once and memory-mapped.

A segment `seg-NNNNNN` is up to three files: `seg-NNNNNN.npy` ([rows, dim] in the storage dtype;
bfloat16 as uint16 bit patterns), `seg-NNNNNN.scale.npy` ([rows] float32 per-row scales, int8 only:
vector ~= int8 * scale) and `seg-NNNNNN.f32.npy` (a float32 copy, for re-ranking). Each is written
atomically and described in the manifest by its byte size, sha256 and a sha256 of 64 rows spread
over it (`sample_sha256`, cheap enough to check on every open).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import stat
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from engine.common import fileio
from engine.store import faults
from engine.store.errors import IndexCorruptError

DTYPES = ("float32", "float16", "bfloat16", "int8")
ON_DISK = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}
IN_MEMORY = {
  "float32": np.float32,
  "float16": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int8": np.int8,
}
# role -> file suffix after the segment name
SUFFIXES = {"vectors": ".npy", "scales": ".scale.npy", "float32": ".f32.npy"}
NAME_RE = re.compile(r"^seg-(\d{6,})$")
_FILE_RE = re.compile(r"^seg-\d{6,}(?:\.scale|\.f32)?\.npy$")
# fileio.atomic_write's temporary names for the files above: .<name>.<8 random chars>.tmp
_TEMP_RE = re.compile(r"^\.seg-\d{6,}(?:\.scale|\.f32)?\.npy\.[A-Za-z0-9_]{8}\.tmp$")
CHUNK_ROWS = 65536  # rows per streamed read (normalising, compacting)
_SAMPLE_ROWS = 64
_WRITE_BYTES = 16 << 20  # at most this many bytes per write call of a segment file
# Size-tiered merging (`merge_run`): segments below MERGE_FLOOR bytes form the lowest tier; each
# tier spans a factor MERGE_FANOUT, and MERGE_FANOUT neighbours of one tier merge into one.
MERGE_FLOOR = 8 << 20
MERGE_FANOUT = 4


def segment_name(number: int) -> str:
  return f"seg-{number:06d}"


def segment_number(name: str) -> int:
  m = NAME_RE.match(name)
  if not m:
    raise ValueError(f"{name!r} is not a segment name")
  return int(m.group(1))


def is_segment_file(fname: str) -> bool:
  """Whether `fname` is a name this engine gives a segment file or its temporary."""
  return bool(_FILE_RE.match(fname) or _TEMP_RE.match(fname))


@dataclasses.dataclass
class Segment:
  """One mapped segment: its rows, their keys and tombstones."""

  name: str
  rows: int
  base: int  # global row number of row 0
  vectors: np.ndarray  # [rows, dim] memmap, in-memory dtype view
  scales: np.ndarray | None  # [rows] float32 memmap
  float32: np.ndarray | None  # [rows, dim] float32 memmap
  keys: np.ndarray  # [rows] object
  deleted: np.ndarray  # [rows] bool
  files: dict

  def dequantize(self, rows: np.ndarray | slice) -> np.ndarray:
    """[n, dim] float32 stored vectors of `rows` (int8 times its scales)."""
    x = np.asarray(self.vectors[rows]).astype(np.float32)
    if self.scales is not None:
      x *= np.asarray(self.scales[rows])[:, None]
    return x


def expected(role: str, dtype: str, rows: int, dim: int) -> tuple[np.dtype, tuple[int, ...]]:
  """The on-disk dtype and shape of a segment file of `role`."""
  if role == "vectors":
    return np.dtype(ON_DISK[dtype]), (rows, dim)
  if role == "scales":
    return np.dtype(np.float32), (rows,)
  if role == "float32":
    return np.dtype(np.float32), (rows, dim)
  raise IndexCorruptError(f"unknown segment file role {role!r}")


def _npy_header(path: str) -> tuple[np.dtype, tuple[int, ...], int]:
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise ValueError(f"unsupported npy version {version}")
    if fortran:
      raise ValueError("Fortran-ordered array")
    return dtype, shape, f.tell()


def map_file(fpath: str, want_dtype, want_shape, info: dict, verify: bool) -> np.ndarray:
  """Memory-maps one segment file after checking it against its manifest entry `info`."""
  try:
    st = os.lstat(fpath)
  except FileNotFoundError:
    raise IndexCorruptError(f"segment file {fpath} listed in the manifest is missing") from None
  if not stat.S_ISREG(st.st_mode):
    raise IndexCorruptError(f"segment file {fpath} is not a regular file")
  try:
    dt, shape, offset = _npy_header(fpath)
  except (ValueError, OSError, SyntaxError) as e:
    raise IndexCorruptError(f"segment file {fpath} has a bad npy header: {e}") from None
  if dt != want_dtype or tuple(shape) != tuple(want_shape):
    raise IndexCorruptError(
      f"segment file {fpath} holds {dt} {tuple(shape)}, manifest expects {want_dtype} "
      f"{tuple(want_shape)}"
    )
  want_size = offset + int(np.prod(want_shape)) * want_dtype.itemsize
  if st.st_size != want_size or st.st_size != info.get("bytes", st.st_size):
    raise IndexCorruptError(
      f"segment file {fpath} is {st.st_size} bytes, expected {want_size} (truncated or overwritten)"
    )
  if verify and fileio.sha256_file(fpath) != info.get("sha256"):
    raise IndexCorruptError(f"segment file {fpath} fails its sha256 checksum")
  if want_shape[0] == 0:
    return np.zeros(want_shape, want_dtype)
  try:
    arr = np.load(fpath, mmap_mode="r")
  except FileNotFoundError:  # removed since the checks above: a writer's commit replaced it
    raise IndexCorruptError(f"segment file {fpath} listed in the manifest is missing") from None
  if "sample_sha256" in info and _sample_digest(arr) != info["sample_sha256"]:
    raise IndexCorruptError(
      f"segment file {fpath} fails its sample checksum (damaged or replaced by another file)"
    )
  return arr


class _HashingWriter:
  """A write-only file wrapper that hashes what passes through (saves re-reading the file)."""

  def __init__(self, f):
    self._f = f
    self.sha = hashlib.sha256()
    self.size = 0

  def write(self, b) -> int:
    self.sha.update(b)
    self.size += len(memoryview(b).cast("B"))
    n = self._f.write(b)
    faults.reached("segment_write")
    return n


def write_npy(path: str, array: np.ndarray) -> dict:
  """Writes `array` as .npy atomically (temp file, fsync, rename); returns its manifest entry."""
  array = np.ascontiguousarray(array)
  n = array.shape[0]
  step = max(1, _WRITE_BYTES // max(1, array[:1].nbytes))
  parts = (array[a : a + step] for a in range(0, n, step))
  return write_npy_parts(path, array.dtype, array.shape[1:], n, parts)


def _sample_rows(n: int) -> np.ndarray:
  return np.unique(np.linspace(0, n - 1, min(n, _SAMPLE_ROWS)).astype(np.int64)) if n else []


def write_npy_parts(path: str, dtype: np.dtype, tail: tuple[int, ...], n: int, parts) -> dict:
  """Writes n rows arriving as an iterable of arrays as one .npy (temp file, fsync, rename), holding
  one part in memory at a time; returns its manifest entry (bytes, sha256, sample_sha256).

  Refuses to replace an existing file: a segment name is never reused.
  """
  if os.path.lexists(path):
    raise IndexCorruptError(f"segment file {path} already exists: refusing to overwrite it")
  dtype = np.dtype(dtype)
  header = np.lib.format.header_data_from_array_1_0(np.empty((0, *tail), dtype))
  header["shape"] = (n, *tail)
  sample = np.asarray(_sample_rows(n), np.int64)
  out = {}

  def write(f):
    w = _HashingWriter(f)
    np.lib.format.write_array_header_1_0(w, header)
    seen, picked = 0, []
    for part in parts:
      part = np.ascontiguousarray(part)
      if part.dtype != dtype or part.shape[1:] != tail:
        raise ValueError(f"part {part.dtype} {part.shape} for rows {dtype} {tail}")
      here = sample[(sample >= seen) & (sample < seen + len(part))] - seen
      picked.extend(part[here])
      seen += len(part)
      w.write(part.reshape(-1).view(np.uint8))
    if seen != n:
      raise ValueError(f"{seen} rows written, {n} announced")
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(r).tobytes() for r in picked))
    out.update(bytes=w.size, sha256=w.sha.hexdigest(), sample_sha256=digest.hexdigest())

  fileio.atomic_write(path, write)
  faults.reached("segment_file")
  return {"file": os.path.basename(path), **out}


def _sample_digest(array: np.ndarray) -> str:
  """sha256 of up to _SAMPLE_ROWS rows spread over the array: cheap enough for every open."""
  rows = _sample_rows(array.shape[0])
  return hashlib.sha256(np.ascontiguousarray(array[rows]).tobytes()).hexdigest()


def normalize_rows(x: np.ndarray) -> np.ndarray:
  """Unit rows, in x's float dtype; norms accumulate in float64 one block at a time (no [N, D]
  float64 temporary)."""
  out = np.empty_like(x)
  big = np.finfo(x.dtype).max
  for a in range(0, x.shape[0], CHUNK_ROWS):
    b = x[a : a + CHUNK_ROWS]
    n = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))
    n = np.where(n > 0, n, 1.0)
    o = out[a : a + len(b)]
    np.divide(b, np.minimum(n, big).astype(x.dtype)[:, None], out=o)
    huge = np.flatnonzero(n > big)  # the norm itself overflows x's dtype: divide in float64
    o[huge] = b[huge].astype(np.float64) / n[huge, None]
  return out


def check_representable(x: np.ndarray, dtype: str) -> None:
  """Refuses [N, D] float32 rows holding values that the storage dtype cannot hold."""
  if dtype in ("float16", "bfloat16") and x.size:
    amax = float(np.max(np.abs(x)))
    with np.errstate(over="ignore"):
      stored = np.asarray(amax, np.float32).astype(IN_MEMORY[dtype])
    if not np.isfinite(stored):
      raise ValueError(f"vectors hold values up to {amax:g}, beyond what {dtype} can store")


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric per-row int8: [N, D] float -> ([N, D] int8, [N] float32 scale), x ~= q * scale."""
  amax = np.max(np.abs(x), axis=1)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
  return q, scale


def write_segment(folder: str, name: str, vectors: np.ndarray, dtype: str, keep_float32: bool):
  """Writes (and fsyncs) the files of one new segment; returns its manifest `files` entry."""
  p = os.path.join(folder, name)
  files = {}
  if dtype == "int8":
    q, scale = quantize_int8(vectors)
    files["vectors"] = write_npy(p + SUFFIXES["vectors"], q)
    files["scales"] = write_npy(p + SUFFIXES["scales"], scale)
  elif dtype == "bfloat16":
    bits = vectors.astype(ml_dtypes.bfloat16).view(np.uint16)
    files["vectors"] = write_npy(p + SUFFIXES["vectors"], bits)
  else:
    files["vectors"] = write_npy(p + SUFFIXES["vectors"], vectors.astype(ON_DISK[dtype]))
  if keep_float32:
    files["float32"] = write_npy(p + SUFFIXES["float32"], vectors.astype(np.float32))
  return files


def open_segment(
  folder: str,
  entry: dict,
  dtype: str,
  dim: int,
  *,
  base: int,
  keys: np.ndarray,
  deleted: np.ndarray,
  verify: bool,
) -> Segment:
  """Maps every file of a (validated) manifest segment entry into a Segment at global row `base`."""
  rows = int(entry["rows"])
  arrays = {}
  for role, info in entry["files"].items():
    want_dtype, want_shape = expected(role, dtype, rows, dim)
    arrays[role] = map_file(
      os.path.join(folder, info["file"]), want_dtype, want_shape, info, verify
    )
  if dtype == "int8" and "scales" not in arrays:
    raise IndexCorruptError(f"manifest lists no scales file for int8 segment {entry['name']}")
  vectors = arrays["vectors"]
  return Segment(
    name=entry["name"],
    rows=rows,
    base=base,
    vectors=vectors.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else vectors,
    scales=arrays.get("scales"),
    float32=arrays.get("float32"),
    keys=keys,
    deleted=deleted,
    files=entry["files"],
  )


def compaction_plan(segs: list[Segment], max_rows: int) -> list[list[tuple[Segment, np.ndarray]]]:
  """The live rows of every segment, in order, cut into new segments of at most max_rows."""
  plans, cur, cur_rows = [], [], 0
  for seg in segs:
    live = np.flatnonzero(~seg.deleted)
    while live.size:
      take, live = live[: max_rows - cur_rows], live[max_rows - cur_rows :]
      cur.append((seg, take))
      cur_rows += take.size
      if cur_rows == max_rows:
        plans.append(cur)
        cur, cur_rows = [], 0
  if cur:
    plans.append(cur)
  return plans


def stored_parts(plan, role: str) -> Iterator[np.ndarray]:
  """The stored bytes of a plan's rows for one file role, a chunk at a time (never re-quantised)."""
  for seg, rows in plan:
    src = {"vectors": seg.vectors, "scales": seg.scales, "float32": seg.float32}[role]
    for a in range(0, rows.size, CHUNK_ROWS):
      part = np.asarray(src[rows[a : a + CHUNK_ROWS]])
      yield part.view(np.uint16) if part.dtype == ml_dtypes.bfloat16 else part


def merge_run(segs: list[Segment]) -> tuple[int, int] | None:
  """The next contiguous run of segments to merge, [start, stop), or None.

  A segment more than half tombstoned is rewritten alone; otherwise the last run of at least
  MERGE_FANOUT neighbours in one size tier (live bytes; tier t spans MERGE_FLOOR * FANOUT**[t, t+1))
  merges into one. Like a counter in base MERGE_FANOUT: at most FANOUT - 1 segments per tier stay,
  so a search or an open touches O(log size) segments, and each row is rewritten O(log size) times.
  """
  for i, s in enumerate(segs):
    if s.rows and s.deleted.sum() * 2 > s.rows:
      return i, i + 1
  tiers = []
  for s in segs:
    size = sum(f["bytes"] for f in s.files.values()) * (s.rows - int(s.deleted.sum()))
    size = max(size // max(s.rows, 1), MERGE_FLOOR)
    tiers.append(int(math.log(size / MERGE_FLOOR, MERGE_FANOUT) + 1e-9))
  stop = len(segs)
  while stop > 0:
    start = stop - 1
    while start > 0 and tiers[start - 1] == tiers[stop - 1]:
      start -= 1
    if stop - start >= MERGE_FANOUT:
      return start, stop
    stop = start
  return None
