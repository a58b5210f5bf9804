"""The on-disk index: memory-mapped segments, a SQLite catalog and an atomic manifest.

`Index` is the handle (engine/store/index.py); segments.py is the file format, catalog.py the
SQLite catalog and its transactions, manifest.py the commit point, commits.py the write protocol,
search.py the scan through the top-k kernels, statistics.py the collection statistics (centering,
whitening) applied at search time, faults.py the crash points of the fault tests.
"""

from engine.store.catalog import CATALOG, FileStat
from engine.store.errors import (
  IndexCorruptError,
  IndexExistsError,
  IndexLockedError,
  IndexMismatchError,
  IndexNotFoundError,
  IndexReadOnlyError,
  QueryMismatchError,
  StoreError,
)
from engine.store.index import LOCK, Index, exists
from engine.store.manifest import MANIFEST
from engine.store.segments import DTYPES, quantize_int8
from engine.store.statistics import Statistics, parse_policy

__all__ = [
  "CATALOG",
  "DTYPES",
  "LOCK",
  "MANIFEST",
  "FileStat",
  "Index",
  "IndexCorruptError",
  "IndexExistsError",
  "IndexLockedError",
  "IndexMismatchError",
  "IndexNotFoundError",
  "IndexReadOnlyError",
  "QueryMismatchError",
  "Statistics",
  "StoreError",
  "exists",
  "parse_policy",
  "quantize_int8",
]
