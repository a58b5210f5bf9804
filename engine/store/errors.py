"""Errors the index raises about its files or its use."""

from __future__ import annotations

from engine.common.errors import UserError


class StoreError(UserError):
  """Base class of every error the index raises about its files or usage."""


class IndexNotFoundError(StoreError, FileNotFoundError):
  """No index (or a missing file of one) at the given path."""


class IndexExistsError(StoreError, FileExistsError):
  """`Index.create` on a folder that already holds an index, or files that are not the engine's."""


class IndexCorruptError(StoreError):
  """A file of the index is missing, truncated, malformed or fails its checksum."""


class IndexMismatchError(StoreError):
  """The index was built by a different extractor (metadata) or with a different dim."""


class IndexLockedError(StoreError):
  """Another process holds the writer lock."""


class IndexReadOnlyError(StoreError):
  """A write was attempted on an index opened with readonly=True."""


class QueryMismatchError(IndexMismatchError, ValueError):
  """Queries that do not fit the index: another dimension, or already transformed by statistics
  the index applies itself."""
