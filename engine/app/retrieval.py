"""Question-level operations on an index: query with image files, find near-duplicate groups."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine import store
from engine.app import grouping
from engine.app.walk import split_images
from engine.common.errors import UserError
from engine.features.extractor import Extractor


@dataclasses.dataclass
class QueryResults:
  """matches: (query path, [(key, score)]) per decodable query; failed: (path, reason)."""

  matches: list[tuple[str, list[tuple[str, float]]]]
  failed: list[tuple[str, str]]


def query_index(
  index_path: str,
  query: str,
  extractor: Extractor,
  *,
  k: int = 10,
  min_score: float | None = None,
) -> QueryResults:
  """Extracts the query image(s) and searches the index with them.

  Returns at most k matches per query: all the index holds when it holds fewer.

  Raises:
    UserError: empty index, or no query image could be decoded.
  """
  with store.Index.open(index_path, readonly=True) as idx:
    if len(idx) == 0:
      raise UserError(f"the index at {index_path} is empty: index some images first")
    paths, failed = split_images(query)
    if not paths and not failed:
      raise UserError(f"no query images found under {query}")
    extracted = extractor.extract_paths(paths)
    failed += [(paths[p], r) for p, r in sorted(extracted.errors.items())]
    if not len(extracted.positions):
      reasons = "; ".join(f"{p}: {r}" for p, r in failed[:3])
      raise UserError(f"no query image could be decoded ({reasons})")
    scores, keys = idx.search(extracted.features, k=k)
  matches = []
  for row, pos in enumerate(extracted.positions):
    pairs = [
      (str(key), float(s))
      for key, s in zip(keys[row], scores[row], strict=True)
      if key is not None and np.isfinite(s) and (min_score is None or s >= min_score)
    ]
    matches.append((paths[pos], pairs))
  return QueryResults(matches, failed)


def find_duplicates(
  idx: store.Index, threshold: float, *, k: int = 32, linkage: str = "complete"
) -> list[list[tuple[str, float]]]:
  """Groups of near-duplicates as (key, score) lists, largest first (`grouping.find_groups`)."""
  groups = grouping.find_groups(idx, threshold, linkage=linkage, k=k)
  return [list(zip(g.keys, g.scores, strict=True)) for g in groups]
