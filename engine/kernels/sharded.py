"""`topk` over a matrix whose rows are split across the devices of a mesh: local top-k per device,
then an all-gather of the [Q, k] lists and one merge."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from engine.kernels.topk import empty_topk, merge_topk, topk


def sharded_topk(
  queries: ArrayLike,
  matrix: jax.Array,
  k: int,
  *,
  mesh: jax.sharding.Mesh,
  axis: str | Sequence[str] = "rows",
  metric: str = "cosine",
  scales: jax.Array | None = None,
  valid: jax.Array | None = None,
  method: str | None = None,
  block_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`topk` over a matrix whose rows are split across the devices of `mesh` along `axis`.

  Each device scores its own rows and keeps a local top-k; the [Q, k] lists are all-gathered and
  merged, so only Q * k * devices values cross devices. Queries are replicated.

  Args:
    queries: [Q, D] float.
    matrix: [N, D], any N (padded here with masked rows to a multiple of the devices along `axis`;
      an N that divides avoids the copy).
    k: results per query.
    mesh: e.g. `jax.make_mesh((8,), ("rows",))`.
    axis: the mesh axis (or axes) the rows are split over.
    metric, scales, valid, method: as in `topk`.
    block_rows: if set and it divides each device's rows, each device scans its rows in blocks of
      this many (a loop with a running top-k), so its [Q, rows] scores stay one block's: the
      memory bound for rows resident on an accelerator.

  Returns:
    scores [Q, k] float32 and global ids [Q, k] int32, replicated on every device.
  """
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  parts = math.prod(mesh.shape[a] for a in names)
  n = matrix.shape[0]
  pad = -n % parts
  if pad:
    # Any row count: zero rows, masked out, so the split is even and padding is never returned.
    matrix = jnp.concatenate([jnp.asarray(matrix), jnp.zeros((pad, matrix.shape[1]), matrix.dtype)])
    if scales is not None:
      scales = jnp.concatenate([jnp.asarray(scales, jnp.float32), jnp.zeros(pad, jnp.float32)])
    base = jnp.ones(n, bool) if valid is None else jnp.asarray(valid, bool)
    valid = jnp.concatenate([base, jnp.zeros(pad, bool)])
  row_spec = P(axis, None)
  vec_spec = P(axis)
  args = [jnp.asarray(queries, jnp.float32), matrix]
  specs = [P(), row_spec]
  has_scales, has_valid = scales is not None, valid is not None
  if has_scales:
    args.append(scales)
    specs.append(vec_spec)
  if has_valid:
    args.append(valid)
    specs.append(vec_spec)
  args[1:] = [
    jax.device_put(a, NamedSharding(mesh, sp)) for a, sp in zip(args[1:], specs[1:], strict=True)
  ]

  fn = _sharded_fn(
    mesh,
    axis if isinstance(axis, str) else tuple(axis),
    k,
    metric,
    method,
    has_scales,
    has_valid,
    tuple(specs),
    block_rows,
  )
  return fn(*args)


@functools.lru_cache(maxsize=64)
def _sharded_fn(mesh, axis, k, metric, method, has_scales, has_valid, specs, block_rows):
  def scan_rows(q, m, sc, va):
    n = m.shape[0]
    if not block_rows or n <= block_rows or n % block_rows:
      return topk(q, m, k, metric=metric, scales=sc, valid=va, method=method)
    nb = n // block_rows
    xs = (
      jnp.arange(nb, dtype=jnp.int32),
      m.reshape(nb, block_rows, m.shape[1]),
      None if sc is None else sc.reshape(nb, block_rows),
      None if va is None else va.reshape(nb, block_rows),
    )

    def step(best, x):
      j, mb, scb, vab = x
      s, i = topk(q, mb, k, metric=metric, scales=scb, valid=vab, method=method)
      i = jnp.where(i >= 0, i + j * block_rows, -1)
      return merge_topk(*best, s, i, k), None

    best, _ = lax.scan(step, empty_topk(q.shape[0], k), xs)
    return best

  def local(q, m, *rest):
    rest = list(rest)
    sc = rest.pop(0) if has_scales else None
    va = rest.pop(0) if has_valid else None
    s, i = scan_rows(q, m, sc, va)
    i = jnp.where(i >= 0, i + lax.axis_index(axis) * m.shape[0], -1)
    all_s = lax.all_gather(s, axis, axis=1, tiled=True)
    all_i = lax.all_gather(i, axis, axis=1, tiled=True)
    v, j = lax.top_k(all_s, k)
    return v, jnp.take_along_axis(all_i, j, axis=1)

  return jax.jit(
    jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()), check_vma=False)
  )
