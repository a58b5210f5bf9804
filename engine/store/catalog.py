"""The catalog: which key each segment row holds, its source file's identity, and tombstones.

One SQLite table (`rows`: key, segment, row, sha256, size, mtime_ns, added_gen, deleted_gen),
WAL mode with full fsync for the single writer, read-only connections for readers. Every change
runs inside `Catalog.transaction()`. Rows carry the generation that added (and deleted) them, so
`recover` can undo a commit whose manifest never landed.

Keys are any str; those that are not valid UTF-8 (file names decoded with surrogateescape) are
stored as BLOBs of their original bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import sqlite3
from collections.abc import Iterable, Iterator

from engine.store import faults
from engine.store.errors import IndexCorruptError, StoreError

CATALOG = "catalog.sqlite"
FILES = (CATALOG, CATALOG + "-wal", CATALOG + "-shm", CATALOG + "-journal")
_INSERT = (
  "INSERT INTO rows (key, segment, row, sha256, size, mtime_ns, added_gen, deleted_gen) "
  "VALUES (?, ?, ?, ?, ?, ?, ?, NULL)"
)


@dataclasses.dataclass(frozen=True)
class FileStat:
  """Identity of the source file a vector came from."""

  sha256: str | None
  size: int | None
  mtime_ns: int | None


def db_key(key: str) -> str | bytes:
  """A key as stored in the catalog: TEXT, or the original bytes of a non-UTF-8 file name."""
  try:
    key.encode("utf-8")
    return key
  except UnicodeEncodeError:
    return key.encode("utf-8", "surrogateescape")


def py_key(value: str | bytes) -> str:
  return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def keys_digest(keys: Iterable[str]) -> str:
  """sha256 of keys in row order (recorded per segment in the manifest)."""
  h = hashlib.sha256()
  for k in keys:
    h.update(k.encode("utf-8", "surrogatepass") + b"\0")
  return h.hexdigest()


def _connect_readonly(path: str) -> sqlite3.Connection:
  """A read-only connection (the URI built by pathlib, so `#`, `?` or `%` in a path stay literal).

  A WAL database needs its -shm file even to read; on read-only media, or in a folder owned by
  someone else, that file cannot be made, so the catalog is then opened as immutable. The writer
  leaves the catalog in rollback-journal mode when it closes (`close`), so an immutable reader
  misses nothing that was committed.
  """
  uri = pathlib.Path(path).absolute().as_uri()
  db = sqlite3.connect(uri + "?mode=ro", uri=True, check_same_thread=False)
  try:
    db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    return db
  except sqlite3.OperationalError:
    db.close()
    if os.access(os.path.dirname(path), os.W_OK):
      raise
  return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, check_same_thread=False)


class Catalog:
  """A connection to an index folder's catalog."""

  def __init__(self, folder: str, readonly: bool, *, must_exist: bool):
    self.path = os.path.join(folder, CATALOG)
    self.readonly = readonly
    with self.errors():
      if (readonly or must_exist) and not os.path.exists(self.path):
        raise IndexCorruptError(f"catalog {self.path} is missing")
      if readonly:
        self._db = _connect_readonly(self.path)
      else:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
          "CREATE TABLE IF NOT EXISTS rows (key TEXT NOT NULL, segment TEXT NOT NULL, "
          "row INTEGER NOT NULL, sha256 TEXT, size INTEGER, mtime_ns INTEGER, "
          "added_gen INTEGER NOT NULL, deleted_gen INTEGER, PRIMARY KEY (segment, row))"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS rows_key ON rows (key)")

  @contextlib.contextmanager
  def errors(self):
    """sqlite3 errors -> StoreError naming the catalog (IndexCorruptError for a damaged one)."""
    try:
      yield
    except sqlite3.OperationalError as e:  # locked, disk full, read-only folder, I/O error
      raise StoreError(f"catalog {self.path}: {e}") from None
    except sqlite3.DatabaseError as e:  # not a database, malformed
      raise IndexCorruptError(f"catalog {self.path} is damaged: {e}") from None

  @contextlib.contextmanager
  def transaction(self):
    """One write transaction: committed when the block ends, rolled back if it raises."""
    db = self._db
    db.execute("BEGIN IMMEDIATE")
    try:
      yield db
      db.execute("COMMIT")
    except BaseException:
      with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")
      raise

  def newest_generation(self) -> int:
    newest = self._db.execute("SELECT MAX(added_gen), MAX(deleted_gen) FROM rows").fetchone()
    return max((g for g in newest if g is not None), default=0)

  def recover(self, live_segments: Iterable[str], generation: int) -> None:
    """Drops rows of unlisted segments and of generations above `generation`."""
    with self.transaction() as db:
      db.execute("CREATE TEMP TABLE IF NOT EXISTS live_segments (name TEXT PRIMARY KEY)")
      db.execute("DELETE FROM live_segments")
      db.executemany("INSERT INTO live_segments VALUES (?)", [(n,) for n in live_segments])
      db.execute("DELETE FROM rows WHERE segment NOT IN (SELECT name FROM live_segments)")
      db.execute("DELETE FROM rows WHERE added_gen > ?", (generation,))
      db.execute("UPDATE rows SET deleted_gen = NULL WHERE deleted_gen > ?", (generation,))

  def segment_rows(self, segment: str, generation: int) -> Iterator[tuple[int, str, bool]]:
    """(row, key, deleted) of a segment's rows as of `generation`."""
    cur = self._db.execute(
      "SELECT row, key, deleted_gen FROM rows WHERE segment = ? AND added_gen <= ?",
      (segment, generation),
    )
    for row, key, dgen in cur:
      yield row, py_key(key), dgen is not None and dgen <= generation

  def segment_stats(self, segment: str) -> dict[int, tuple]:
    """row -> (sha256, size, mtime_ns) of one segment."""
    return {
      r: (sh, sz, mt)
      for r, sh, sz, mt in self._db.execute(
        "SELECT row, sha256, size, mtime_ns FROM rows WHERE segment = ?", (segment,)
      )
    }

  def file_stat(self, segment: str, row: int) -> FileStat | None:
    with self.errors():
      r = self._db.execute(
        "SELECT sha256, size, mtime_ns FROM rows WHERE segment = ? AND row = ?", (segment, row)
      ).fetchone()
    return FileStat(*r) if r else None

  def commit_rows(
    self,
    inserts: list[tuple],
    tombstones: list[tuple[str, int]],
    generation: int,
    *,
    tombstone_segments: Iterable[str] = (),
  ) -> None:
    """Inserts rows (key, segment, row, sha256, size, mtime_ns, added_gen) and stamps tombstones
    on rows (segment, row) and on every live row of `tombstone_segments`, in one transaction."""
    with self.transaction() as db:
      if inserts:
        db.executemany(_INSERT, inserts)
      if tombstones:
        db.executemany(
          "UPDATE rows SET deleted_gen = ? WHERE segment = ? AND row = ? AND deleted_gen IS NULL",
          [(generation, s, r) for s, r in tombstones],
        )
      db.executemany(
        "UPDATE rows SET deleted_gen = ? WHERE segment = ? AND deleted_gen IS NULL",
        [(generation, name) for name in tombstone_segments],
      )
    faults.reached("catalog")

  def update_stats(self, todo: list[tuple]) -> None:
    """Replaces (sha256, size, mtime_ns) of (segment, row) rows: [(sha, size, mtime, seg, row)]."""
    with self.transaction() as db:
      db.executemany(
        "UPDATE rows SET sha256 = ?, size = ?, mtime_ns = ? WHERE segment = ? AND row = ?", todo
      )

  def close(self) -> None:
    """Closes the connection; a writer first folds the WAL back into the database file, so the
    catalog is one self-contained file that readers on read-only media can open."""
    with contextlib.suppress(sqlite3.Error):
      if not self.readonly:
        self._db.execute("PRAGMA journal_mode=DELETE")  # fails harmlessly while readers are open
    with contextlib.suppress(sqlite3.Error):
      self._db.close()
