"""Query quality options from the retrieval literature: alpha query expansion and database-side
augmentation, as array functions and as a search over an index.

alpha-QE (Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018): the query is replaced by the normalised weighted sum of itself and its top `n`
neighbours, neighbour i weighted by max(s_i, 0)^alpha (s_i its score), and searched again.
DBA (the same paper, after Arandjelovic and Zisserman 2012) does the same to every database
vector with its own neighbours. This engine never rewrites stored rows, so DBA runs at query time
on a shortlist: each of the `shortlist` best candidates is replaced by its augmented vector (its own
top `n` neighbours in the index) and the shortlist is re-ranked by the cosine to it.

Expansion happens in the space of the stored rows (unit descriptors); an index's collection
statistics (engine/store/statistics.py) still apply to the expanded query, and the weights come
from the scores the index returns (with statistics, the centred / whitened cosines).
"""

from __future__ import annotations

import numpy as np

from engine import store


def _unit(x: np.ndarray) -> np.ndarray:
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(n > 0, n, 1.0)


def weights(scores: np.ndarray, alpha: float) -> np.ndarray:
  """max(s, 0)^alpha; alpha = 0 gives every neighbour with a positive score weight 1."""
  s = np.maximum(np.asarray(scores, np.float64), 0.0)
  return np.where(s > 0, s**alpha, 0.0)


def alpha_qe(
  queries_qd: np.ndarray, neighbours_qnd: np.ndarray, scores_qn: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
  """Alpha query expansion: [Q, D] queries, their [Q, n, D] neighbours and [Q, n] scores ->
  [Q, D] float32 unit queries, normalise(q + sum_i max(s_i, 0)^alpha x_i)."""
  q = _unit(np.asarray(queries_qd, np.float64))
  x = np.asarray(neighbours_qnd, np.float64)
  w = weights(scores_qn, alpha)
  return _unit(q + np.einsum("qn,qnd->qd", w, x)).astype(np.float32)


def dba(
  vectors_nd: np.ndarray, neighbours_nkd: np.ndarray, scores_nk: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
  """Database-side augmentation: each vector with its own neighbours (itself excluded), the same
  weighted sum as `alpha_qe`. [N, D], [N, k, D], [N, k] -> [N, D] float32 unit vectors."""
  return alpha_qe(vectors_nd, neighbours_nkd, scores_nk, alpha)


def search(
  idx: store.Index,
  queries_qd: np.ndarray,
  k: int,
  *,
  qe: int = 0,
  qe_alpha: float = 3.0,
  dba_n: int = 0,
  dba_alpha: float = 3.0,
  shortlist: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
  """`idx.search` with alpha-QE (`qe` > 0 neighbours) and/or query-time DBA (`dba_n` > 0).

  Order: DBA re-ranks the first search's shortlist, alpha-QE expands with the (re-ranked) top
  `qe`, and the expanded query is searched again (re-ranked by DBA again when asked).

  Returns:
    scores [Q, m] float32 and keys [Q, m] object, best first, as `Index.search`. With DBA the
    scores are cosines to the augmented vectors.
  """
  q = _unit(np.asarray(queries_qd, np.float32))
  if qe < 0 or dba_n < 0:
    raise ValueError(f"qe and dba must be >= 0, got {qe}, {dba_n}")
  if qe == 0 and dba_n == 0:
    return idx.search(q, k=k)
  first = max(k, qe, shortlist if dba_n else 0)
  scores, keys = _search_dba(idx, q, first, dba_n, dba_alpha)
  if qe:
    n = min(qe, scores.shape[1])
    neigh = np.stack([idx.get_vectors(list(row[:n])) for row in keys]) if n else None
    if neigh is not None:
      q = alpha_qe(q, _unit(neigh), scores[:, :n], qe_alpha)
    scores, keys = _search_dba(idx, q, max(k, shortlist if dba_n else 0), dba_n, dba_alpha)
  return scores[:, :k], keys[:, :k]


def _search_dba(idx, q, first, dba_n, alpha):
  scores, keys = idx.search(q, k=first)
  if not dba_n or scores.shape[1] == 0:
    return scores, keys
  # The augmented vector of every distinct candidate, once.
  cand = sorted({key for row in keys for key in row})
  vecs = _unit(idx.get_vectors(cand))
  ns, nk = idx.search(vecs, k=min(dba_n + 1, len(idx)))
  aug = np.empty_like(vecs)
  for i, key in enumerate(cand):
    keep = nk[i] != key
    s, kk = ns[i][keep][:dba_n], nk[i][keep][:dba_n]
    x = _unit(idx.get_vectors(list(kk))) if len(kk) else np.zeros((0, vecs.shape[1]), np.float32)
    aug[i] = dba(vecs[i : i + 1], x[None], s[None], alpha)[0]
  row_of = {key: i for i, key in enumerate(cand)}
  stats = idx.statistics
  out_s = np.empty(scores.shape, np.float32)
  out_k = np.empty(keys.shape, object)
  for r in range(q.shape[0]):
    a = aug[[row_of[key] for key in keys[r]]]
    s = stats.scores(q[r : r + 1], a[None])[0] if stats is not None else a @ q[r]
    order = np.argsort(-s, kind="stable")
    out_s[r], out_k[r] = s[order], keys[r][order]
  return out_s, out_k
