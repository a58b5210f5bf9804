"""Indexing a photo folder: incremental, resumable, and honest about what it skipped.

`index_folder` walks a folder, skips files whose size and modification time (or, when those
changed, content hash) match what the index already holds, extracts the rest and commits every
`commit_every` images, so an interrupted run loses at most that much work and the next run
continues where it stopped. Files that cannot be read are skipped with their reason.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from engine import store
from engine.app import walk
from engine.common import textio
from engine.common.errors import UserError
from engine.common.fileio import atomic_write, sha256_file
from engine.features import quantize
from engine.features.extractor import Extractor, check_compatible


@dataclasses.dataclass
class IndexReport:
  """What a run did.

  Attributes:
    indexed: images extracted and committed (new or changed).
    unchanged: images skipped because the index already holds them.
    failed: (path, reason) for every file that could not be indexed.
    pruned: keys removed because their files vanished (with prune=True).
    seconds: wall time of the run.
    statistics: what happened to the collection statistics (None: nothing to do).
    recovered: images an interrupted multi-process run had extracted, added to the index by this
      run before it looked for work (they then count as unchanged).
    merge_seconds: multi-process runs: the time process 0 spent adding the processes' staging
      indexes to the index.
    int8: what the run did about an int8 model (None: nothing; a new index: its calibration).
  """

  indexed: int = 0
  unchanged: int = 0
  failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  pruned: int = 0
  seconds: float = 0.0
  statistics: str | None = None
  recovered: int = 0
  merge_seconds: float = 0.0
  int8: str | None = None

  @property
  def images_per_second(self) -> float:
    return self.indexed / self.seconds if self.seconds > 0 else 0.0

  def summary(self) -> str:
    return (
      f"indexed {self.indexed}, unchanged {self.unchanged}, failed {len(self.failed)}, "
      f"pruned {self.pruned} in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
    )


def stat_of(path: str) -> store.FileStat:
  st = os.stat(path)
  return store.FileStat(sha256=sha256_file(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


class Progress:
  """Count, rate and ETA: a live line on a terminal, a plain log line every few seconds otherwise."""

  def __init__(self, total: int, stream=None, every_s: float = 5.0):
    self.total = total
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.every_s = 0.2 if self.tty else every_s
    self.start = time.monotonic()
    self.last = 0.0
    self.done = 0
    # The rate counts from the first finished image: before it come the model's build and
    # compilation, which would make the first ETAs many times too long.
    self.first: tuple[float, int] | None = None

  def update(self, done: int, force: bool = False) -> None:
    self.done = done
    now = time.monotonic()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    if self.first is None and done > 0:
      self.first = (now, done)
    line = f"{done}/{self.total} images"
    if self.first is not None and done > self.first[1] and now > self.first[0]:
      rate = (done - self.first[1]) / (now - self.first[0])
      line += f", {rate:.1f} images/s, ETA {(self.total - done) / rate:.0f} s"
    elif done < self.total:
      line += ", ETA ?"
    if self.tty:
      self.stream.write(f"\r{line}   ")
      if force:
        self.stream.write("\n")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()


# Re-learn the statistics when the live rows grew or shrank by this factor since they were learned.
RELEARN_FACTOR = 2.0


def refresh_statistics(
  idx: store.Index, policy: str | None = None, force: bool = False
) -> str | None:
  """Keeps an index's collection statistics learned, by its policy; says what it did.

  Learns them when the policy asks for statistics and the index has none, holds another kind or
  whitening dim than the policy, or its live rows grew or shrank by `RELEARN_FACTOR` since they were
  learned (or always, with `force`); a policy of "none" drops them. In between, rows added are
  scored with the statistics in force, so every search of the index uses one consistent set.

  Args:
    idx: an index open for writing.
    policy: "none", "center" or "whiten[:DIM]" to record (None: keep the index's own).
    force: re-learn even when nothing above asks for it.

  Returns:
    A line for the user, or None when nothing changed.
  """
  spec = (idx.statistics_policy if policy is None else policy).strip()
  try:
    parsed = store.parse_policy(spec)
  except (TypeError, ValueError) as e:
    raise UserError(f"--statistics: {e}") from None
  info = idx.statistics_info
  if parsed is None:
    if info is None and idx.statistics_policy == spec:
      return None
    idx.learn_statistics("none")
    return "statistics: none (raw cosine scores)"
  kind, dim = parsed
  n = len(idx)
  if n < 2:
    return f"statistics: {spec} recorded; learned once the index holds 2 images"
  if kind == "whiten" and dim is not None and dim > min(n - 1, idx.dim):
    spec_now = "center"  # too few rows for DIM components yet: centre until there are enough
  else:
    spec_now = spec
  stale = (
    force
    or info is None
    or idx.statistics_policy != spec
    or info["kind"] != spec_now.partition(":")[0]
    or (spec_now.startswith("whiten:") and info["dim"] != dim)
    or n >= RELEARN_FACTOR * info["rows"]
    or n * RELEARN_FACTOR <= info["rows"]
  )
  if not stale:
    return None
  info = _learn(idx, spec, spec_now)
  note = "" if spec_now == spec else f" (whitening to {dim} needs more than {dim} images)"
  return (
    f"statistics: {info['kind']} to {info['dim']} dims, learned from {info['rows']} images "
    f"(id {info['sha256'][:12]}){note}"
  )


def _learn(idx: store.Index, policy: str, learn_now: str) -> dict:
  """Learns `learn_now` and records `policy` (they differ while whitening lacks rows)."""
  info = idx.learn_statistics(learn_now)
  if learn_now != policy:
    idx.set_statistics_policy(policy)
  return info


def open_or_create(
  path: str, extractor: Extractor, dtype: str | None = None, statistics: str | None = None
) -> store.Index:
  """Opens the index at `path` for writing, refusing one built with a different extractor or
  stored in another dtype than `dtype` (None: whatever it stores; "int8" for a new index); a new
  index records the `statistics` policy (None: "none")."""
  if store.exists(path):
    idx = store.Index.open(path)
    try:
      check_compatible(idx.metadata, extractor)
      if dtype is not None and dtype != idx.dtype:
        raise UserError(
          f"the index at {path} stores {idx.dtype} vectors; dtype {dtype} applies to a new index "
          "only (leave it out to add to this one)"
        )
    except BaseException:
      idx.close()
      raise
    return idx
  if statistics is not None:
    try:
      store.parse_policy(statistics)
    except (TypeError, ValueError) as e:
      raise UserError(f"--statistics: {e}") from None
  if extractor.precision == "int8" and extractor.quantized is None:
    raise UserError(f"a new int8 index at {path} needs a calibrated extractor (ensure_int8_model)")
  placed = []
  if extractor.quantized is not None:
    # Before the manifest: an index never names an int8 model it does not hold.
    placed = quantize.save(extractor.quantized, path)
  return store.Index.create(
    path,
    dim=extractor.dim,
    dtype=dtype or "int8",
    metadata=extractor.index_metadata(),
    statistics=statistics or "none",
    placed=placed,
  )


def ensure_int8_model(
  extractor: Extractor, index_path: str, paths: list[str], sample: int = quantize.DEFAULT_SAMPLE
) -> str | None:
  """Gives an int8 extractor without a model the one it must run: the index's own, or for a new
  index one calibrated on `sample` of `paths` (the images this run will index). Returns a line
  for the user about a new calibration, else None."""
  if extractor.precision != "int8" or extractor.quantized is not None:
    return None
  if store.exists(index_path):
    with store.Index.open(index_path, readonly=True) as idx:
      meta = idx.metadata
    if meta.get("extractor", {}).get("precision") == "int8" and "int8" in meta:
      extractor.use_quantized(quantize.load(index_path, meta["int8"]))
    return None  # another precision: open_or_create refuses it, naming both
  model = extractor.calibrate(paths, sample)
  used = model.record["calibration"]["sample_used"]
  return (
    f"int8: model {model.sha256[:16]} calibrated on {used} images (of {sample} asked), kept in "
    "the index"
  )


def index_folder(
  root: str,
  index_path: str,
  extractor: Extractor,
  *,
  dtype: str | None = None,
  prune: bool = False,
  commit_every: int = 256,
  report_path: str | None = None,
  progress: bool = True,
  on_commit: Callable[[int], None] | None = None,
  statistics: str | None = None,
  relearn_statistics: bool = False,
  calibration_images: int = quantize.DEFAULT_SAMPLE,
) -> IndexReport:
  """Brings the index at `index_path` up to date with the images under `root`.

  Args:
    root: image folder (recursive) or a single file.
    index_path: index folder, created on first use.
    extractor: must match the one the index was built with.
    dtype: storage dtype: of a new index ("int8" if None); an existing one must store this.
    prune: tombstone indexed files under `root` that no longer exist.
    commit_every: images per commit (the most work an interruption can lose).
    report_path: where to write the failures (path<TAB>reason, `textio.encode`d); default
      `index_path/last_run_failures.tsv`.
    progress: show progress on stderr.
    on_commit: called with the number of images committed so far (tests use it).
    statistics: collection statistics policy, "none", "center" or "whiten[:DIM]", recorded in the
      index (None: keep the index's; "none" for a new one); see `refresh_statistics`, run at the
      end of every run.
    relearn_statistics: re-learn them even if the collection did not grow or shrink enough.
    calibration_images: a new index of an int8 extractor without a model: how many of the
      images found (evenly spaced over their sorted paths) calibrate its quantisation.

  Returns:
    An IndexReport. Interruptions (KeyboardInterrupt) commit what is pending first.
  """
  t0 = time.monotonic()
  report = IndexReport()
  root_abs = os.path.abspath(root)
  found = list(walk.find_images(root_abs))
  report.int8 = ensure_int8_model(
    extractor, index_path, [f.path for f in found if not f.error], calibration_images
  )
  idx = open_or_create(index_path, extractor, dtype, statistics)
  try:
    todo, known, restat = plan(idx, found, report)
    if restat:
      idx.update_file_stats(dict(restat))
    stale = extract_into(
      idx, todo, known, extractor, report, commit_every, progress=progress, on_commit=on_commit
    )
    if stale:
      idx.delete(stale)
    if prune:
      report.pruned = prune_vanished(idx, root_abs, found)
    report.statistics = refresh_statistics(idx, statistics, relearn_statistics)
  finally:
    idx.close()
    report.seconds = time.monotonic() - t0
    write_failures(report_path or os.path.join(index_path, "last_run_failures.tsv"), report.failed)
  return report


def write_failures(path: str, failed: list[tuple[str, str]]) -> None:
  """Writes the failures file (path<TAB>reason, one line per file); a write error is not fatal."""
  data = textio.encode([[p, r] for p, r in failed])  # one line per file, always
  try:
    atomic_write(path, lambda f: f.write(data))
  except OSError:
    pass


def plan(
  idx: store.Index, found: list[walk.Found], report: IndexReport
) -> tuple[list[str], dict[str, store.FileStat], list[tuple[str, store.FileStat]]]:
  """What a run must do about the files `found`, given what `idx` holds.

  Counts unreadable and unchanged files in `report`. Returns (todo: paths to extract, in walk
  order; known: the new identity of each changed file in todo; restat: files whose size or time
  changed but not their content, with their new identity).
  """
  todo: list[str] = []
  known: dict[str, store.FileStat] = {}
  restat: list[tuple[str, store.FileStat]] = []
  for item in found:
    if item.error:
      report.failed.append((item.path, item.error))
      continue
    old = idx.get_file_stat(item.path)
    if old is None:
      todo.append(item.path)
      continue
    try:
      st = os.stat(item.path)
    except OSError as e:
      report.failed.append((item.path, f"cannot stat: {e.strerror}"))
      continue
    if st.st_size == old.size and st.st_mtime_ns == old.mtime_ns:
      report.unchanged += 1
      continue
    new = stat_of(item.path)
    if new.sha256 == old.sha256:
      restat.append((item.path, new))
      report.unchanged += 1
    else:
      known[item.path] = new
      todo.append(item.path)
  return todo, known, restat


def extract_into(
  idx: store.Index,
  todo: list[str],
  known: dict[str, store.FileStat],
  extractor: Extractor,
  report: IndexReport,
  commit_every: int,
  *,
  progress: bool = True,
  on_commit: Callable[[int], None] | None = None,
) -> list[str]:
  """Extracts `todo` into `idx`, committing every `commit_every` images (and what is pending on
  KeyboardInterrupt); counts them and the failures in `report`.

  Returns:
    The changed files (in `known`) that no longer decode: their old rows are wrong now.
  """
  meter = Progress(len(todo)) if progress and todo else None
  pending_vecs: list[np.ndarray] = []
  pending_keys: list[str] = []
  pending_stats: list[store.FileStat] = []

  def commit():
    if not pending_keys:
      return
    idx.add(np.stack(pending_vecs), list(pending_keys), files=list(pending_stats))
    report.indexed += len(pending_keys)
    pending_vecs.clear()
    pending_keys.clear()
    pending_stats.clear()
    if on_commit:
      on_commit(report.indexed)

  stale: list[str] = []
  done = 0
  try:
    for pos, feat, err in extractor.iter_paths(todo):
      path = todo[pos]
      done += 1
      if feat is None:
        report.failed.append((path, err))
        if path in known:
          stale.append(path)
      else:
        try:
          st = known.get(path) or stat_of(path)
        except OSError as e:
          report.failed.append((path, f"cannot read: {e.strerror}"))
          continue
        pending_vecs.append(feat)
        pending_keys.append(path)
        pending_stats.append(st)
        if len(pending_keys) >= commit_every:
          commit()
      if meter:
        meter.update(done)
    commit()
  except KeyboardInterrupt:
    commit()
    raise
  if meter:
    meter.update(done, force=True)
  return stale


def prune_vanished(idx: store.Index, root_abs: str, found: list[walk.Found]) -> int:
  """Tombstones indexed keys under `root_abs` whose files vanished; returns how many."""
  present = {item.path for item in found}
  prefix = root_abs.rstrip(os.sep) + os.sep
  gone = [k for k in idx.keys() if (k == root_abs or k.startswith(prefix)) and k not in present]
  gone = [k for k in gone if not os.path.exists(k)]
  if gone:
    idx.delete(gone)
  return len(gone)
