"""The write half of an Index: the commit protocol of `add`, `delete`, `compact` and file stats.

Each commit writes new segment files, then one catalog transaction, then the manifest (the commit
point); any failure on the way reloads the last committed state, which undoes the leftovers. The
module docstring of engine/store/index.py describes the protocol and its recovery.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from engine.store import catalog as catalog_lib
from engine.store import manifest as manifest_lib
from engine.store import segments as seg_lib
from engine.store import statistics as stats_lib
from engine.store.catalog import FileStat
from engine.store.errors import IndexReadOnlyError, StoreError
from engine.store.segments import Segment


class Commits:
  """Mixed into `Index`: every method that changes the index."""

  def _check_writable(self) -> None:
    if self._closed:
      raise StoreError(f"index {self.path} is closed")
    if self.readonly:
      raise IndexReadOnlyError(f"index {self.path} was opened readonly")

  @contextlib.contextmanager
  def _commit(self):
    """Guards one commit: writable, catalog errors named, and on any failure the last committed
    state reloaded (which undoes the leftovers)."""
    self._check_writable()
    try:
      with self._catalog.errors():
        yield
    except BaseException:
      with contextlib.suppress(Exception):
        self._load(verify=False)
      raise

  def _new_segment_name(self) -> str:
    n = self._manifest["next_segment"]
    self._manifest["next_segment"] = n + 1
    return seg_lib.segment_name(n)

  def _commit_manifest(
    self, new_segments: list[dict], drop: Iterable[str] = (), extra: Mapping | None = None
  ) -> None:
    m = dict(self._manifest)
    m.update(extra or {})
    drop = set(drop)
    kept = [s for s in m["segments"] if s["name"] not in drop]
    # Replacements take the place of the (contiguous) segments they replace: storage order holds.
    at = next((i for i, s in enumerate(m["segments"]) if s["name"] in drop), len(m["segments"]))
    m["segments"] = kept[:at] + new_segments + kept[at:]
    m["generation"] = self._manifest["generation"] + 1
    manifest_lib.write(self.path, m)
    self._manifest = m

  def add(
    self,
    vectors: np.ndarray,
    keys: Sequence[str],
    files: Sequence[FileStat | None] | None = None,
  ) -> None:
    """Adds vectors under keys; committed (durable) on return. Re-adding a key replaces it.

    Args:
      vectors: [N, dim] float, finite.
      keys: N distinct str keys.
      files: optional N FileStat (or None) describing each key's source file.
    """
    x = np.asarray(vectors, dtype=np.float32)
    keys = [str(k) for k in keys]
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"vectors must be [N, {self.dim}], got {x.shape}")
    if x.shape[0] != len(keys):
      raise ValueError(f"{x.shape[0]} vectors but {len(keys)} keys")
    if files is not None and len(files) != len(keys):
      raise ValueError(f"{len(files)} file stats but {len(keys)} keys")
    if len(set(keys)) != len(keys):
      raise ValueError("duplicate keys in one add() call")
    if not np.isfinite(x).all():
      raise ValueError("vectors contain inf or nan")
    try:
      [k.encode("utf-8", "surrogateescape") for k in keys]
    except UnicodeEncodeError as e:
      raise ValueError(f"key {e.object!r} is not valid text") from None
    if self.normalizes:
      x = seg_lib.normalize_rows(x)
    seg_lib.check_representable(x, self.dtype)
    if not keys:
      return
    self._merge_tiers()
    with self._commit():
      self._add(x, keys, files or [None] * len(keys))

  def _add(self, x: np.ndarray, keys: list[str], stats: Sequence[FileStat | None]) -> None:
    name = self._new_segment_name()
    files = seg_lib.write_segment(self.path, name, x, self.dtype, self.keep_float32)
    gen = self.generation + 1
    live = self.live_rows()
    replaced = [live[k] for k in keys if k in live]
    rows = [
      (catalog_lib.db_key(k), name, i, *((st.sha256, st.size, st.mtime_ns) if st else (None,) * 3))
      + (gen,)
      for i, (k, st) in enumerate(zip(keys, stats, strict=True))
    ]
    self._catalog.commit_rows(rows, self._seg_rows(replaced), gen)
    entry = {"name": name, "rows": len(keys), "files": files}
    entry["keys_sha256"] = catalog_lib.keys_digest(keys)
    self._commit_manifest([entry])
    self._mark_deleted(replaced)
    base = sum(sg.rows for sg in self._segments)
    seg = seg_lib.open_segment(
      self.path,
      entry,
      self.dtype,
      self.dim,
      base=base,
      keys=np.array(keys, dtype=object),
      deleted=np.zeros(len(keys), bool),
      verify=False,
    )
    self._segments.append(seg)
    if self._key_rows is not None:
      self._key_rows.update(zip(keys, range(base, base + len(keys)), strict=True))

  def _mark_deleted(self, grows: Iterable[int]) -> None:
    for g in grows:
      seg, row = self._segment_row(g)
      seg.deleted[row] = True
      if self._key_rows is not None:
        self._key_rows.pop(seg.keys[row], None)

  def _seg_rows(self, grows: Iterable[int]) -> list[tuple[str, int]]:
    out = []
    for g in grows:
      seg, row = self._segment_row(g)
      out.append((seg.name, row))
    return out

  def delete(self, keys: Iterable[str]) -> int:
    """Tombstones live keys (absent keys are ignored); committed on return. Returns the count."""
    self._check_writable()
    keys = set(keys)
    if not any(k in self.live_rows() for k in keys):
      return 0
    self._merge_tiers()
    live = self.live_rows()  # after the merge: it renumbers rows
    grows = sorted({live[k] for k in keys if k in live})
    with self._commit():
      self._catalog.commit_rows([], self._seg_rows(grows), self.generation + 1)
      self._commit_manifest([])
      self._mark_deleted(grows)
    return len(grows)

  def compact(self, max_segment_rows: int = 1 << 20) -> None:
    """Rewrites all segments without tombstones (and merges small ones); committed on return.

    The stored bytes (vectors, scales, float32 copy) are streamed from the old segments in chunks,
    never re-quantised, so results are unchanged and memory stays at one chunk.
    """
    with self._commit():
      if self._segments:
        self._rewrite(list(self._segments), max_segment_rows)

  def _merge_tiers(self) -> None:
    """Size-tiered merging (`segments.merge_run`), run before each add and delete: each merge is a
    commit of its own, so the segment count stays logarithmic in the index size whatever the commit
    sizes, and a failed merge fails the call before anything of it is committed."""
    with self._commit():
      while run := seg_lib.merge_run(self._segments):
        self._rewrite(self._segments[run[0] : run[1]], 1 << 62)

  def _rewrite(self, old: list[Segment], max_segment_rows: int) -> None:
    """Replaces contiguous segments `old` by new ones holding their live rows, in order."""
    old_names = [s.name for s in old]
    gen = self.generation + 1
    new_segments, inserts = [], []
    for plan in seg_lib.compaction_plan(old, max_segment_rows):
      n = sum(rows.size for _, rows in plan)
      name = self._new_segment_name()
      files = {}
      for role, suffix in seg_lib.SUFFIXES.items():
        if role in plan[0][0].files:
          dtype, shape = seg_lib.expected(role, self.dtype, n, self.dim)
          path = os.path.join(self.path, name + suffix)
          parts = seg_lib.stored_parts(plan, role)
          files[role] = seg_lib.write_npy_parts(path, dtype, shape[1:], n, parts)
      keys = []
      for seg, rows in plan:
        stats = self._catalog.segment_stats(seg.name)
        for r in rows.tolist():
          inserts.append((catalog_lib.db_key(seg.keys[r]), name, len(keys), *stats[r], gen))
          keys.append(seg.keys[r])
      new_segments.append(
        {"name": name, "rows": n, "files": files, "keys_sha256": catalog_lib.keys_digest(keys)}
      )
    # Old rows stay (stamped deleted) until the manifest commits; then they are garbage.
    self._catalog.commit_rows(inserts, [], gen, tombstone_segments=old_names)
    self._commit_manifest(new_segments, drop=old_names)
    # Post-commit garbage collection: drop old rows and files (also redone on any writer open).
    self._segments = []
    self._load(verify=False)

  def learn_statistics(self, policy: str | None = None) -> dict | None:
    """Learns collection statistics from the live rows and commits them; returns their record.

    Searches then score with them (engine/store/statistics.py); rows added later are scored with
    the same set until the next call. The stored rows are not touched: only a small statistics file
    and the manifest are written (the old file is removed after the commit).

    Args:
      policy: "center" (the mean of the unit rows), "whiten[:DIM]" (mean and PCA whitening to DIM
        dimensions, default all the rows support), or "none" (drop the statistics). None: the
        index's recorded `statistics_policy`. The policy is recorded for later re-learning.

    Raises:
      ValueError: a bad policy, a non-normalising index, fewer than 2 live rows, or a whitening
        dim the live rows cannot support.
    """
    self._check_writable()
    spec = (self.statistics_policy if policy is None else policy).strip()
    parsed = stats_lib.parse_policy(spec)
    if parsed is not None and not self.normalizes:
      raise ValueError("collection statistics need a normalising index (normalize=True)")
    old = self._manifest.get("statistics")
    extra: dict = {"statistics_policy": spec, "statistics": None}
    if parsed is not None:
      kind, dim = parsed
      chunks = (seg_lib.normalize_rows(x) for _, x in self.iter_chunks())
      mean, proj_t, rows = stats_lib.learn(chunks, kind, dim)
    with self._commit():
      if parsed is not None:
        gen = self.generation + 1
        entry = stats_lib.write(self.path, stats_lib.file_name(gen), mean, proj_t)
        out_dim = self.dim if proj_t is None else int(proj_t.shape[0])
        entry.update(kind=kind, dim=out_dim, rows=rows, learned_at=gen)
        extra["statistics"] = entry
      self._commit_manifest([], extra=extra)
      entry = self._manifest["statistics"]
      self._stats = None if entry is None else stats_lib.load(self.path, entry, self.dim)
    if old is not None and (entry is None or entry["file"] != old["file"]):
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(self.path, old["file"]))
    return None if entry is None else dict(entry)

  def set_statistics_policy(self, policy: str) -> None:
    """Records the statistics policy ("none", "center", "whiten[:DIM]") without learning."""
    spec = policy.strip()
    stats_lib.parse_policy(spec)
    with self._commit():
      self._commit_manifest([], extra={"statistics_policy": spec})

  def update_file_stats(self, stats: Mapping[str, FileStat]) -> int:
    """Replaces the stored FileStat of live keys (e.g. a touched but unchanged file).

    Only the catalog changes (one transaction, durable on return; vectors and manifest are
    untouched), so readers may see it at once. Absent keys are ignored. Returns the count updated.
    """
    with self._commit():
      live = self.live_rows()
      todo = []
      for key, st in stats.items():
        if key in live:
          seg, row = self._segment_row(live[key])
          todo.append((st.sha256, st.size, st.mtime_ns, seg.name, row))
      if todo:
        self._catalog.update_stats(todo)
    return len(todo)
