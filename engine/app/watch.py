"""Keeping an index up to date with a folder as files appear, change or vanish
(`engine.index --watch`).

File-system events (watchdog: inotify, FSEvents, ReadDirectoryChangesW, or polling) only say
*when* to look: each pass is the incremental `indexing.index_folder` with pruning, which re-walks
the folder and extracts only what is new or changed, in commits of `commit_every` images. So a
burst of events costs one pass, events that arrive during a pass cause one more, and a periodic
rescan catches what a file system did not report (network mounts).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from engine.app import indexing
from engine.common.errors import UserError
from engine.features.extractor import Extractor

# Events that change nothing on disk.
_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


class _Changes:
  """A watchdog event handler: sets `changed` on every event that may change the folder's images,
  except the index's own writes (an index kept inside the folder it indexes)."""

  def __init__(self, index_path: str):
    self.changed = threading.Event()
    self._own = os.path.realpath(index_path) + os.sep

  def _ours(self, path: str | bytes) -> bool:
    path = os.fsdecode(path)
    return os.path.realpath(path).startswith(self._own) or path.startswith(self._own)

  def dispatch(self, event) -> None:
    if event.event_type in _READ_ONLY_EVENTS or event.is_synthetic:
      return
    paths = [event.src_path, getattr(event, "dest_path", "") or event.src_path]
    if all(self._ours(p) for p in paths):
      return
    self.changed.set()


def watch_folder(
  root: str,
  index_path: str,
  extractor: Extractor,
  *,
  commit_every: int = 256,
  settle_s: float = 1.0,
  rescan_s: float = 300.0,
  poll: bool = False,
  on_pass: Callable[[indexing.IndexReport], None] | None = None,
  stop: threading.Event | None = None,
) -> None:
  """Indexes `root` now, then again after each change, until interrupted or `stop` is set.

  Args:
    root: the image folder (recursive).
    index_path: the index folder, created on first use.
    extractor: the index's extractor.
    commit_every: images per commit.
    settle_s: a pass starts once no event came for this long (a file being copied is not read
      half-written, and a burst of events costs one pass).
    rescan_s: a pass also runs after this long without events.
    poll: poll the folder instead of the platform's notifications.
    on_pass: called with each pass's report.
    stop: ends the loop after the pass in progress (tests, embedding applications).

  Raises:
    UserError: `root` is not a folder, or watchdog is not installed.
  """
  if not os.path.isdir(root):
    raise UserError(f"--watch needs a folder, and {root} is not one")
  try:
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver
  except ImportError:
    raise UserError("watching a folder needs watchdog: pip install -e .[watch]") from None
  changes = _Changes(index_path)
  observer = PollingObserver(timeout=settle_s) if poll else Observer()
  observer.schedule(changes, root, recursive=True)
  observer.start()
  stop = stop or threading.Event()
  try:
    while not stop.is_set():
      changes.changed.clear()  # what changes during the pass brings another one
      report = indexing.index_folder(
        root, index_path, extractor, prune=True, commit_every=commit_every, progress=False
      )
      if on_pass is not None:
        on_pass(report)
      waited = 0.0
      while not changes.changed.is_set() and waited < rescan_s and not stop.is_set():
        changes.changed.wait(min(0.5, settle_s))
        waited += min(0.5, settle_s)
      while changes.changed.is_set() and not stop.is_set():  # until the folder is quiet
        changes.changed.clear()
        stop.wait(settle_s)
  finally:
    observer.stop()
    observer.join()
