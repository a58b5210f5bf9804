"""Indexing one folder with several processes (hosts) of a `jax.distributed` run.

The index keeps one writer: process 0 holds its lock for the whole run (so a plain second writer
is still refused), and the other processes only read it. Each process extracts a deterministic
share of the files to index into a private *staging index* of its own, `INDEX/.staging/P-of-N/`: a
normal crash-safe `store.Index` holding the extractor's raw float32 vectors (not normalised) and
the files' identities. After a barrier, process 0 adds every staging index's rows to the index
through the ordinary writer API (a commit per chunk) and removes the staging folders; then it
deletes, prunes, refreshes the collection statistics and writes the failures file of all the
processes.

Steps, in order, every one a collective of all processes:

1. process 0 opens (or creates) the index for writing and folds in the staging indexes any
   interrupted run left (whatever number of processes it had): their committed rows are never
   extracted again; the outcome (or process 0's error) goes to every process;
2. every process walks the folder and decides what is new or changed against the index (the walk
   is deterministic), and the processes check that they hold the same list (its sha256);
3. process p of N extracts the files at positions p, p + N, p + 2N, ... of that list into its
   staging index, committing every `commit_every` images;
4. the processes exchange their failures; process 0 folds the staging indexes in and finishes.

A process that dies loses at most `commit_every` images of its share: the others wait at the next
collective until JAX's coordination service gives up on it (or they are stopped), and the next run
of all the processes folds in what every staging index committed before going on. Re-adding a key
replaces it, so folding a staging index twice (a crash between the fold and the removal) neither
loses nor duplicates rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time

from engine import store
from engine.app import distributed, indexing, walk
from engine.common.errors import UserError
from engine.features.extractor import Extractor, check_compatible

STAGING = ".staging"
_NAME_RE = re.compile(r"^(\d+)-of-(\d+)$")
# Rows per commit when process 0 folds a staging index into the index.
FOLD_ROWS = 4096


def staging_path(index_path: str, process_id: int, num_processes: int) -> str:
  return os.path.join(index_path, STAGING, f"{process_id}-of-{num_processes}")


def _remove(path: str) -> None:
  """Removes a staging folder: renamed away first (atomic), so a crash never leaves half of one
  under a name the next run would fold."""
  trash = os.path.join(os.path.dirname(path), f"trash-{os.path.basename(path)}-{os.getpid()}")
  os.rename(path, trash)
  shutil.rmtree(trash, ignore_errors=True)


def fold_staging(idx: store.Index, extractor: Extractor) -> int:
  """Adds the rows of every staging index under `idx` to it and removes them; returns the rows."""
  folder = os.path.join(idx.path, STAGING)
  if not os.path.isdir(folder):
    return 0
  total = 0
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not _NAME_RE.match(name) or not store.exists(path):
      # Debris of a removal, or a staging index that crashed before its first manifest.
      shutil.rmtree(path, ignore_errors=True)
      continue
    with store.Index.open(path) as staged:  # a writer open: undoes its interrupted commit
      try:
        check_compatible(staged.metadata, extractor)
      except UserError as e:
        raise UserError(
          f"the staging index {path} of an interrupted run was built differently ({e}); remove "
          "it to start its share over"
        ) from None
      if staged.dim != idx.dim:
        raise UserError(f"the staging index {path} holds {staged.dim}-d vectors, not {idx.dim}")
      for keys, x in staged.iter_chunks(FOLD_ROWS):
        idx.add(x, keys, files=[staged.get_file_stat(k) for k in keys])
        total += len(keys)
    _remove(path)
  try:
    os.rmdir(folder)
  except OSError:
    pass
  return total


def _digest(todo: list[str], known: dict[str, store.FileStat]) -> str:
  blob = json.dumps([todo, sorted(known)]).encode()
  return hashlib.sha256(blob).hexdigest()


def _text(error: BaseException | None) -> str | None:
  if error is None:
    return None
  if isinstance(error, OSError) and not isinstance(error, UserError):
    return f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")
  return str(error)


def _outcome(cluster: distributed.Cluster, error: BaseException | None, what: str) -> None:
  """Every process learns whether process 0's step `what` failed; the others then fail too."""
  message = _text(error)
  first = distributed.gather_json(cluster, message)[0]
  if error is not None:
    raise error
  if first is not None:
    raise distributed.DistributedError(f"process 0 failed to {what}: {first}")


