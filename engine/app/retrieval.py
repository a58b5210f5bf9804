"""Question-level operations on an index: query with image files, find near-duplicate groups."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine import store
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
  scan=None,
) -> QueryResults:
  """Extracts the query image(s) and searches the index with them.

  Returns at most k matches per query: all the index holds when it holds fewer. `scan`: as in
  `engine.store.Index.search` (a multi-process run's `engine.store.sharded.ProcessScan`).

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
    scores, keys = idx.search(extracted.features, k=k, scan=scan)
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
  idx: store.Index, threshold: float, *, k: int = 32, chunk: int = 1024, scan=None
) -> list[list[tuple[str, float]]]:
  """Groups of near-duplicates: connected components of the "cosine >= threshold" graph.

  A self-join in chunks of `chunk` query rows against the whole index through the search kernel:
  memory is bounded by chunk x k, never N x N. Each row links to at most its k nearest, which
  bounds the graph's degree (`scan`: as in `engine.store.Index.search`). Returns groups (largest first) of (key, best score to another member).
  """
  parent: dict[str, str] = {}

  def find(x):
    while parent.get(x, x) != x:
      parent[x] = parent.get(parent[x], parent[x])
      x = parent[x]
    return x

  best: dict[str, float] = {}
  kk = min(k + 1, len(idx))
  if kk < 2:
    return []
  for keys_q, vecs in idx.iter_chunks(chunk):
    scores, keys = idx.search(vecs, k=kk, scan=scan)
    for qkey, srow, krow in zip(keys_q, scores, keys, strict=True):
      for other, s in zip(krow, srow, strict=True):
        if other is None or other == qkey or not s >= threshold:
          continue
        best[qkey] = max(best.get(qkey, -1.0), float(s))
        best[other] = max(best.get(other, -1.0), float(s))
        a, b = find(qkey), find(other)
        if a != b:
          parent[max(a, b)] = min(a, b)
  groups: dict[str, list[str]] = {}
  for key in best:
    groups.setdefault(find(key), []).append(key)
  out = [sorted((m, best[m]) for m in members) for members in groups.values() if len(members) > 1]
  return sorted(out, key=lambda g: (-len(g), g[0][0]))
