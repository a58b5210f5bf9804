"""The on-disk index: memory-mapped segments, a SQLite catalog and an atomic manifest."""

from engine.store.index import (
  CATALOG,
  DTYPES,
  FAULT_ENV,
  MANIFEST,
  FileStat,
  Index,
  IndexCorruptError,
  IndexExistsError,
  IndexLockedError,
  IndexMismatchError,
  IndexNotFoundError,
  IndexReadOnlyError,
  StoreError,
  exists,
  quantize_int8,
)

__all__ = [
  "CATALOG",
  "DTYPES",
  "FAULT_ENV",
  "MANIFEST",
  "FileStat",
  "Index",
  "IndexCorruptError",
  "IndexExistsError",
  "IndexLockedError",
  "IndexMismatchError",
  "IndexNotFoundError",
  "IndexReadOnlyError",
  "StoreError",
  "exists",
  "quantize_int8",
]
