"""Near-duplicate groups from an index's k-nearest-neighbour graph, under a stated linkage rule.

The graph comes from a self-join through `Index.search` in chunks of query rows (memory bounded by
chunk x k scores plus the kept edges, at most N x k, never N x N), so the scores are exactly those a
query sees, with whatever the index applies at search time. An edge joins two images when either
finds the other among its k nearest with a score >= the threshold; when both do, the lower of the
two scores is kept. A pair that is not in the graph counts as below the threshold.

Linkage rules (`LINKAGES`):
  complete: every pair inside a group scores >= the threshold. Greedy agglomeration over the edges
    from the highest score down: two groups merge only when every cross pair is an edge. It cannot
    chain: A~B and B~C with A !~ C never puts A and C together.
  representative: each group is an image (the one with the most neighbours left, then the first
    key) and its neighbours not yet grouped; every member scores >= the threshold against the
    representative, members among themselves may not.
  single: connected components (transitive: A~B, B~C puts A, B, C together however far A is from
    C). Only on request: on a dense graph it builds one group of everything.
Ties break by key, so the groups are a function of the index's contents.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from engine import store

LINKAGES = ("complete", "representative", "single")

RULES = {
  "complete": "every pair of images in a group scores >= {t:.4f}",
  "representative": "every image in a group scores >= {t:.4f} against the group's first image",
  "single": "each image scores >= {t:.4f} against at least one other (transitive: chains allowed)",
}


def rule(linkage: str, threshold: float) -> str:
  """The grouping rule in words, for `--help` and every output."""
  return RULES[linkage].format(t=threshold)


@dataclasses.dataclass(frozen=True)
class Group:
  """One group of near-duplicates.

  Attributes:
    keys: the members, sorted (the representative first under linkage="representative").
    scores: per member, its lowest score to another member under "complete", its score to the
      representative under "representative" (1.0 for itself), its best link under "single".
    min_pair: the lowest score between two members the graph holds (under "complete", the lowest of
      all pairs).
  """

  keys: tuple[str, ...]
  scores: tuple[float, ...]
  min_pair: float

  def __len__(self) -> int:
    return len(self.keys)


class Graph:
  """Undirected edges {(a, b): score} with a < b, and each key's neighbours."""

  def __init__(self):
    self.edges: dict[tuple[str, str], float] = {}
    self.adj: dict[str, set[str]] = {}

  def add(self, a: str, b: str, score: float) -> None:
    if a == b:
      return
    e = (a, b) if a < b else (b, a)
    old = self.edges.get(e)
    self.edges[e] = score if old is None else min(old, score)
    self.adj.setdefault(a, set()).add(b)
    self.adj.setdefault(b, set()).add(a)

  def score(self, a: str, b: str) -> float | None:
    return self.edges.get((a, b) if a < b else (b, a))

  def sorted_edges(self) -> list[tuple[float, str, str]]:
    return sorted(
      ((s, a, b) for (a, b), s in self.edges.items()), key=lambda e: (-e[0], e[1], e[2])
    )


def neighbour_graph(
  idx: store.Index, threshold: float, *, k: int = 32, chunk: int = 1024, scan=None
) -> Graph:
  """The "score >= threshold among the k nearest" graph of every live row, through `idx.search`
  (`scan`: as in `engine.store.Index.search`, e.g. a multi-process run's scan)."""
  g = Graph()
  kk = min(k + 1, len(idx))  # + 1: a row finds itself
  if kk < 2:
    return g
  for keys_q, vecs in idx.iter_chunks(chunk):
    scores, keys = idx.search(vecs, k=kk, scan=scan)
    for qkey, srow, krow in zip(keys_q, scores, keys, strict=True):
      for other, s in zip(krow, srow, strict=True):
        if other is not None and other != qkey and math.isfinite(s) and s >= threshold:
          g.add(qkey, str(other), float(s))
  return g


