"""The Index: a persistent, crash-safe vector index in one folder.

Layout of an index folder (format version 1)::

  MANIFEST.json            the commit point, replaced atomically (engine/store/manifest.py)
  catalog.sqlite           keys, source-file identities, tombstones (engine/store/catalog.py)
  LOCK                     flock()ed by the single writer; readers never take it
  seg-000001.npy ...       memory-mapped segment files (engine/store/segments.py)
  stats-000007.npy         collection statistics, if learned (engine/store/statistics.py)
  int8-model-*.xml/.bin    an int8 index's quantised model (engine/features/quantize.py), placed
                           by the caller before `create`; the store never touches it

Commit protocol (`add`, `delete`, `compact`): new segment files are written under temporary names,
fsynced and renamed; then one catalog transaction inserts their rows and stamps tombstones with the
new generation; then the manifest with generation+1 replaces the old one atomically. A crash before
the manifest is replaced leaves the previous manifest in force, and on the next writer open every
trace of the interrupted commit is undone: catalog rows of segments the manifest does not list are
deleted, tombstones stamped with a generation above the manifest's are cleared, and segment files
the manifest does not list are removed. Readers apply the same rules without writing, so they
always see the last committed state.

Checks on open: the manifest's version, dim and dtype, every listed file's presence, its npy header
(dtype, shape == manifest rows) and its exact byte size (so a truncated file is always caught), that
the catalog holds exactly one row per segment row, their keys' digest, and a sha256 of 64 rows
spread over each file. These are cheap. The sha256 of each whole file is recorded at write time but
verified only with `Index.open(..., verify=True)` or `Index.verify()`: hashing reads every byte
(about 0.5 s per 512 MB segment), while silent bit rot inside a correctly sized file is rare; run
`verify` after copying an index or from a periodic job. Search still refuses to return an
impossible score (non-finite, or beyond [-1, 1] on a normalising cosine index). A catalog holding
generations more than one ahead of the manifest means the manifest was replaced by an older copy (a
crash leaves at most one): that is refused, not rolled back.

This module imports no JAX: `search` runs the kernels through engine/store/search.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from engine.common import fileio
from engine.store import catalog as catalog_lib
from engine.store import manifest as manifest_lib
from engine.store import segments as seg_lib
from engine.store import statistics as stats_lib
from engine.store.catalog import CATALOG, FileStat
from engine.store.commits import Commits
from engine.store.errors import (
  IndexCorruptError,
  IndexExistsError,
  IndexLockedError,
  IndexMismatchError,
  IndexNotFoundError,
)
from engine.store.manifest import MANIFEST
from engine.store.segments import DTYPES, Segment

LOCK = "LOCK"


def exists(path: str | os.PathLike) -> bool:
  """Whether `path` holds an index (its manifest)."""
  return os.path.exists(manifest_lib.path_of(os.fspath(path)))


def _load_segments(
  folder: str, m: dict, catalog: catalog_lib.Catalog, verify: bool
) -> list[Segment]:
  """The manifest's segments, mapped and checked against the catalog's rows."""
  gen = m["generation"]
  out, base = [], 0
  for entry in m["segments"]:
    name, rows = entry["name"], int(entry["rows"])
    keys = np.empty(rows, dtype=object)
    deleted = np.zeros(rows, dtype=bool)
    # The files first (a damaged file is named before the catalog's view of it), then the rows.
    seg = seg_lib.open_segment(
      folder, entry, m["dtype"], int(m["dim"]), base=base, keys=keys, deleted=deleted, verify=verify
    )
    seen = np.zeros(rows, dtype=bool)
    for row, key, dead in catalog.segment_rows(name, gen):
      if not 0 <= row < rows or seen[row]:
        raise IndexCorruptError(f"catalog {catalog.path}: bad row {row} for segment {name}")
      seen[row] = True
      keys[row] = key
      deleted[row] = dead
    if not seen.all():
      raise IndexCorruptError(
        f"catalog {catalog.path} lacks {int((~seen).sum())} rows of segment {name} "
        f"({entry['files']['vectors']['file']})"
      )
    if "keys_sha256" in entry and catalog_lib.keys_digest(keys) != entry["keys_sha256"]:
      raise IndexCorruptError(
        f"catalog {catalog.path}: the keys of segment {name} fail their checksum (damaged catalog)"
      )
    out.append(seg)
    base += rows
  return out


def _check_free(folder: str, placed: Iterable[str] = ()) -> None:
  """Refuses to create an index in a folder holding anything but this engine's own files (and
  the `placed` ones its caller wrote there first)."""
  names = os.listdir(folder)
  own = {LOCK, *catalog_lib.FILES, *placed}
  foreign = sorted(f for f in names if f not in own and not manifest_lib.TEMP_RE.match(f))
  if foreign:
    raise IndexExistsError(
      f"{folder} is not empty and holds no index ({len(foreign)} other entries, e.g. "
      f"{foreign[0]!r}): an index needs a new or empty folder of its own"
    )
  if CATALOG in names:
    cat = catalog_lib.Catalog(folder, True, must_exist=True)
    try:
      with cat.errors():
        orphaned = cat.newest_generation() > 0
    finally:
      cat.close()
    if orphaned:
      raise IndexCorruptError(
        f"{folder} holds the catalog of an index whose {MANIFEST} is missing: restore the "
        "manifest, or remove the folder to start over"
      )


def _remove_leftovers(folder: str, m: dict) -> None:
  """Removes segment files (and their temporaries) that the manifest does not list, and
  temporaries of the manifest: only names this engine writes, never anything else."""
  keep = {info["file"] for seg in m["segments"] for info in seg["files"].values()}
  if m.get("statistics"):
    keep.add(m["statistics"]["file"])
  for fname in os.listdir(folder):
    ours = (
      seg_lib.is_segment_file(fname)
      or stats_lib.is_stats_file(fname)
      or manifest_lib.TEMP_RE.match(fname)
    )
    if ours and fname not in keep:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, fname))


class Index(Commits):
  """A persistent vector index; see the module docstring for the format and guarantees.

  Use `Index.create` or `Index.open`, not the constructor. An Index is a context manager.
  """

  def __init__(self, path: str, readonly: bool, _token: object = None):
    if _token is not _PRIVATE:
      raise TypeError("use Index.create(...) or Index.open(...)")
    self.path = os.path.abspath(path)
    self.readonly = readonly
    self._lock_fd: int | None = None
    self._catalog: catalog_lib.Catalog | None = None
    self._manifest: dict = {}
    self._segments: list[Segment] = []
    self._key_rows: dict[str, int] | None = None
    self._stats: stats_lib.Statistics | None = None
    # (segment name, its vectors' sha256, statistics id) -> (scales, row weights), search.py
    self._stat_factors: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
    self._closed = False

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
    statistics: str = "none",
    placed: Sequence[str] = (),
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
      statistics: the collection statistics policy recorded for `engine.app.indexing` to learn
        and re-learn: "none", "center" or "whiten[:DIM]" (see `learn_statistics`).
      placed: names of files the caller wrote into the folder before creating the index, which
        its metadata names (the int8 model an index's descriptors come from): the folder may
        hold them. The store never reads, moves or removes them.
    """
    path = os.fspath(path)
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if stats_lib.parse_policy(statistics) is not None and not normalize:
      raise ValueError("collection statistics need a normalising index (normalize=True)")
    if int(dim) <= 0:
      raise ValueError(f"dim must be positive, got {dim}")
    os.makedirs(path, exist_ok=True)
    if exists(path):
      raise IndexExistsError(f"an index already exists at {manifest_lib.path_of(path)}")
    _check_free(path, placed)
    meta = json.loads(json.dumps(dict(metadata or {})))  # refuse non-JSON-able metadata early
    self = cls(path, readonly=False, _token=_PRIVATE)
    try:
      self._acquire_lock()
      self._catalog = catalog_lib.Catalog(self.path, False, must_exist=False)
      self._manifest = manifest_lib.new(dim, dtype, normalize, keep_float32, meta)
      if stats_lib.parse_policy(statistics) is not None:
        self._manifest["statistics_policy"] = statistics.strip()
      manifest_lib.write(self.path, self._manifest)
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
    if not exists(path):
      raise IndexNotFoundError(f"no index at {path!r}: {manifest_lib.path_of(path)} is missing")
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
          changed = manifest_lib.generation_on_disk(self.path) != self._manifest.get("generation")
          if readonly and attempt < 4 and changed:
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
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise IndexLockedError(
        f"{lock_path} is locked: another process is writing to this index "
        "(open it with readonly=True to search while it writes)"
      ) from None
    self._lock_fd = fd

  def _load(self, verify: bool) -> None:
    """(Re)reads the manifest and maps its segments; a writer first undoes interrupted commits."""
    self._manifest = m = manifest_lib.read(self.path)
    if self._catalog is None:
      self._catalog = catalog_lib.Catalog(self.path, self.readonly, must_exist=bool(m["segments"]))
    cat, gen = self._catalog, m["generation"]
    with cat.errors():
      newest = cat.newest_generation()
      if newest > gen + 1:  # a crash leaves at most one
        raise IndexCorruptError(
          f"manifest {manifest_lib.path_of(self.path)} (generation {gen}) is older than catalog "
          f"{cat.path} (generation {newest}): restore the matching manifest"
        )
      if not self.readonly:
        cat.recover([s["name"] for s in m["segments"]], gen)
        _remove_leftovers(self.path, m)
      self._segments = _load_segments(self.path, m, cat, verify)
    entry = m.get("statistics")
    self._stats = None if entry is None else stats_lib.load(self.path, entry, int(m["dim"]))
    self._key_rows = None

  # ---------------------------------------------------------------- properties and lookups

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
  def normalizes(self) -> bool:
    """Whether `add` stores unit vectors."""
    return bool(self._manifest["normalize"])

  @property
  def statistics(self) -> stats_lib.Statistics | None:
    """The collection statistics searches apply (`learn_statistics`), or None."""
    return self._stats

  @property
  def statistics_info(self) -> dict | None:
    """The manifest's record of the statistics: kind, dim, rows learned from, learned_at (the
    generation that committed them), file, bytes, sha256 (= `statistics.id`); or None."""
    entry = self._manifest.get("statistics")
    return None if entry is None else dict(entry)

  @property
  def statistics_policy(self) -> str:
    """What `engine.app.indexing` keeps learned: "none", "center" or "whiten[:DIM]"."""
    return self._manifest.get("statistics_policy", "none")

  @property
  def generation(self) -> int:
    return int(self._manifest["generation"])

  @property
  def segments(self) -> tuple[Segment, ...]:
    """The mapped segments, in storage order (global row = segment.base + row)."""
    return tuple(self._segments)

  def __len__(self) -> int:
    return int(sum(s.rows - int(s.deleted.sum()) for s in self._segments))

  def __contains__(self, key: str) -> bool:
    return key in self.live_rows()

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
        f"index {manifest_lib.path_of(self.path)} was built with a different extractor: {details}"
      )

  def live_rows(self) -> dict[str, int]:
    """key -> global row of every live key."""
    if self._key_rows is None:
      d = {}
      for s in self._segments:
        live = np.flatnonzero(~s.deleted)
        d.update(zip(s.keys[live].tolist(), (live + s.base).tolist(), strict=True))
      self._key_rows = d
    return self._key_rows

  def locate(self, grows: np.ndarray) -> np.ndarray:
    """The index into `segments` of each global row."""
    bases = np.array([s.base for s in self._segments])
    return np.searchsorted(bases, grows, side="right") - 1

  def _segment_row(self, grow: int) -> tuple[Segment, int]:
    seg = self._segments[int(self.locate(np.int64(grow)))]
    return seg, int(grow) - seg.base

  def get_file_stat(self, key: str) -> FileStat | None:
    """The source-file identity stored with a live key, or None if the key is absent."""
    grow = self.live_rows().get(key)
    if grow is None:
      return None
    seg, row = self._segment_row(grow)
    return self._catalog.file_stat(seg.name, row)

  def get_vectors(self, keys: Sequence[str], *, float32_copy: bool = True) -> np.ndarray:
    """[len(keys), dim] float32 vectors of live keys (KeyError for a missing one).

    Uses the float32 copy when the index keeps one (and `float32_copy`), else dequantises.
    """
    live = self.live_rows()
    out = np.empty((len(keys), self.dim), np.float32)
    for i, key in enumerate(keys):
      if key not in live:
        raise KeyError(f"key {key!r} is not in the index {self.path}")
      seg, row = self._segment_row(live[key])
      if float32_copy and seg.float32 is not None:
        out[i] = seg.float32[row]
      else:
        out[i] = seg.dequantize(slice(row, row + 1))[0]
    return out

  def iter_chunks(
    self, chunk_rows: int = seg_lib.CHUNK_ROWS, *, live_only: bool = True
  ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yields (keys, [n, dim] float32 dequantised vectors) in storage order, n <= chunk_rows."""
    for seg in self._segments:
      for start in range(0, seg.rows, chunk_rows):
        stop = min(seg.rows, start + chunk_rows)
        mask = ~seg.deleted[start:stop] if live_only else np.ones(stop - start, bool)
        if not mask.any():
          continue
        x = seg.dequantize(slice(start, stop))[mask]
        yield seg.keys[start:stop][mask].tolist(), x

  def iter_vectors(self, chunk_rows: int = seg_lib.CHUNK_ROWS) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, [dim] float32 vector) for every live row, reading chunk by chunk."""
    for keys, x in self.iter_chunks(chunk_rows):
      yield from zip(keys, x, strict=True)

  def verify(self) -> None:
    """Checks every file's sha256 against the manifest; raises IndexCorruptError naming the file."""
    for seg in self._manifest["segments"]:
      for info in seg["files"].values():
        fpath = os.path.join(self.path, info["file"])
        if fileio.sha256_file(fpath) != info["sha256"]:
          raise IndexCorruptError(f"segment file {fpath} fails its sha256 checksum")

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
    statistics: str | None = None,
    devices: Sequence[Any] | None = None,
    scan: Any = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest live vectors of each query: `engine.store.search.search` on this index
    (with its collection statistics, if it has learned any).

    With `devices` (JAX devices), the rows are split over them for this one search
    (`engine.store.sharded.ShardedSearcher`; keep one of those to search many times). `scan`
    replaces the step that finds the candidates (`engine.store.search.search`), e.g. an
    `engine.store.sharded.ProcessScan` in a multi-process run.
    """
    if devices is not None:
      from engine.store import sharded  # JAX loads with the first search, not here

      return sharded.ShardedSearcher(self, devices, method=method).search(
        queries, k, metric, allowed_keys, rerank
      )
    from engine.store import search as search_lib  # JAX loads with the first search, not here

    return search_lib.search(
      self,
      queries,
      k,
      metric,
      allowed_keys,
      rerank,
      chunk_rows=chunk_rows,
      method=method,
      statistics=statistics,
      scan=scan,
    )

  # ---------------------------------------------------------------- lifecycle

  def close(self) -> None:
    """Releases the lock, the catalog and the memory maps. Idempotent."""
    self._closed = True
    self._segments = []
    self._key_rows = None
    self._stat_factors = {}
    if self._catalog is not None:
      self._catalog.close()
      self._catalog = None
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
