"""The on-disk index: append-only memory-mapped segments, a SQLite catalog and an atomic manifest.

Layout of an index folder (format version 1)::

  MANIFEST.json            the commit point, replaced atomically (see below)
  catalog.sqlite           SQLite (WAL) table `rows`: key, segment, row, sha256, size, mtime_ns,
                           added_gen, deleted_gen (NULL while the row is live)
  LOCK                     flock()ed by the single writer; readers never take it
  seg-000001.npy           [rows, dim] vectors in the storage dtype (bfloat16 as uint16 bit patterns)
  seg-000001.scale.npy     [rows] float32 per-row scales (int8 only: vector ~= int8 * scale)
  seg-000001.f32.npy       [rows, dim] float32 copy, only with keep_float32=True (for re-ranking)

The manifest holds {format, version, generation, dim, dtype, normalize, keep_float32, metadata,
next_segment, segments: [{name, rows, files: {role: {file, bytes, sha256}}}]}.

Commit protocol (`add`, `delete`, `compact`): new segment files are written under temporary names,
fsynced and renamed; then one catalog transaction inserts their rows and stamps tombstones with the
new generation; then the manifest with generation+1 replaces the old one atomically. A crash before
the manifest is replaced leaves the previous manifest in force, and on the next writer open every
trace of the interrupted commit is undone: catalog rows of segments the manifest does not list are
deleted, tombstones stamped with a generation above the manifest's are cleared, and files the
manifest does not list are removed. Readers apply the same rules without writing, so they always see
the last committed state.

Checks on open: the manifest's version, dim and dtype, every listed file's presence, its npy header
(dtype, shape == manifest rows) and its exact byte size (so a truncated file is always caught), and
that the catalog holds exactly one row per segment row, and a sha256 of 64 rows spread over each file
(`sample_sha256`: catches a swapped or badly damaged file, and any flip in a segment of at most 64
rows). These are cheap. The sha256 of each file is
recorded at write time but verified only with `Index.open(..., verify=True)` or `Index.verify()`:
hashing reads every byte (about 0.5 s per 512 MB segment, more from a cold disk), which would make
every open of a multi-gigabyte index slow, while silent bit rot inside a correctly sized file is
rare; run `verify` after copying an index or from a periodic job. Search still refuses to return
an impossible score (non-finite, or beyond [-1, 1] on a normalising cosine index): damage large
enough to make garbage scores is reported as IndexCorruptError naming the segment file.

Each segment entry also records `keys_sha256`, a digest of its keys in row order, checked on every
open (the keys are read then anyway): a damaged or swapped catalog page that still parses cannot
silently rename a row. A catalog holding generations more than one ahead of the manifest means the
manifest was replaced by an older copy (a crash leaves at most one): that is refused, not rolled
back. Keys are any str; those that are not valid UTF-8 (file names decoded with surrogateescape)
are stored as BLOBs of their original bytes.

Fault injection (a test hook, no cost when unset): `VGG_RETRIEVAL_FAULT=POINT:N` SIGKILLs the
process the N-th time it reaches POINT, one of `segment_write` (a segment temp file, partly
written), `segment_file` (one segment file renamed into place), `catalog` (catalog transaction
committed, manifest not replaced) and `manifest` (manifest replaced, in-memory state not updated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import signal
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from engine.common import errors, fileio
from engine.kernels import topk as topk_lib

FORMAT = "vgg-retrieval-index"
VERSION = 1
MANIFEST = "MANIFEST.json"
CATALOG = "catalog.sqlite"
LOCK = "LOCK"
DTYPES = ("float32", "float16", "bfloat16", "int8")
_ON_DISK = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}
_IN_MEMORY = {
  "float32": np.float32,
  "float16": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int8": np.int8,
}
_SEGMENT_RE = re.compile(r"^seg-(\d{6,})$")
DEFAULT_CHUNK_ROWS = 65536
# Candidates per result fetched from compressed storage and re-scored exactly (see Index.search).
CANDIDATE_FACTOR = 2
_QUERY_BATCH = 256
_SAMPLE_ROWS = 64
_WRITE_BYTES = 16 << 20  # rows per write call of a segment file: at most this many bytes
FAULT_ENV = "VGG_RETRIEVAL_FAULT"
FAULT_POINTS = ("segment_write", "segment_file", "catalog", "manifest")


def _parse_fault(spec: str | None) -> list | None:
  if not spec:
    return None
  point, _, n = spec.partition(":")
  if point not in FAULT_POINTS:
    raise ValueError(f"${FAULT_ENV}: unknown point {point!r}, expected one of {FAULT_POINTS}")
  return [point, int(n or 1)]


_FAULT = _parse_fault(os.environ.get(FAULT_ENV))


def _fault(point: str) -> None:
  """Test hook: SIGKILLs this process at the N-th arrival at `point` (see the module docstring)."""
  if _FAULT is None or _FAULT[0] != point:
    return
  _FAULT[1] -= 1
  if _FAULT[1] <= 0:
    os.kill(os.getpid(), signal.SIGKILL)


def _db_key(key: str) -> str | bytes:
  """A key as stored in the catalog: TEXT, or the original bytes of a non-UTF-8 file name."""
  try:
    key.encode("utf-8")
    return key
  except UnicodeEncodeError:
    return key.encode("utf-8", "surrogateescape")


def _py_key(value: str | bytes) -> str:
  return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _keys_digest(keys: Iterable[str]) -> str:
  h = hashlib.sha256()
  for k in keys:
    h.update(k.encode("utf-8", "surrogatepass") + b"\0")
  return h.hexdigest()


class StoreError(errors.UserError):
  """Base class of every error the index raises about its files or usage."""


class IndexNotFoundError(StoreError, FileNotFoundError):
  """No index (or a missing file of one) at the given path."""


class IndexExistsError(StoreError, FileExistsError):
  """`Index.create` on a folder that already holds an index."""


class IndexCorruptError(StoreError):
  """A file of the index is missing, truncated, malformed or fails its checksum."""


class IndexMismatchError(StoreError):
  """The index was built by a different extractor (metadata) or with a different dim."""


class IndexLockedError(StoreError):
  """Another process holds the writer lock."""


class IndexReadOnlyError(StoreError):
  """A write was attempted on an index opened with readonly=True."""


def exists(path: str | os.PathLike) -> bool:
  """Whether `path` holds an index (its manifest)."""
  return os.path.exists(os.path.join(os.fspath(path), MANIFEST))


@dataclasses.dataclass(frozen=True)
class FileStat:
  """Identity of the source file a vector came from."""

  sha256: str | None
  size: int | None
  mtime_ns: int | None


@dataclasses.dataclass
class _Segment:
  name: str
  rows: int
  base: int  # global row number of row 0
  vectors: np.ndarray  # [rows, dim] memmap, in-memory dtype view
  scales: np.ndarray | None  # [rows] float32 memmap
  float32: np.ndarray | None  # [rows, dim] float32 memmap
  keys: np.ndarray  # [rows] object
  deleted: np.ndarray  # [rows] bool
  files: dict


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
    _fault("segment_write")
    return n


def _write_npy(path: str, array: np.ndarray) -> dict:
  """Writes `array` as .npy atomically (temp file, fsync, rename); returns its manifest entry."""
  array = np.ascontiguousarray(array)
  n = array.shape[0]
  step = max(1, _WRITE_BYTES // max(1, array[:1].nbytes))
  parts = (array[a : a + step] for a in range(0, n, step))
  return _write_npy_parts(path, array.dtype, array.shape[1:], n, parts)


def _sample_rows(n: int) -> np.ndarray:
  return np.unique(np.linspace(0, n - 1, min(n, _SAMPLE_ROWS)).astype(np.int64)) if n else []


def _write_npy_parts(path: str, dtype: np.dtype, tail: tuple[int, ...], n: int, parts) -> dict:
  """Writes n rows arriving as an iterable of arrays as one .npy (temp file, fsync, rename), holding
  one part in memory at a time; returns its manifest entry (bytes, sha256, sample_sha256)."""
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
  _fault("segment_file")
  return {"file": os.path.basename(path), **out}


def _sample_digest(array: np.ndarray) -> str:
  """sha256 of up to _SAMPLE_ROWS rows spread over the array: cheap enough for every open."""
  rows = _sample_rows(array.shape[0])
  return hashlib.sha256(np.ascontiguousarray(array[rows]).tobytes()).hexdigest()


def _normalize_rows(x: np.ndarray) -> np.ndarray:
  """Unit rows, in x's float dtype; norms accumulate in float64 one block at a time (no [N, D]
  float64 temporary)."""
  out = np.empty_like(x)
  for a in range(0, x.shape[0], DEFAULT_CHUNK_ROWS):
    b = x[a : a + DEFAULT_CHUNK_ROWS]
    n = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))
    np.divide(b, np.where(n > 0, n, 1.0).astype(x.dtype)[:, None], out=out[a : a + len(b)])
  return out


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric per-row int8: [N, D] float -> ([N, D] int8, [N] float32 scale), x ~= q * scale."""
  amax = np.max(np.abs(x), axis=1)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
  return q, scale


