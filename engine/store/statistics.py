"""Collection statistics of an index: centering and PCA whitening learned from its own rows.

Random-weight (and, less so, ImageNet) descriptors of one collection share a large common
component: cosines between unrelated photos sit near 1 and near-duplicate thresholds mean little.
Subtracting the collection mean (and whitening) before the cosine removes it. The stored rows are
never rewritten: for a unit stored row x, the mean mu and a projection P ([D, D'], identity for
plain centering), the statistics score is

  cos(P^T (q - mu), P^T (x - mu)) = (q~ . x - q~ . mu) * r(x),   q~ = P P^T (q - mu) / |P^T (q - mu)|,
                                                                 r(x) = 1 / |P^T (x - mu)|,

a per-query vector q~ and bias q~ . mu, and a per-row factor r(x): the kernels scan the raw rows
with their scales multiplied by r(x) and the rank-one term -(q~ . mu) r(x) added. So statistics can
be re-learned as the collection grows (a new small file and a manifest commit), and rows added
after learning are scored with the statistics in force, like every other row.

The statistics live in one `.npy` file ([1 + D', D] float32: the mean, then P^T), written
atomically and named in the manifest with its sha256, which is also the statistics' identity
(`Statistics.id`): a caller holding queries prepared for one set can insist on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from collections.abc import Iterable

import numpy as np

from engine.common import fileio
from engine.store.errors import IndexCorruptError

KINDS = ("center", "whiten")
FILE_RE = re.compile(r"^stats-\d{6,}\.npy$")
# fileio.atomic_write's temporary names for the files above.
TEMP_RE = re.compile(r"^\.stats-\d{6,}\.npy\.[A-Za-z0-9_]{8}\.tmp$")
_EPS = 1e-6
_SHRINKAGE = 1e-5  # as engine.features.descriptors.Whitening: relative to the largest eigenvalue


def file_name(generation: int) -> str:
  return f"stats-{int(generation):06d}.npy"


def is_stats_file(fname: str) -> bool:
  """Whether `fname` is a name this engine gives a statistics file or its temporary."""
  return bool(FILE_RE.match(fname) or TEMP_RE.match(fname))


def parse_policy(spec: str) -> tuple[str, int | None] | None:
  """ "none" -> None, "center" -> ("center", None), "whiten:DIM" / "whiten" -> ("whiten", DIM)."""
  if not isinstance(spec, str):
    raise TypeError(f"statistics policy must be a string, got {spec!r}")
  spec = spec.strip()
  if spec == "none":
    return None
  if spec == "center":
    return "center", None
  if spec == "whiten" or spec.startswith("whiten:"):
    _, _, dim = spec.partition(":")
    if not dim:
      return "whiten", None
    if not dim.isdigit() or int(dim) <= 0:
      raise ValueError(f"whitening dim must be a positive integer, got {dim!r} in {spec!r}")
    return "whiten", int(dim)
  raise ValueError(f"statistics must be none, center or whiten[:DIM], got {spec!r}")


@dataclasses.dataclass(frozen=True)
class Statistics:
  """Mean (and projection) of an index's rows.

  Attributes:
    kind: "center" or "whiten".
    mean: [D] float32, the mean of the unit rows.
    projection_t: [D', D] float32 (P^T, whitening scaled), or None for centering.
    id: sha256 of the statistics file's bytes.
  """

  kind: str
  mean: np.ndarray
  projection_t: np.ndarray | None
  id: str

  @property
  def dim(self) -> int:
    return int(self.mean.shape[0])

  @property
  def out_dim(self) -> int:
    return self.dim if self.projection_t is None else int(self.projection_t.shape[0])

  def to_bytes(self) -> bytes:
    return _encode(self.mean, self.projection_t)

  def transform(self, x_nd: np.ndarray) -> np.ndarray:
    """[N, D] unit rows -> [N, D'] float64 P^T (x - mu) (not normalised)."""
    y = np.asarray(x_nd, np.float64) - self.mean.astype(np.float64)
    if self.projection_t is not None:
      y = y @ self.projection_t.astype(np.float64).T
    return y

  def prepare_queries(self, q_qd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit queries [Q, D] -> (q~ [Q, D] float32, bias [Q] float32 = q~ . mu), see the module doc.

    A query equal to the mean has no direction: its q~ is zero and it scores 0 everywhere.
    """
    y = self.transform(q_qd)
    n = np.linalg.norm(y, axis=1, keepdims=True)
    y = y / np.where(n > _EPS, n, np.inf)
    if self.projection_t is not None:
      y = y @ self.projection_t.astype(np.float64)
    return y.astype(np.float32), (y @ self.mean.astype(np.float64)).astype(np.float32)

  def row_factors(self, x_nd: np.ndarray, norms_n: np.ndarray | None = None) -> np.ndarray:
    """[N] float32 r(x) = 1 / |P^T (x / n - mu)| of rows x with norms n (given, or computed; 0 for
    a row at the mean).

    Float32 products (one GEMV, or one GEMM with P), so a segment costs about one pass over its rows:
    r only ranks the kernel's candidates, which are re-scored exactly (`scores`) afterwards.
    """
    x = np.asarray(x_nd, np.float32)
    n = np.linalg.norm(x, axis=1) if norms_n is None else np.asarray(norms_n, np.float64)
    n = np.where(n > 0, n, 1.0)
    mu = self.mean.astype(np.float64)
    if self.projection_t is None:
      # |x/n - mu|^2 = |x|^2/n^2 - 2 x.mu / n + |mu|^2
      xx = np.einsum("ij,ij->i", x, x).astype(np.float64)
      d2 = xx / n**2 - 2.0 * (x @ self.mean).astype(np.float64) / n + mu @ mu
    else:
      y = (x @ self.projection_t.T).astype(np.float64) / n[:, None]
      y -= self.projection_t.astype(np.float64) @ mu
      d2 = np.einsum("ij,ij->i", y, y)
    d = np.sqrt(np.maximum(d2, 0.0))
    return np.where(d > _EPS, 1.0 / np.maximum(d, _EPS), 0.0).astype(np.float32)

  def scores(self, q_qd: np.ndarray, x_qkd: np.ndarray) -> np.ndarray:
    """Exact float64 statistics cosines of unit queries [Q, D] with their unit candidates
    [Q, K, D]: the reference the kernels' scores are re-scored with."""
    qy = self.transform(q_qd)
    qy /= np.maximum(np.linalg.norm(qy, axis=1, keepdims=True), _EPS)
    nq, kk, d = x_qkd.shape
    xy = self.transform(x_qkd.reshape(nq * kk, d)).reshape(nq, kk, -1)
    xn = np.linalg.norm(xy, axis=2)
    dots = np.einsum("qkd,qd->qk", xy, qy)
    return np.where(xn > _EPS, dots / np.maximum(xn, _EPS), 0.0)


def _encode(mean: np.ndarray, projection_t: np.ndarray | None) -> bytes:
  arr = mean[None] if projection_t is None else np.concatenate([mean[None], projection_t])
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(arr, np.float32), allow_pickle=False)
  return buf.getvalue()


def learn(
  chunks: Iterable[np.ndarray], kind: str, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, int]:
  """Streams [n, D] unit rows: (mean [D], P^T [D', D] or None, rows seen); float64 sums, so memory
  stays at one chunk plus a D x D scatter matrix.

  Whitening is `engine.features.descriptors.Whitening.learn`'s: eigenvectors of the covariance
  scaled by 1 / sqrt(eigenvalue + 1e-5 * largest), largest first, `dim` of them (default all
  that the sample supports: min(N - 1, D)).
  """
  if kind not in KINDS:
    raise ValueError(f"statistics kind must be one of {KINDS}, got {kind!r}")
  total, scatter, n = None, None, 0
  for x in chunks:
    x = np.asarray(x, np.float64)
    if total is None:
      total = np.zeros(x.shape[1])
      if kind == "whiten":
        scatter = np.zeros((x.shape[1], x.shape[1]))
    total += x.sum(0)
    if scatter is not None:
      scatter += x.T @ x
    n += x.shape[0]
  if n < 2:
    raise ValueError(f"need at least 2 rows to learn statistics, the index holds {n}")
  mean = total / n
  if kind == "center":
    return mean.astype(np.float32), None, n
  d = mean.shape[0]
  top = min(n - 1, d)
  dim = dim or top
  if not 0 < dim <= top:
    raise ValueError(f"whitening dim must be in 1..{top} for {n} rows of {d} dimensions, got {dim}")
  cov = (scatter - n * np.outer(mean, mean)) / (n - 1)
  eig, vec = np.linalg.eigh(cov)
  order = np.argsort(eig)[::-1][:dim]
  scale = 1.0 / np.sqrt(np.maximum(eig[order], 0) + _SHRINKAGE * max(eig.max(), _EPS))
  return mean.astype(np.float32), (vec[:, order] * scale).T.astype(np.float32), n


def write(folder: str, name: str, mean: np.ndarray, projection_t: np.ndarray | None) -> dict:
  """Writes the statistics file atomically: its manifest entry's file, bytes and sha256."""
  data = _encode(mean, projection_t)
  fileio.atomic_write(os.path.join(folder, name), lambda f: f.write(data))
  return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def check_entry(entry: dict, dim: int) -> None:
  """Validates a manifest's statistics entry (raises ValueError/KeyError/TypeError)."""
  if entry["kind"] not in KINDS or not FILE_RE.match(entry["file"]):
    raise ValueError(f"bad statistics kind or file {entry['kind']!r}, {entry['file']!r}")
  out = int(entry["dim"])
  if not 0 < out <= dim or (entry["kind"] == "center" and out != dim):
    raise ValueError(f"statistics dim {out} does not fit vectors of {dim}")
  if int(entry["rows"]) < 2 or int(entry["bytes"]) <= 0 or int(entry["learned_at"]) < 0:
    raise ValueError("statistics rows, bytes and learned_at must be sane")
  if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
    raise ValueError("statistics sha256 is not a hex digest")


def load(folder: str, entry: dict, dim: int) -> Statistics:
  """Reads the statistics file of a manifest entry, checked byte for byte against its sha256."""
  path = os.path.join(folder, entry["file"])
  try:
    with open(path, "rb") as f:
      data = f.read(int(entry["bytes"]) + 1)
  except FileNotFoundError:
    raise IndexCorruptError(f"statistics file {path} is missing") from None
  if len(data) != int(entry["bytes"]) or hashlib.sha256(data).hexdigest() != entry["sha256"]:
    raise IndexCorruptError(f"statistics file {path} fails its size or sha256 checksum")
  try:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
  except ValueError as e:
    raise IndexCorruptError(f"statistics file {path} is not a plain .npy array: {e}") from None
  out = int(entry["dim"])
  rows = 1 if entry["kind"] == "center" else 1 + out
  if arr.dtype != np.float32 or arr.shape != (rows, dim) or not np.isfinite(arr).all():
    raise IndexCorruptError(
      f"statistics file {path} holds {arr.dtype} {arr.shape}, expected finite float32 "
      f"({rows}, {dim})"
    )
  proj = None if entry["kind"] == "center" else arr[1:]
  return Statistics(entry["kind"], arr[0], proj, entry["sha256"])