def index_folder(
  root: str,
  index_path: str,
  extractor: Extractor,
  cluster: distributed.Cluster,
  *,
  dtype: str | None = None,
  prune: bool = False,
  commit_every: int = 256,
  report_path: str | None = None,
  progress: bool = True,
  statistics: str | None = None,
  relearn_statistics: bool = False,
) -> indexing.IndexReport:
  """`indexing.index_folder` run by every process of `cluster`; see the module docstring.

  Returns:
    On process 0, the report of the whole run (indexed: images every process extracted;
    recovered: those of an interrupted run's staging indexes; failed: every process's failures).
    On the others, what that process did of its share.
  """
  if extractor.precision == "int8" and extractor.quantized is None:
    # Every process must run the one model process 0 would calibrate.
    raise UserError(
      "a new int8 index is calibrated by a one-process run: index (part of) the folder once "
      "without the distributed flags, then run them; they use the index's int8 model"
    )
  t0 = time.monotonic()
  p, n = cluster.process_id, cluster.num_processes
  report = indexing.IndexReport()
  root_abs = os.path.abspath(root)
  idx: store.Index | None = None
  error: BaseException | None = None
  if p == 0:
    try:
      idx = indexing.open_or_create(index_path, extractor, dtype, statistics)
      report.recovered = fold_staging(idx, extractor)
    except (UserError, OSError) as e:
      error = e
      if idx is not None:
        idx.close()
  _outcome(cluster, error, f"open the index {index_path}")
  try:
    if idx is None:
      idx = store.Index.open(index_path, readonly=True)
    found = list(walk.find_images(root_abs))
    todo, known, restat = indexing.plan(idx, found, report)
    distributed.agree(cluster, {"files to index (sha256 of their list)": _digest(todo, known)})
    if p == 0 and restat:
      idx.update_file_stats(dict(restat))
    share = todo[p::n]
    failed_before = len(report.failed)
    stale: list[str] = []
    error = None
    try:
      if share:
        with store.Index.create(
          staging_path(index_path, p, n),
          dim=extractor.dim,
          dtype="float32",
          metadata=extractor.index_metadata(),
          normalize=False,
        ) as staged:
          own = indexing.IndexReport()
          try:
            stale = indexing.extract_into(
              staged, share, known, extractor, own, commit_every, progress=progress and p == 0
            )
          finally:
            report.failed.extend(own.failed)
            report.indexed = own.indexed
    except (UserError, OSError) as e:  # the others learn it at the next step instead of waiting
      error = e
    mine = {"failed": report.failed[failed_before:], "stale": stale, "error": _text(error)}
    if p == 0:
      mine["failed"] = report.failed  # the walk's failures, counted once
    everyone = distributed.gather_json(cluster, mine)  # the barrier: every share is committed
    if error is not None:
      raise error
    broken = [(q, e["error"]) for q, e in enumerate(everyone) if e["error"] is not None]
    if broken:
      q, message = broken[0]
      raise distributed.DistributedError(
        f"process {q} failed to index its share: {message} (what every process committed is "
        "kept: run again to finish)"
      )
    if p != 0:
      return report
    report.failed = [tuple(f) for e in everyone for f in e["failed"]]
    t_merge = time.monotonic()
    report.indexed = fold_staging(idx, extractor)
    report.merge_seconds = time.monotonic() - t_merge
    stale = [k for e in everyone for k in e["stale"]]
    if stale:
      idx.delete(stale)
    if prune:
      report.pruned = indexing.prune_vanished(idx, root_abs, found)
    report.statistics = indexing.refresh_statistics(idx, statistics, relearn_statistics)
  finally:
    if idx is not None:
      idx.close()
    report.seconds = time.monotonic() - t0
  indexing.write_failures(
    report_path or os.path.join(index_path, "last_run_failures.tsv"), report.failed
  )
  return report