class Index:
  """A persistent vector index; see the module docstring for the format and guarantees.

  Use `Index.create` or `Index.open`, not the constructor. An Index is a context manager.
  """

  def __init__(self, path: str, readonly: bool, _token: object = None):
    if _token is not _PRIVATE:
      raise TypeError("use Index.create(...) or Index.open(...)")
    self.path = os.path.abspath(path)
    self.readonly = readonly
    self._lock_fd: int | None = None
    self._db: sqlite3.Connection | None = None
    self._manifest: dict = {}
    self._segments: list[_Segment] = []
    self._key_rows: dict[str, int] | None = None
    self._closed = False

  # ---------------------------------------------------------------- creation and opening

  @classmethod
  def create(
    cls,
    path: str | os.PathLike,
    dim: int = 512,
    dtype: str = "int8",
    metadata: Mapping[str, Any] | None = None,
    *,
    keep_float32: bool = False,
    normalize: bool = True,
  ) -> Index:
    """Creates an empty index in `path` (a new or empty folder) and opens it for writing.

    Args:
      path: folder of the index.
      dim: vector dimension.
      dtype: storage dtype, one of "float32", "float16", "bfloat16", "int8".
      metadata: JSON-able description of the extractor (model, weights sha256, descriptor,
        preprocessing, whitening file); `open(expect_metadata=...)` compares against it.
      keep_float32: also store a float32 copy of every vector, for `search(rerank=...)`.
      normalize: L2-normalise vectors on `add` (needed for metric="cosine").
    """
    path = os.fspath(path)
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if int(dim) <= 0:
      raise ValueError(f"dim must be positive, got {dim}")
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, MANIFEST)):
      raise IndexExistsError(f"an index already exists at {os.path.join(path, MANIFEST)}")
    meta = json.loads(json.dumps(dict(metadata or {})))  # refuse non-JSON-able metadata early
    self = cls(path, readonly=False, _token=_PRIVATE)
    try:
      self._acquire_lock()
      self._connect()
      self._manifest = {
        "format": FORMAT,
        "version": VERSION,
        "generation": 0,
        "dim": int(dim),
        "dtype": dtype,
        "normalize": bool(normalize),
        "keep_float32": bool(keep_float32) and dtype != "float32",
        "metadata": meta,
        "next_segment": 1,
        "segments": [],
      }
      fileio.atomic_write_json(os.path.join(self.path, MANIFEST), self._manifest)
    except BaseException:
      self.close()
      raise
    return self

  @classmethod
  def open(
    cls,
    path: str | os.PathLike,
    expect_metadata: Mapping[str, Any] | None = None,
    readonly: bool = False,
    *,
    verify: bool = False,
  ) -> Index:
    """Opens an existing index.

    Args:
      path: folder of the index.
      expect_metadata: if given, every key must equal the stored metadata's value, else
        IndexMismatchError naming the differing keys.
      readonly: open as a reader: no lock, no writes, no cleanup; sees the last committed state.
      verify: also check every file's sha256 against the manifest (reads every byte).
    """
    path = os.fspath(path)
    if not os.path.exists(os.path.join(path, MANIFEST)):
      raise IndexNotFoundError(f"no index at {path!r}: {os.path.join(path, MANIFEST)} is missing")
    self = cls(path, readonly=readonly, _token=_PRIVATE)
    try:
      if not readonly:
        self._acquire_lock()
      for attempt in range(5):
        try:
          self._load(verify=verify)
          break
        except (IndexCorruptError, IndexNotFoundError):
          # A reader can race a writer's commit that removes old files; reload the new manifest.
          if readonly and attempt < 4 and self._manifest_changed():
            continue
          raise
      if expect_metadata is not None:
        self.check_metadata(expect_metadata)
    except BaseException:
      self.close()
      raise
    return self

  def _acquire_lock(self) -> None:
    lock_path = os.path.join(self.path, LOCK)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~fileio.UMASK)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise IndexLockedError(
        f"{lock_path} is locked: another process is writing to this index "
        "(open it with readonly=True to search while it writes)"
      ) from None
    self._lock_fd = fd

  @contextlib.contextmanager
  def _catalog_errors(self):
    """sqlite3 errors -> StoreError naming the catalog (IndexCorruptError for a damaged one)."""
    try:
      yield
    except sqlite3.OperationalError as e:  # locked, disk full, read-only folder, I/O error
      raise StoreError(f"catalog {os.path.join(self.path, CATALOG)}: {e}") from None
    except sqlite3.DatabaseError as e:  # not a database, malformed
      raise IndexCorruptError(
        f"catalog {os.path.join(self.path, CATALOG)} is damaged: {e}"
      ) from None

  def _connect(self) -> None:
    with self._catalog_errors():
      self._connect_db()

  def _connect_db(self) -> None:
    db_path = os.path.join(self.path, CATALOG)
    if self.readonly:
      if not os.path.exists(db_path):
        raise IndexCorruptError(f"catalog {db_path} is missing")
      self._db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
    else:
      if self._manifest.get("segments") and not os.path.exists(db_path):
        raise IndexCorruptError(f"catalog {db_path} is missing (the manifest lists segments)")
      self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
      self._db.execute("PRAGMA journal_mode=WAL")
      self._db.execute("PRAGMA synchronous=FULL")
      self._db.execute(
        "CREATE TABLE IF NOT EXISTS rows (key TEXT NOT NULL, segment TEXT NOT NULL, "
        "row INTEGER NOT NULL, sha256 TEXT, size INTEGER, mtime_ns INTEGER, "
        "added_gen INTEGER NOT NULL, deleted_gen INTEGER, PRIMARY KEY (segment, row))"
      )
      self._db.execute("CREATE INDEX IF NOT EXISTS rows_key ON rows (key)")

  def _manifest_changed(self) -> bool:
    try:
      with open(os.path.join(self.path, MANIFEST)) as f:
        return json.load(f).get("generation") != self._manifest.get("generation")
    except (OSError, ValueError):
      return False

  def _read_manifest(self) -> dict:
    mpath = os.path.join(self.path, MANIFEST)
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
      if m["dtype"] not in DTYPES or int(m["dim"]) <= 0:
        raise IndexCorruptError(f"manifest {mpath}: bad dtype/dim {m['dtype']!r}/{m['dim']!r}")
      for seg in m["segments"]:
        if (
          not _SEGMENT_RE.match(seg["name"])
          or int(seg["rows"]) < 0
          or "vectors" not in seg["files"]
        ):
          raise IndexCorruptError(f"manifest {mpath}: bad segment entry {seg!r}")
      int(m["generation"])
      int(m["next_segment"])
    except (KeyError, TypeError, ValueError) as e:
      raise IndexCorruptError(f"manifest {mpath} is malformed: {e!r}") from None
    return m

  def _load(self, verify: bool) -> None:
    with self._catalog_errors():
      self._load_checked(verify)

  def _load_checked(self, verify: bool) -> None:
    self._manifest = self._read_manifest()
    if self._db is None:
      self._connect()
    m = self._manifest
    dtype, gen = m["dtype"], m["generation"]
    newest = self._db.execute("SELECT MAX(added_gen), MAX(deleted_gen) FROM rows").fetchone()
    newest = max((g for g in newest if g is not None), default=0)
    if newest > gen + 1:  # a crash leaves at most one generation ahead
      raise IndexCorruptError(
        f"manifest {os.path.join(self.path, MANIFEST)} (generation {gen}) is older than catalog "
        f"{os.path.join(self.path, CATALOG)} (generation {newest}): restore the matching manifest"
      )
    if not self.readonly:
      self._recover()
    segments = []
    base = 0
    for seg in m["segments"]:
      name, rows = seg["name"], int(seg["rows"])
      arrays = {}
      for role, info in seg["files"].items():
        fpath = os.path.join(self.path, info["file"])
        arrays[role] = self._map(fpath, *self._expected(role, rows), info, verify)
      if dtype == "int8" and "scales" not in arrays:
        raise IndexCorruptError(f"manifest lists no scales file for int8 segment {name}")
      vectors = arrays["vectors"]
      if dtype == "bfloat16":
        vectors = vectors.view(ml_dtypes.bfloat16)
      keys = np.empty(rows, dtype=object)
      deleted = np.zeros(rows, dtype=bool)
      seen = np.zeros(rows, dtype=bool)
      cur = self._db.execute(
        "SELECT row, key, deleted_gen FROM rows WHERE segment = ? AND added_gen <= ?", (name, gen)
      )
      for row, key, dgen in cur:
        if not 0 <= row < rows or seen[row]:
          raise IndexCorruptError(
            f"catalog {os.path.join(self.path, CATALOG)}: bad row {row} for segment {name}"
          )
        seen[row] = True
        keys[row] = _py_key(key)
        deleted[row] = dgen is not None and dgen <= gen
      if not seen.all():
        raise IndexCorruptError(
          f"catalog {os.path.join(self.path, CATALOG)} lacks {int((~seen).sum())} rows of "
          f"segment {name} ({seg['files']['vectors']['file']})"
        )
      if "keys_sha256" in seg and _keys_digest(keys) != seg["keys_sha256"]:
        raise IndexCorruptError(
          f"catalog {os.path.join(self.path, CATALOG)}: the keys of segment {name} fail their "
          "checksum (damaged catalog)"
        )
      segments.append(
        _Segment(
          name=name,
          rows=rows,
          base=base,
          vectors=vectors,
          scales=arrays.get("scales"),
          float32=arrays.get("float32"),
          keys=keys,
          deleted=deleted,
          files=seg["files"],
        )
      )
      base += rows
    self._segments = segments
    self._key_rows = None

  def _map(self, fpath: str, want_dtype, want_shape, info: dict, verify: bool) -> np.ndarray:
    if not os.path.exists(fpath):
      raise IndexCorruptError(f"segment file {fpath} listed in the manifest is missing")
    try:
      dt, shape, offset = _npy_header(fpath)
    except (ValueError, OSError, SyntaxError) as e:
      raise IndexCorruptError(f"segment file {fpath} has a bad npy header: {e}") from None
    if dt != want_dtype or tuple(shape) != tuple(want_shape):
      raise IndexCorruptError(
        f"segment file {fpath} holds {dt} {tuple(shape)}, manifest expects {want_dtype} "
        f"{tuple(want_shape)}"
      )
    size = os.path.getsize(fpath)
    want_size = offset + int(np.prod(want_shape)) * want_dtype.itemsize
    if size != want_size or size != info.get("bytes", size):
      raise IndexCorruptError(
        f"segment file {fpath} is {size} bytes, expected {want_size} (truncated or overwritten)"
      )
    if verify and fileio.sha256_file(fpath) != info.get("sha256"):
      raise IndexCorruptError(f"segment file {fpath} fails its sha256 checksum")
    if want_shape[0] == 0:
      return np.zeros(want_shape, want_dtype)
    arr = np.load(fpath, mmap_mode="r")
    if "sample_sha256" in info and _sample_digest(arr) != info["sample_sha256"]:
      raise IndexCorruptError(
        f"segment file {fpath} fails its sample checksum (damaged or replaced by another file)"
      )
    return arr

  def _recover(self) -> None:
    """Undoes every trace of an interrupted commit (writer only)."""
    m = self._manifest
    gen = m["generation"]
    names = [s["name"] for s in m["segments"]]
    db = self._db
    db.execute("BEGIN IMMEDIATE")
    try:
      db.execute("CREATE TEMP TABLE IF NOT EXISTS live_segments (name TEXT PRIMARY KEY)")
      db.execute("DELETE FROM live_segments")
      db.executemany("INSERT INTO live_segments VALUES (?)", [(n,) for n in names])
      db.execute("DELETE FROM rows WHERE segment NOT IN (SELECT name FROM live_segments)")
      db.execute("DELETE FROM rows WHERE added_gen > ?", (gen,))
      db.execute("UPDATE rows SET deleted_gen = NULL WHERE deleted_gen > ?", (gen,))
      db.execute("COMMIT")
    except BaseException:
      with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")
      raise
    keep = {MANIFEST, CATALOG, CATALOG + "-wal", CATALOG + "-shm", CATALOG + "-journal", LOCK}
    for seg in m["segments"]:
      keep.update(info["file"] for info in seg["files"].values())
    for fname in os.listdir(self.path):
      if fname in keep:
        continue
      if fname.startswith("seg-") or (fname.startswith(".") and fname.endswith(".tmp")):
        with contextlib.suppress(FileNotFoundError):
          os.unlink(os.path.join(self.path, fname))

  # ---------------------------------------------------------------- properties

  @property
  def metadata(self) -> dict:
    return json.loads(json.dumps(self._manifest["metadata"]))

  @property
  def dim(self) -> int:
    return int(self._manifest["dim"])

  @property
  def dtype(self) -> str:
    return self._manifest["dtype"]

  @property
  def keep_float32(self) -> bool:
    return bool(self._manifest["keep_float32"])

  @property
  def generation(self) -> int:
    return int(self._manifest["generation"])

  def __len__(self) -> int:
    return int(sum(s.rows - int(s.deleted.sum()) for s in self._segments))

  def __contains__(self, key: str) -> bool:
    return key in self._live_rows()

  def keys(self) -> list[str]:
    """Live keys in storage order."""
    out = []
    for s in self._segments:
      out.extend(s.keys[~s.deleted].tolist())
    return out

  def check_metadata(self, expect: Mapping[str, Any]) -> None:
    """Raises IndexMismatchError unless every key of `expect` equals the stored metadata's."""
    have = self._manifest["metadata"]
    expect = json.loads(json.dumps(dict(expect)))
    diff = sorted(k for k in expect if k not in have or have[k] != expect[k])
    if diff:
      details = "; ".join(
        f"{k}: index has {have.get(k, '<missing>')!r}, query uses {expect[k]!r}" for k in diff
      )
      raise IndexMismatchError(
        f"index {os.path.join(self.path, MANIFEST)} was built with a different extractor: {details}"
      )

  # ---------------------------------------------------------------- lookups

  def _live_rows(self) -> dict[str, int]:
    if self._key_rows is None:
      d = {}
      for s in self._segments:
        live = np.flatnonzero(~s.deleted)
        d.update(zip(s.keys[live].tolist(), (live + s.base).tolist(), strict=True))
      self._key_rows = d
    return self._key_rows

  def _locate(self, grow: int) -> tuple[_Segment, int]:
    bases = [s.base for s in self._segments]
    i = int(np.searchsorted(bases, grow, side="right")) - 1
    return self._segments[i], grow - self._segments[i].base

  def get_file_stat(self, key: str) -> FileStat | None:
    """The source-file identity stored with a live key, or None if the key is absent."""
    grow = self._live_rows().get(key)
    if grow is None:
      return None
    seg, row = self._locate(grow)
    with self._catalog_errors():
      r = self._db.execute(
        "SELECT sha256, size, mtime_ns FROM rows WHERE segment = ? AND row = ?", (seg.name, row)
      ).fetchone()
    return FileStat(*r) if r else None

  def _dequantize(self, seg: _Segment, rows: np.ndarray | slice) -> np.ndarray:
    x = np.asarray(seg.vectors[rows]).astype(np.float32)
    if seg.scales is not None:
      x *= np.asarray(seg.scales[rows])[:, None]
    return x

  def get_vectors(self, keys: Sequence[str], *, float32_copy: bool = True) -> np.ndarray:
    """[len(keys), dim] float32 vectors of live keys (KeyError for a missing one).

    Uses the float32 copy when the index keeps one (and `float32_copy`), else dequantises.
    """
    live = self._live_rows()
    out = np.empty((len(keys), self.dim), np.float32)
    for i, key in enumerate(keys):
      if key not in live:
        raise KeyError(f"key {key!r} is not in the index {self.path}")
      seg, row = self._locate(live[key])
      if float32_copy and seg.float32 is not None:
        out[i] = seg.float32[row]
      else:
        out[i] = self._dequantize(seg, slice(row, row + 1))[0]
    return out

  def iter_chunks(
    self, chunk_rows: int = DEFAULT_CHUNK_ROWS, *, live_only: bool = True
  ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yields (keys, [n, dim] float32 dequantised vectors) in storage order, n <= chunk_rows."""
    for seg in self._segments:
      for start in range(0, seg.rows, chunk_rows):
        stop = min(seg.rows, start + chunk_rows)
        mask = ~seg.deleted[start:stop] if live_only else np.ones(stop - start, bool)
        if not mask.any():
          continue
        x = self._dequantize(seg, slice(start, stop))[mask]
        yield seg.keys[start:stop][mask].tolist(), x

  def iter_vectors(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, [dim] float32 vector) for every live row, reading chunk by chunk."""
    for keys, x in self.iter_chunks(chunk_rows):
      yield from zip(keys, x, strict=True)

  # ---------------------------------------------------------------- writes

  def _check_writable(self) -> None:
    if self._closed:
      raise StoreError(f"index {self.path} is closed")
    if self.readonly:
      raise IndexReadOnlyError(f"index {self.path} was opened readonly")

  @contextlib.contextmanager
  def _commit_guard(self):
    """On any failure mid-commit, reload the last committed state (undoing the leftovers)."""
    try:
      yield
    except BaseException:
      with contextlib.suppress(Exception):
        self._load(verify=False)
      raise

  def _segment_name(self) -> str:
    n = self._manifest["next_segment"]
    self._manifest["next_segment"] = n + 1
    return f"seg-{n:06d}"

  def _write_segment(self, vectors: np.ndarray) -> tuple[str, dict]:
    """Writes (and fsyncs) the files of one new segment; returns its name and manifest files."""
    name = self._segment_name()
    files = {}
    p = os.path.join(self.path, name)
    dtype = self.dtype
    if dtype == "int8":
      q, scale = quantize_int8(vectors)
      files["vectors"] = _write_npy(p + ".npy", q)
      files["scales"] = _write_npy(p + ".scale.npy", scale)
    elif dtype == "bfloat16":
      files["vectors"] = _write_npy(p + ".npy", vectors.astype(ml_dtypes.bfloat16).view(np.uint16))
    else:
      files["vectors"] = _write_npy(p + ".npy", vectors.astype(_ON_DISK[dtype]))
    if self.keep_float32:
      files["float32"] = _write_npy(p + ".f32.npy", vectors.astype(np.float32))
    return name, files

  def _commit_manifest(self, new_segments: list[dict], drop: Iterable[str] = ()) -> None:
    m = dict(self._manifest)
    drop = set(drop)
    m["segments"] = [s for s in m["segments"] if s["name"] not in drop] + new_segments
    m["generation"] = self._manifest["generation"] + 1
    fileio.atomic_write_json(os.path.join(self.path, MANIFEST), m)  # the commit point
    _fault("manifest")
    self._manifest = m

  def add(
    self,
    vectors: np.ndarray,
    keys: Sequence[str],
    files: Sequence[FileStat | None] | None = None,
  ) -> None:
    """Adds vectors under keys; committed (durable) on return. Re-adding a key replaces it.

    Args:
      vectors: [N, dim] float, finite.
      keys: N distinct str keys.
      files: optional N FileStat (or None) describing each key's source file.
    """
    self._check_writable()
    x = np.asarray(vectors, dtype=np.float32)
    keys = [str(k) for k in keys]
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"vectors must be [N, {self.dim}], got {x.shape}")
    if x.shape[0] != len(keys):
      raise ValueError(f"{x.shape[0]} vectors but {len(keys)} keys")
    if files is not None and len(files) != len(keys):
      raise ValueError(f"{len(files)} file stats but {len(keys)} keys")
    if len(set(keys)) != len(keys):
      raise ValueError("duplicate keys in one add() call")
    if not np.isfinite(x).all():
      raise ValueError("vectors contain inf or nan")
    if not keys:
      return
    if self._manifest["normalize"]:
      x = _normalize_rows(x)
    try:
      [k.encode("utf-8", "surrogateescape") for k in keys]
    except UnicodeEncodeError as e:
      raise ValueError(f"key {e.object!r} is not valid text") from None
    with self._catalog_errors(), self._commit_guard():
      self._add(x, keys, files)

  def _add(self, x: np.ndarray, keys: list[str], files) -> None:
    name, seg_files = self._write_segment(x)
    gen = self.generation + 1
    live = self._live_rows()
    replaced = [live[k] for k in keys if k in live]
    stats = files or [None] * len(keys)
    rows = [
      (
        _db_key(k),
        name,
        i,
        st.sha256 if st else None,
        st.size if st else None,
        st.mtime_ns if st else None,
        gen,
      )
      for i, (k, st) in enumerate(zip(keys, stats, strict=True))
    ]
    self._transaction(rows, self._grows_to_seg_rows(replaced), gen)
    entry = {"name": name, "rows": len(keys), "files": seg_files, "keys_sha256": _keys_digest(keys)}
    _fault("catalog")
    self._commit_manifest([entry])
    self._mark_deleted(replaced)
    base = sum(sg.rows for sg in self._segments)
    arrays = {
      role: self._map(
        os.path.join(self.path, info["file"]), *self._expected(role, len(keys)), info, False
      )
      for role, info in seg_files.items()
    }
    vec = arrays["vectors"]
    self._segments.append(
      _Segment(
        name=name,
        rows=len(keys),
        base=base,
        vectors=vec.view(ml_dtypes.bfloat16) if self.dtype == "bfloat16" else vec,
        scales=arrays.get("scales"),
        float32=arrays.get("float32"),
        keys=np.array(keys, dtype=object),
        deleted=np.zeros(len(keys), bool),
        files=seg_files,
      )
    )
    if self._key_rows is not None:
      self._key_rows.update(zip(keys, range(base, base + len(keys)), strict=True))

  def _mark_deleted(self, grows: Iterable[int]) -> None:
    for g in grows:
      seg, row = self._locate(g)
      seg.deleted[row] = True
      if self._key_rows is not None:
        self._key_rows.pop(seg.keys[row], None)

  def _expected(self, role: str, rows: int) -> tuple[np.dtype, tuple[int, ...]]:
    if role == "vectors":
      return np.dtype(_ON_DISK[self.dtype]), (rows, self.dim)
    if role == "scales":
      return np.dtype(np.float32), (rows,)
    if role == "float32":
      return np.dtype(np.float32), (rows, self.dim)
    raise IndexCorruptError(
      f"manifest {os.path.join(self.path, MANIFEST)}: unknown file role {role!r}"
    )

  def _grows_to_seg_rows(self, grows: Iterable[int]) -> list[tuple[str, int]]:
    out = []
    for g in grows:
      seg, row = self._locate(g)
      out.append((seg.name, row))
    return out

  def _transaction(self, inserts: list[tuple], tombstones: list[tuple[str, int]], gen: int) -> None:
    db = self._db
    db.execute("BEGIN IMMEDIATE")
    try:
      if inserts:
        db.executemany(
          "INSERT INTO rows (key, segment, row, sha256, size, mtime_ns, added_gen, deleted_gen) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
          inserts,
        )
      if tombstones:
        db.executemany(
          "UPDATE rows SET deleted_gen = ? WHERE segment = ? AND row = ? AND deleted_gen IS NULL",
          [(gen, s, r) for s, r in tombstones],
        )
      db.execute("COMMIT")
    except BaseException:
      with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")
      raise

  def delete(self, keys: Iterable[str]) -> int:
    """Tombstones live keys (absent keys are ignored); committed on return. Returns the count."""
    self._check_writable()
    live = self._live_rows()
    grows = sorted({live[k] for k in keys if k in live})
    if not grows:
      return 0
    gen = self.generation + 1
    with self._catalog_errors(), self._commit_guard():
      self._transaction([], self._grows_to_seg_rows(grows), gen)
      self._commit_manifest([])
      self._mark_deleted(grows)
    return len(grows)

  def compact(self, max_segment_rows: int = 1 << 20) -> None:
    """Rewrites all segments without tombstones (and merges small ones); committed on return.

    The stored bytes (vectors, scales, float32 copy) are streamed from the old segments in chunks,
    never re-quantised, so results are unchanged and memory stays at one chunk.
    """
    self._check_writable()
    if not self._manifest["segments"]:
      return
    with self._catalog_errors(), self._commit_guard():
      self._compact(max_segment_rows)

  def _compact(self, max_segment_rows: int) -> None:
    old = [s["name"] for s in self._manifest["segments"]]
    gen = self.generation + 1
    # Plan: the live rows of every segment, in order, cut into new segments of at most
    # max_segment_rows; each new file is then streamed part by part from the old memory maps (the
    # stored bytes are copied, never re-quantised), so memory stays at one chunk, not one segment.
    plans, cur, cur_rows = [], [], 0
    for seg in self._segments:
      live = np.flatnonzero(~seg.deleted)
      while live.size:
        take, live = live[: max_segment_rows - cur_rows], live[max_segment_rows - cur_rows :]
        cur.append((seg, take))
        cur_rows += take.size
        if cur_rows == max_segment_rows:
          plans.append(cur)
          cur, cur_rows = [], 0
    if cur:
      plans.append(cur)

    def parts(plan, role):
      for seg, rows in plan:
        src = {"vectors": seg.vectors, "scales": seg.scales, "float32": seg.float32}[role]
        for a in range(0, rows.size, DEFAULT_CHUNK_ROWS):
          part = np.asarray(src[rows[a : a + DEFAULT_CHUNK_ROWS]])
          yield part.view(np.uint16) if part.dtype == ml_dtypes.bfloat16 else part

    new_segments, inserts = [], []
    for plan in plans:
      n = sum(rows.size for _, rows in plan)
      name = self._segment_name()
      p = os.path.join(self.path, name)
      files = {}
      for role, suffix in (("vectors", ".npy"), ("scales", ".scale.npy"), ("float32", ".f32.npy")):
        if role not in plan[0][0].files:
          continue
        dtype, shape = self._expected(role, n)
        files[role] = _write_npy_parts(p + suffix, dtype, shape[1:], n, parts(plan, role))
      keys = []
      for seg, rows in plan:
        stats = {
          r: (sh, sz, mt)
          for r, sh, sz, mt in self._db.execute(
            "SELECT row, sha256, size, mtime_ns FROM rows WHERE segment = ?", (seg.name,)
          )
        }
        for r in rows.tolist():
          inserts.append((_db_key(seg.keys[r]), name, len(keys), *stats[r], gen))
          keys.append(seg.keys[r])
      new_segments.append(
        {"name": name, "rows": n, "files": files, "keys_sha256": _keys_digest(keys)}
      )
    db = self._db
    db.execute("BEGIN IMMEDIATE")
    try:
      if inserts:
        db.executemany(
          "INSERT INTO rows (key, segment, row, sha256, size, mtime_ns, added_gen, deleted_gen) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
          inserts,
        )
      # Old rows stay (stamped deleted) until the manifest commits; then they are garbage.
      db.execute(
        "UPDATE rows SET deleted_gen = ? WHERE deleted_gen IS NULL AND added_gen < ?", (gen, gen)
      )
      db.execute("COMMIT")
    except BaseException:
      with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")
      raise
    self._commit_manifest(new_segments, drop=old)
    # Post-commit garbage collection: drop old rows and files (also redone on any writer open).
    self._segments = []
    self._load(verify=False)

  def update_file_stats(self, stats: Mapping[str, FileStat]) -> int:
    """Replaces the stored FileStat of live keys (e.g. a touched but unchanged file).

    Only the catalog changes (one transaction, durable on return; vectors and manifest are
    untouched), so readers may see it at once. Absent keys are ignored. Returns the count updated.
    """
    self._check_writable()
    live = self._live_rows()
    todo = []
    for key, st in stats.items():
      if key in live:
        seg, row = self._locate(live[key])
        todo.append((st.sha256, st.size, st.mtime_ns, seg.name, row))
    if todo:
      with self._catalog_errors():
        self._update_stats(todo)
    return len(todo)

  def _update_stats(self, todo: list[tuple]) -> None:
    if todo:
      db = self._db
      db.execute("BEGIN IMMEDIATE")
      try:
        db.executemany(
          "UPDATE rows SET sha256 = ?, size = ?, mtime_ns = ? WHERE segment = ? AND row = ?", todo
        )
        db.execute("COMMIT")
      except BaseException:
        with contextlib.suppress(sqlite3.Error):
          db.execute("ROLLBACK")
        raise

  # ---------------------------------------------------------------- verification

  def verify(self) -> None:
    """Checks every file's sha256 against the manifest; raises IndexCorruptError naming the file."""
    for seg in self._manifest["segments"]:
      for info in seg["files"].values():
        fpath = os.path.join(self.path, info["file"])
        if fileio.sha256_file(fpath) != info["sha256"]:
          raise IndexCorruptError(f"segment file {fpath} fails its sha256 checksum")

  # ---------------------------------------------------------------- search

  def _valid_mask(self, seg: _Segment, allowed: np.ndarray | None) -> np.ndarray:
    v = ~seg.deleted
    if allowed is not None:
      v = v & allowed[seg.base : seg.base + seg.rows]
    return v

  def search(
    self,
    queries: np.ndarray,
    k: int = 10,
    metric: str = "cosine",
    allowed_keys: Iterable[str] | None = None,
    rerank: int = 0,
    *,
    chunk_rows: int | None = None,
    method: str | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest live vectors of each query.

    Streams every segment through `engine.kernels.topk.topk` in chunks of `chunk_rows` rows with a running
    top-k merge, so memory beyond the page cache is bounded by the chunk size.

    Args:
      queries: [Q, dim] or [dim] float.
      k: results per query.
      metric: "cosine" (scores are cosine similarities, descending) or "l2" (scores are squared
        euclidean distances, ascending).
      allowed_keys: if given, only these keys can be returned (unknown keys are ignored).
      rerank: if > k, fetch this many candidates and re-score them exactly from the float32 copy
        (needs keep_float32=True unless the storage dtype is float32).
      chunk_rows: rows per kernel call (fixed shape: compiled once per query bucket); default
        `engine.kernels.topk.chunk_rows_for(Q, dtype=...)`.
      method: kernel method override, see `engine.kernels.topk.topk`.

    Returns:
      scores: [Q, m] float32 and keys: [Q, m] object array of str, best first, where
      m = min(k, number of searchable rows): columns are never padded. With compressed storage
      the scores are exact (float64) for the stored vectors; with `rerank`, for the float32 copy.
    """
    if metric not in topk_lib.METRICS:
      raise ValueError(f"metric must be one of {topk_lib.METRICS}, got {metric!r}")
    q = np.asarray(queries, dtype=np.float32)
    squeeze = q.ndim == 1
    if squeeze:
      q = q[None]
    if q.ndim != 2 or q.shape[1] != self.dim:
      raise ValueError(f"queries must be [Q, {self.dim}], got {np.shape(queries)}")
    if not np.isfinite(q).all():
      raise ValueError("queries contain inf or nan")
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    allowed = None
    if allowed_keys is not None:
      allowed = np.zeros(sum(s.rows for s in self._segments), bool)
      live = self._live_rows()
      idx = [live[key] for key in allowed_keys if key in live]
      allowed[idx] = True
    n_valid = sum(int(self._valid_mask(s, allowed).sum()) for s in self._segments)
    m = min(k, n_valid)
    if metric == "cosine" or self._manifest["normalize"]:
      # Stored vectors of a normalising index live on the unit sphere: so do its queries.
      q = _normalize_rows(q)
    nq = q.shape[0]
    if m == 0:
      out = np.zeros((nq, 0), np.float32), np.empty((nq, 0), object)
      return (out[0][0], out[1][0]) if squeeze else out
    use_rerank = rerank > k and self.dtype != "float32"
    if use_rerank and not self.keep_float32:
      raise ValueError(f"rerank needs an index created with keep_float32=True ({self.path})")
    # Compressed storage: the kernel's candidates (CANDIDATE_FACTOR * k of them) are re-scored in
    # float64 from the stored rows, so returned scores are exact for the stored vectors (the kernel
    # quantises int8 queries too) and a little recall lost to that rounding comes back.
    if use_rerank:
      kk = min(rerank, n_valid)
    elif self.dtype != "float32":
      kk = min(max(m, CANDIDATE_FACTOR * k), n_valid)
    else:
      kk = m
    scores = np.empty((nq, kk), np.float32)
    grows = np.empty((nq, kk), np.int64)
    for start in range(0, nq, _QUERY_BATCH):
      qb = q[start : start + _QUERY_BATCH]
      s, g = self._scan(qb, kk, metric, allowed, chunk_rows, method)
      scores[start : start + len(qb)] = s
      grows[start : start + len(qb)] = g
    if use_rerank:
      scores, grows = self._rerank(q, grows, metric, m, float32_copy=True)
    elif self.dtype != "float32":
      scores, grows = self._rerank(q, grows, metric, m, float32_copy=False)
    else:
      scores, grows = scores[:, :m], grows[:, :m]
    self._check_scores(scores, grows, metric)
    keys = self._keys_of(grows)
    if metric == "l2":
      scores = np.maximum(-scores, 0.0)
    return (scores[0], keys[0]) if squeeze else (scores, keys)

  def _check_scores(self, scores: np.ndarray, grows: np.ndarray, metric: str) -> None:
    """Refuses impossible scores (a damaged segment) instead of returning them."""
    lo, hi = -np.inf, np.inf
    if self._manifest["normalize"]:  # unit vectors, with room for quantisation error
      lo, hi = (-1.05, 1.05) if metric == "cosine" else (-4.2, 0.05)
    bad = ~np.isfinite(scores) | (scores < lo) | (scores > hi)
    if bad.any():
      seg, row = self._locate(int(grows[bad][0]))
      files = ", ".join(os.path.join(self.path, f["file"]) for f in seg.files.values())
      raise IndexCorruptError(
        f"segment {seg.name} ({files}) gives an impossible score {float(scores[bad][0])} at row "
        f"{row}: a file is damaged (Index.verify() checks every checksum)"
      )

  def _keys_of(self, grows: np.ndarray) -> np.ndarray:
    bases = np.array([sg.base for sg in self._segments])
    which = np.searchsorted(bases, grows, side="right") - 1
    keys = np.empty(grows.shape, object)
    for i in np.unique(which):
      sel = which == i
      sg = self._segments[int(i)]
      keys[sel] = sg.keys[grows[sel] - sg.base]
    return keys

  def _scan(self, q, kk, metric, allowed, chunk_rows, method):
    nq = q.shape[0]
    # Bucket Q (powers of two up to 8, then multiples of 8): few compiled shapes, little padding.
    qpad = 1 << max(0, (nq - 1).bit_length()) if nq <= 8 else -(-nq // 8) * 8
    qj = jax.device_put(np.concatenate([q, np.zeros((qpad - nq, q.shape[1]), np.float32)]))
    best_s, best_i = topk_lib.empty_topk(qpad, kk)
    dtype = _IN_MEMORY[self.dtype]
    chunk_rows = topk_lib.chunk_rows_for(qpad, chunk_rows, dtype, method)
    for seg in self._segments:
      valid = self._valid_mask(seg, allowed)
      for start, n, padded in topk_lib.plan_chunks(seg.rows, chunk_rows):
        stop = start + n
        v = valid[start:stop]
        if not v.any():
          continue
        mat = seg.vectors[start:stop]
        sc = None if seg.scales is None else seg.scales[start:stop]
        if padded > n:
          matn = np.zeros((padded, self.dim), dtype)
          matn[:n] = mat
          mat = matn
          if sc is not None:
            sc = np.concatenate([sc, np.zeros(padded - n, np.float32)])
          v = np.concatenate([v, np.zeros(padded - n, bool)])
        # Zero-copy: device_put aliases the 64-byte-aligned memory-mapped rows (jnp.asarray copies).
        mat = jax.device_put(np.asarray(mat))
        sc = None if sc is None else jax.device_put(np.asarray(sc))
        v = None if v.all() else v  # the no-mask variant is faster (bfloat16: 10x at Q = 1)
        best_s, best_i = topk_lib.scan_chunk(
          qj,
          mat,
          sc,
          v,
          np.int32(seg.base + start),
          best_s,
          best_i,
          k=kk,
          metric=metric,
          method=method,
        )
    s, i = jax.device_get((best_s, best_i))
    return s[:nq], i[:nq].astype(np.int64)

  def _rerank(self, q, grows, metric, m, float32_copy):
    """Exact float64 re-scoring of candidates, [Q, kk] -> [Q, m]: from the float32 copy, or from
    the stored rows (dequantised; on a normalising cosine index, scaled back to unit length, so a
    score is the cosine to the stored direction and never exceeds 1)."""
    nq, kk = grows.shape
    flat = grows.ravel()
    bases = np.array([sg.base for sg in self._segments])
    which = np.searchsorted(bases, flat, side="right") - 1
    x = np.empty((flat.size, self.dim), np.float32)
    for i in np.unique(which):
      sel = np.flatnonzero(which == i)
      sg = self._segments[int(i)]
      rows = flat[sel] - sg.base
      order = np.argsort(rows)  # ascending reads from the memory map
      if float32_copy:
        x[sel[order]] = sg.float32[rows[order]]
      else:
        x[sel[order]] = self._dequantize(sg, rows[order])
    x64 = x.reshape(nq, kk, self.dim).astype(np.float64)
    q64 = q.astype(np.float64)
    # Contractions, not broadcasts: no [Q, kk, D] temporaries (4x faster at Q = 100, kk = 20).
    dots = np.einsum("qkd,qd->qk", x64, q64)
    if metric == "cosine":
      s = dots
      if not float32_copy and self._manifest["normalize"]:
        n = np.sqrt(np.einsum("qkd,qkd->qk", x64, x64))
        s = dots / np.where(n > 0, n, 1.0)
    else:
      s = 2.0 * dots - np.einsum("qkd,qkd->qk", x64, x64) - np.einsum("qd,qd->q", q64, q64)[:, None]
    order = np.argsort(-s, axis=1, kind="stable")[:, :m]
    return np.take_along_axis(s, order, 1).astype(np.float32), np.take_along_axis(grows, order, 1)

  # ---------------------------------------------------------------- lifecycle

  def close(self) -> None:
    """Releases the lock, the catalog and the memory maps. Idempotent."""
    self._closed = True
    self._segments = []
    self._key_rows = None
    if self._db is not None:
      with contextlib.suppress(sqlite3.Error):
        self._db.close()
      self._db = None
    if self._lock_fd is not None:
      with contextlib.suppress(OSError):
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
      self._lock_fd = None

  def __enter__(self) -> Index:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (
      f"Index({self.path!r}, dim={self.dim}, dtype={self.dtype!r}, live={len(self)}, "
      f"segments={len(self._segments)}, readonly={self.readonly})"
    )


_PRIVATE = object()