def _complete(g: Graph) -> list[Group]:
  cluster: dict[str, int] = {}
  members: dict[int, list[str]] = {}
  for key in sorted(g.adj):
    cluster[key] = len(members)
    members[len(members)] = [key]
  for _, a, b in g.sorted_edges():
    ca, cb = cluster[a], cluster[b]
    if ca == cb:
      continue
    if all(g.score(x, y) is not None for x in members[ca] for y in members[cb]):
      keep, gone = min(ca, cb), max(ca, cb)
      for x in members[gone]:
        cluster[x] = keep
      members[keep].extend(members.pop(gone))
  out = []
  for ms in members.values():
    if len(ms) < 2:
      continue
    ms = sorted(ms)
    per = [min(g.score(x, y) for y in ms if y != x) for x in ms]
    out.append(Group(tuple(ms), tuple(per), min(per)))
  return out


def _representative(g: Graph) -> list[Group]:
  left = {key: set(n) for key, n in g.adj.items()}
  out = []
  while left:
    rep = min(left, key=lambda key: (-len(left[key]), key))
    ms = sorted(left[rep])
    if not ms:
      del left[rep]
      continue
    scores = [g.score(rep, m) for m in ms]
    for key in (rep, *ms):
      for n in left.pop(key):
        if n in left:
          left[n].discard(key)
    pairs = [s for i, a in enumerate(ms) for b in ms[i + 1 :] if (s := g.score(a, b)) is not None]
    out.append(Group((rep, *ms), (1.0, *scores), min(scores + pairs)))
  return out


def _single(g: Graph) -> list[Group]:
  parent: dict[str, str] = {}

  def find(x):
    while parent.get(x, x) != x:
      parent[x] = parent.get(parent[x], parent[x])
      x = parent[x]
    return x

  for _, a, b in g.sorted_edges():
    ra, rb = find(a), find(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  comps: dict[str, list[str]] = {}
  for key in g.adj:
    comps.setdefault(find(key), []).append(key)
  out = []
  for ms in comps.values():
    ms = sorted(ms)
    best = [max(g.score(x, y) for y in g.adj[x]) for x in ms]
    inside = [g.edges[(a, b)] for i, a in enumerate(ms) for b in ms[i + 1 :] if (a, b) in g.edges]
    out.append(Group(tuple(ms), tuple(best), min(inside)))
  return out


def group_graph(g: Graph, linkage: str = "complete") -> list[Group]:
  """Groups of two or more images of `g` under `linkage`, largest first, then by first key."""
  if linkage not in LINKAGES:
    raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
  groups = {"complete": _complete, "representative": _representative, "single": _single}[linkage](g)
  return sorted(groups, key=lambda gr: (-len(gr), gr.keys[0]))


def find_groups(
  idx: store.Index,
  threshold: float,
  *,
  linkage: str = "complete",
  k: int = 32,
  chunk: int = 1024,
  scan=None,
) -> list[Group]:
  """Near-duplicate groups of the index's live images under `linkage` (see the module docstring).

  Args:
    idx: an open index.
    threshold: the score two images need to be linked, in [-1, 1].
    linkage: "complete" (default), "representative" or "single".
    k: neighbours examined per image: a group has at most k + 1 members under "complete".
    chunk: query rows per search call (memory is bounded by chunk x k).
    scan: as in `engine.store.Index.search` (a multi-process run's `ProcessScan`).
  """
  if not -1.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [-1, 1], got {threshold}")
  return group_graph(neighbour_graph(idx, threshold, k=k, chunk=chunk, scan=scan), linkage)


def pair_counts(groups: Iterable[Group], same: dict[str, str]) -> tuple[int, int]:
  """(pairs inside groups, of which true duplicates): `same` maps a key to its original's label."""
  total = right = 0
  for gr in groups:
    labels = [same.get(key) for key in gr.keys]
    for i in range(len(labels)):
      for j in range(i + 1, len(labels)):
        total += 1
        right += labels[i] is not None and labels[i] == labels[j]
  return total, right
