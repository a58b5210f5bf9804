"""Question-level operations on an index: query with image files, find near-duplicate groups."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine import store
from engine.app import expansion, grouping
from engine.app.walk import split_images
from engine.common.errors import UserError
from engine.features.extractor import Extractor


@dataclasses.dataclass
class QueryResults:
  """matches: (query path, [(key, score)]) per decodable query; failed: (path, reason);
  scoring: what the scores are (the index's collection statistics, expansion)."""

  matches: list[tuple[str, list[tuple[str, float]]]]
  failed: list[tuple[str, str]]
  scoring: str = "cosine"


def describe_scoring(idx: store.Index, raw: bool = False) -> str:
  """One line saying what an index's scores are."""
  info = idx.statistics_info
  if raw or info is None:
    return "cosine of the descriptors"
  what = "centred" if info["kind"] == "center" else f"PCA-whitened to {info['dim']} dims"
  return (
    f"cosine of descriptors {what} by statistics learned from {info['rows']} indexed images "
    f"(id {info['sha256'][:12]})"
  )


def query_index(
  index_path: str,
  query: str,
  extractor: Extractor,
  *,
  k: int = 10,
  min_score: float | None = None,
  raw_scores: bool = False,
  qe: int = 0,
  qe_alpha: float = 3.0,
  dba: int = 0,
  dba_alpha: float = 3.0,
  shortlist: int = 100,
  scan=None,
) -> QueryResults:
  """Extracts the query image(s) and searches the index with them.

  Returns at most k matches per query: all the index holds when it holds fewer. Scores use the
  index's collection statistics unless `raw_scores`; `qe`, `dba` and the rest are the options of
  `engine.app.expansion.search`. `scan`: as in `engine.store.Index.search` (a multi-process
  run's `engine.store.sharded.ProcessScan`).

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
    if raw_scores and (qe or dba):
      raise UserError("raw scores and query expansion / DBA do not combine")
    if qe or dba:
      scores, keys = expansion.search(
        idx,
        extracted.features,
        k,
        qe=qe,
        qe_alpha=qe_alpha,
        dba_n=dba,
        dba_alpha=dba_alpha,
        shortlist=max(shortlist, k),
      )
    else:
      scores, keys = idx.search(
        extracted.features, k=k, statistics="none" if raw_scores else None, scan=scan
      )
    scoring = describe_scoring(idx, raw_scores)
    if qe:
      scoring += f", alpha-QE over {qe} neighbours (alpha {qe_alpha:g})"
    if dba:
      scoring += f", DBA re-ranking of {max(shortlist, k)} (over {dba} neighbours each)"
  matches = []
  for row, pos in enumerate(extracted.positions):
    pairs = [
      (str(key), float(s))
      for key, s in zip(keys[row], scores[row], strict=True)
      if key is not None and np.isfinite(s) and (min_score is None or s >= min_score)
    ]
    matches.append((paths[pos], pairs))
  return QueryResults(matches, failed, scoring)


def find_duplicates(
  idx: store.Index, threshold: float, *, k: int = 32, linkage: str = "complete", scan=None
) -> list[list[tuple[str, float]]]:
  """Groups of near-duplicates as (key, score) lists, largest first (`grouping.find_groups`)."""
  groups = grouping.find_groups(idx, threshold, linkage=linkage, k=k, scan=scan)
  return [list(zip(g.keys, g.scores, strict=True)) for g in groups]
