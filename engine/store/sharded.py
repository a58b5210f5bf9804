"""Search over a device mesh and over processes: an index's rows split across devices (resident
where they fit, streamed in byte-sized chunks where they do not) or its segments split across the
processes of a `jax.distributed` run, with per-part top-k lists merged into the one-device answer.

Both plug into `engine.store.search.search` as its `scan` step, so filters, compressed-storage
re-scoring and key lookup are the same code as on one device: the candidates a scan returns are the
global top-kk of the kernel's scores whichever way the rows were split.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from engine.kernels import sharded as sharded_lib
from engine.kernels import streaming
from engine.kernels import topk as topk_lib
from engine.store import search as search_lib

AXIS = "rows"


def read_rows(segs, start: int, stop: int, dim: int, dtype, role: str = "vectors") -> np.ndarray:
  """Global rows [start, stop) of `segs` ("vectors" [n, dim] or "scales" [n]), zero past the end."""
  shape = (stop - start, dim) if role == "vectors" else (stop - start,)
  out = np.zeros(shape, dtype)
  for seg in segs:
    a, b = max(start, seg.base), min(stop, seg.base + seg.rows)
    if a < b:
      src = seg.vectors if role == "vectors" else seg.scales
      out[a - start : b - start] = src[a - seg.base : b - seg.base]
  return out


def merge_host(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int):
  """Merges top-k lists of the same queries ([Q, k_i] scores, global rows; -inf / -1 for none):
  [Q, k] best first, ties broken by the lower row so every split gives the same order."""
  s = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
  g = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)
  key = np.where(g < 0, np.iinfo(np.int64).max, g)
  order = np.lexsort((key, -s.astype(np.float64)), axis=1)[:, :k]
  return np.take_along_axis(s, order, 1), np.take_along_axis(g, order, 1)


def _same(a, b) -> bool:
  return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class ShardedSearcher:
  """An index's rows placed on a 1-D mesh of `devices`, answering many query batches.

  Rows are padded to a multiple of the device count (padding masked, never returned). If every
  device's share of the stored rows fits in its memory budget (`streaming.memory_budget`, the
  smallest over the devices, or `budget`), the rows stay on the devices between searches;
  otherwise each search streams them in chunks of at most that many bytes per device. Each device
  keeps its own top-k and the lists are all-gathered and merged (`kernels.sharded.sharded_topk`).
  Resident rows are scanned in blocks of `block_rows` (default: what the budget allows at the
  largest query batch), so the [Q, rows] scores never cover a whole device's share.

      searcher = ShardedSearcher(index, jax.devices())
      scores, keys = searcher.search(queries, k=10)
  """

  def __init__(
    self,
    index,
    devices: Sequence[jax.Device] | None = None,
    *,
    budget: int | None = None,
    method: str | None = None,
    block_rows: int | None = None,
  ):
    self.index = index
    self._block_rows = block_rows
    self.devices = list(devices) if devices is not None else jax.local_devices()
    if not self.devices:
      raise ValueError("ShardedSearcher needs at least one device")
    self.mesh = jax.make_mesh((len(self.devices),), (AXIS,), devices=self.devices)
    self.method = method
    self.budget = (
      min(streaming.memory_budget(dev) for dev in self.devices) if budget is None else int(budget)
    )
    self._generation = None
    self._place()

  @property
  def resident(self) -> bool:
    """Whether the rows stay on the devices between searches."""
    return self._rows is not None

  def _place(self) -> None:
    idx = self.index
    self._segs = idx.segments
    self._generation = idx.generation
    self._n = sum(s.rows for s in self._segs)
    self._dtype = np.dtype(self._segs[0].vectors.dtype) if self._segs else np.dtype(np.float32)
    self._int8 = self._dtype == np.int8
    nd = len(self.devices)
    # Resident rows are scanned in blocks whose scores fit the budget at the largest query batch;
    # each device's share is a whole number of blocks (padding masked).
    self._block = self._block_rows or streaming.chunk_rows_for(
      search_lib.QUERY_BATCH, None, self._dtype, self.method, d=idx.dim, budget=self.budget
    )
    per_device = -(-self._n // nd)
    if per_device <= self._block:
      block = topk_lib._BLOCK  # one block: a multiple of the selection's row blocks
      self._shard = max(block, -(-per_device // block) * block)
    else:
      self._shard = -(-per_device // self._block) * self._block
    per_row = idx.dim * self._dtype.itemsize + (4 if self._int8 else 0) + 1
    self._rows = self._scales = None
    if self._shard * per_row <= self.budget:
      self._rows, self._scales = self._put(0, self._shard * nd)

  def _put(self, start: int, rows: int):
    """Global rows [start, start + rows) as arrays split over the mesh (zero past the end)."""
    segs, d = self._segs, self.index.dim
    row_sh = NamedSharding(self.mesh, P(AXIS, None))
    vec_sh = NamedSharding(self.mesh, P(AXIS))

    def vectors(ix):
      a, b, _ = ix[0].indices(rows)  # slice(None) on a one-device mesh
      return read_rows(segs, start + a, start + b, d, self._dtype)

    def scales(ix):
      a, b, _ = ix[0].indices(rows)
      return read_rows(segs, start + a, start + b, d, np.float32, "scales")

    m = jax.make_array_from_callback((rows, d), row_sh, vectors)
    sc = jax.make_array_from_callback((rows,), vec_sh, scales) if self._int8 else None
    return m, sc

  def _valid(self, valid: Sequence[np.ndarray], start: int, rows: int) -> jax.Array:
    v = np.zeros(rows, bool)
    flat = np.concatenate(list(valid)) if valid else np.zeros(0, bool)
    part = flat[start : start + rows]
    v[: part.size] = part
    return jax.device_put(v, NamedSharding(self.mesh, P(AXIS)))

  def scan(self, segs, valid, q: np.ndarray, kk: int, metric: str, **statistics):
    """`search`'s scan step on the mesh: [Q, kk] kernel scores and global rows."""
    if statistics:
      raise ValueError(
        "a mesh search of an index with collection statistics is not supported: search it on "
        "one device, or with statistics='none'"
      )
    if not _same(segs, self._segs):
      raise ValueError("the index changed since its rows were placed: call refresh()")
    nq = q.shape[0]
    qpad = 1 << max(0, (nq - 1).bit_length()) if nq <= 8 else -(-nq // 8) * 8
    qj = np.concatenate([q, np.zeros((qpad - nq, q.shape[1]), np.float32)])
    nd = len(self.devices)
    call = functools.partial(
      sharded_lib.sharded_topk,
      k=kk,
      mesh=self.mesh,
      axis=AXIS,
      metric=metric,
      method=self.method,
      block_rows=self._block,
    )
    if self.resident:
      s, i = call(
        qj, self._rows, scales=self._scales, valid=self._valid(valid, 0, self._shard * nd)
      )
      return np.asarray(s)[:nq], np.asarray(i)[:nq].astype(np.int64)
    per_device = streaming.chunk_rows_for(
      qpad, None, self._dtype, self.method, d=self.index.dim, budget=self.budget
    )
    per_device = min(per_device, self._shard)
    chunk = per_device * nd
    best = (np.full((nq, kk), -np.inf, np.float32), np.full((nq, kk), -1, np.int64))
    for start in range(0, self._n, chunk):
      va = self._valid(valid, start, chunk)
      m, sc = self._put(start, chunk)
      s, i = call(qj, m, scales=sc, valid=va)
      s, i = np.asarray(s)[:nq], np.asarray(i)[:nq].astype(np.int64)
      best = merge_host([best, (s, np.where(i >= 0, i + start, -1))], kk)
    return best

  def refresh(self) -> None:
    """Places the rows again if the index's generation changed (a reader of a live index)."""
    if self.index.generation != self._generation or not _same(self.index.segments, self._segs):
      self._place()

  def search(
    self,
    queries: np.ndarray,
    k: int = 10,
    metric: str = "cosine",
    allowed_keys: Iterable[str] | None = None,
    rerank: int = 0,
  ) -> tuple[np.ndarray, np.ndarray]:
    """`engine.store.search.search` with the rows on this searcher's mesh (same arguments and
    results, up to float32 rounding and the order of exact ties)."""
    self.refresh()
    return search_lib.search(self.index, queries, k, metric, allowed_keys, rerank, scan=self.scan)


class ProcessScan:
  """`search`'s scan step for one process of a `jax.distributed` run (`engine.app.distributed`).

  Process p of P scans only global rows [p N / P, (p + 1) N / P) of the index (a deterministic
  split by row range, across segment boundaries), streamed through its own device as on one
  process; the [Q, kk] lists of every process are all-gathered and merged, so every process gets
  the candidates one process would have found. Re-scoring and key lookup then read only those
  candidates' rows.
  """

  def __init__(
    self,
    process_id: int,
    num_processes: int,
    *,
    allgather=None,
    chunk_rows: int | None = None,
    method: str | None = None,
  ):
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    self.process_id, self.num_processes = process_id, num_processes
    self._allgather = allgather or _process_allgather
    self.chunk_rows, self.method = chunk_rows, method

  def share(self, n: int) -> tuple[int, int]:
    """This process's global rows [start, stop) of an index of n rows."""
    p, np_ = self.process_id, self.num_processes
    return p * n // np_, (p + 1) * n // np_

  def __call__(
    self, segs, valid, q: np.ndarray, kk: int, metric: str, query_offset=None, factors=None
  ):
    nq = q.shape[0]
    qpad = 1 << max(0, (nq - 1).bit_length()) if nq <= 8 else -(-nq // 8) * 8
    qj = jax.device_put(np.concatenate([q, np.zeros((qpad - nq, q.shape[1]), np.float32)]))
    qo = None
    if query_offset is not None:
      qo = jax.device_put(np.concatenate([query_offset, np.zeros(qpad - nq, np.float32)]))
    best = topk_lib.empty_topk(qpad, kk)
    lo, hi = self.share(sum(s.rows for s in segs))
    for n, (seg, v) in enumerate(zip(segs, valid, strict=True)):
      a, b = max(lo, seg.base) - seg.base, min(hi, seg.base + seg.rows) - seg.base
      if a >= b:
        continue
      scales, weight = (seg.scales, None) if factors is None else factors[n]
      best = streaming.chunked_topk(
        qj,
        seg.vectors[a:b],
        kk,
        metric=metric,
        scales=None if scales is None else scales[a:b],
        query_offset=qo,
        row_weight=None if weight is None else weight[a:b],
        valid=v[a:b],
        chunk_rows=self.chunk_rows,
        method=self.method,
        offset=seg.base + a,
        best=best,
      )
    s, i = jax.device_get(best)
    s, i = np.asarray(s[:nq], np.float32), np.asarray(i[:nq], np.int32)
    all_s = self._allgather(s).reshape(self.num_processes, nq, kk)
    all_i = self._allgather(i).reshape(self.num_processes, nq, kk)
    return merge_host(list(zip(all_s, all_i, strict=True)), kk)


def _process_allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x))
