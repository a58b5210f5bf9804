"""Acting on duplicate groups safely: a keeper per group, journaled moves, undo and crash recovery.

Nothing here deletes a photo. `plan` picks each group's keeper (highest resolution, then largest
file, then oldest modification time, then first name; the reason is recorded) and maps every other
member to the same relative path under a destination folder. `apply` moves them one at a time,
each under a journal (one JSON record per line, every line written with one `write` and fsynced):
an `intent` record before the move, a `done` record after it. A move is a hard link of the file to
its destination (refused if something is there: nothing is overwritten) and then the unlink of its
old name; across file systems, a copy to a temporary name, fsynced, linked into place, then the
unlink. Before each move the file's size and mtime are checked against the index, so a file
changed since it was indexed stays where it is.

A process killed in the middle leaves a journal with no `end` record; the next run over the same
destination (`recover`) settles its one move in flight: completed when the destination holds the
file, rolled back (nothing to do) when it never got there. `undo` moves every file of a journal
back, checking each one's sha256 first, under the same records, so an interrupted undo recovers
the same way.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import shutil
import signal
from collections.abc import Callable, Sequence

from PIL import Image

from engine import store
from engine.common import fileio
from engine.common.errors import UserError
from engine.features import images

JOURNAL_VERSION = 1
JOURNAL_PREFIX = "dedup-journal-"
TMP_SUFFIX = ".dedup-partial"
# Crash points, armed only by tests (`kill_at`): after the intent record, after the hard link or
# copy (both names present), after the unlink of the old name (before the done record).
POINTS = ("intent", "linked", "moved")
_hook: Callable[[str], None] | None = None


class MoveError(UserError):
  """A move that must not happen (into the index's folder, onto an existing file, ...)."""


def kill_at(point: str, n: int = 1) -> None:
  """SIGKILLs this process the `n`-th time it reaches `point` (tests only)."""
  global _hook
  if point not in POINTS:
    raise ValueError(f"unknown crash point {point!r}, expected one of {POINTS}")
  left = [int(n)]

  def hook(p: str) -> None:
    if p == point:
      left[0] -= 1
      if left[0] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)

  _hook = hook


def _reached(point: str) -> None:
  if _hook is not None:
    _hook(point)


# ------------------------------------------------------------------------------ keepers


@dataclasses.dataclass(frozen=True)
class FileInfo:
  """What the keeper choice looks at. `error` is set when the file cannot be read."""

  path: str
  width: int = 0
  height: int = 0
  size: int = 0
  mtime_ns: int = 0
  error: str | None = None

  @property
  def pixels(self) -> int:
    return self.width * self.height


def file_info(path: str) -> FileInfo:
  """Size, mtime and pixel dimensions (header only) of a file."""
  try:
    st = os.stat(path)
  except OSError as e:
    return FileInfo(path, error=f"cannot stat: {e.strerror}")
  images.register_optional_formats()
  try:
    with Image.open(path) as im:
      w, h = im.size
  except Exception as e:  # noqa: BLE001 - any failure: no dimensions, still a candidate by size
    return FileInfo(path, 0, 0, st.st_size, st.st_mtime_ns, error=f"cannot read dimensions: {e}")
  return FileInfo(path, w, h, st.st_size, st.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class Decision:
  """A group's keeper, the reason, and the others (candidates to move)."""

  keeper: FileInfo
  reason: str
  others: tuple[FileInfo, ...]


def _rank(f: FileInfo) -> tuple:
  return (f.error is not None and f.size == 0, -f.pixels, -f.size, f.mtime_ns, f.path)


def choose_keeper(infos: Sequence[FileInfo]) -> Decision:
  """Highest resolution, then largest file, then oldest mtime, then first path; says which decided."""
  ranked = sorted(infos, key=_rank)
  best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
  if second is None:
    reason = "only member"
  elif best.pixels != second.pixels:
    reason = f"highest resolution ({best.width}x{best.height})"
  elif best.size != second.size:
    reason = f"largest file ({best.size} bytes) at the same resolution"
  elif best.mtime_ns != second.mtime_ns:
    stamp = datetime.datetime.fromtimestamp(best.mtime_ns / 1e9, datetime.timezone.utc)
    reason = f"oldest ({stamp:%Y-%m-%d %H:%M:%S} UTC) at the same resolution and size"
  else:
    reason = "first by name (same resolution, size and time)"
  return Decision(best, reason, tuple(ranked[1:]))


# ------------------------------------------------------------------------------ plans


@dataclasses.dataclass(frozen=True)
class Move:
  src: str
  dst: str


def common_root(paths: Sequence[str]) -> str:
  """The deepest folder holding every path."""
  return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def plan(decisions: Sequence[Decision], move_to: str, index_path: str) -> tuple[list[Move], str]:
  """The moves of every non-keeper to `move_to`/its path relative to the group members' common
  folder. Returns (moves, that root).

  Raises:
    MoveError: `move_to` inside the index's folder or the index's folder inside `move_to`, or a
      file to move inside the index's folder.
  """
  if _inside(move_to, index_path) or _inside(index_path, move_to):
    raise MoveError(
      f"--move_to={move_to} and the index folder {index_path} overlap: files are never moved into "
      "or out of an index's own folder"
    )
  paths = [f.path for d in decisions for f in (d.keeper, *d.others)]
  if not paths:
    return [], ""
  root = common_root(paths)
  moves = []
  for d in decisions:
    for f in d.others:
      if _inside(f.path, index_path):
        raise MoveError(f"{f.path} lies inside the index folder {index_path}: not moved")
      rel = os.path.relpath(os.path.abspath(f.path), root)
      moves.append(Move(os.path.abspath(f.path), os.path.join(os.path.abspath(move_to), rel)))
  return moves, root


# ------------------------------------------------------------------------------ the journal


class Journal:
  """An append-only file of JSON records, one per line; each written with one write() and fsynced."""

  def __init__(self, path: str):
    self.path = path
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    fileio.fsync_dir(os.path.dirname(os.path.abspath(path)))

  def write(self, record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8", "surrogatepass")
    if os.write(self._fd, line) != len(line):
      raise OSError(errno.EIO, f"short write to the journal {self.path}")
    os.fsync(self._fd)

  def close(self) -> None:
    os.close(self._fd)

  def __enter__(self) -> Journal:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_journal(path: str) -> list[dict]:
  """The records of a journal; a torn last line (a crash mid-write) is dropped, others must parse."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"cannot read the journal {path}: {e.strerror}") from e
  lines = data.split(b"\n")
  out = []
  for i, line in enumerate(lines):
    if not line:
      continue
    try:
      rec = json.loads(line.decode("utf-8", "surrogatepass"))
    except ValueError as e:
      if i == len(lines) - 1:  # no newline after it: torn by a crash, never acted on
        break
      raise UserError(f"{path}: line {i + 1} is not a journal record") from e
    if not isinstance(rec, dict) or "op" not in rec:
      raise UserError(f"{path}: line {i + 1} is not a journal record")
    out.append(rec)
  if not out or out[0].get("op") != "begin" or out[0].get("version") != JOURNAL_VERSION:
    raise UserError(f"{path} is not a dedup journal (version {JOURNAL_VERSION})")
  return out


def journals_in(folder: str) -> list[str]:
  try:
    names = os.listdir(folder)
  except FileNotFoundError:
    return []
  return sorted(
    os.path.join(folder, n) for n in names if n.startswith(JOURNAL_PREFIX) and n.endswith(".jsonl")
  )


# ------------------------------------------------------------------------------ one move


def _fsync_parent(path: str) -> None:
  fileio.fsync_dir(os.path.dirname(path))


def _move_file(src: str, dst: str) -> None:
  """Moves src to dst without ever overwriting dst or losing src (see the module docstring)."""
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if os.path.lexists(dst):
    raise MoveError(f"{dst} already exists: not overwritten")
  try:
    os.link(src, dst, follow_symlinks=False)
  except OSError as e:
    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
      raise
    tmp = dst + TMP_SUFFIX
    shutil.copy2(src, tmp, follow_symlinks=False)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.link(tmp, dst)  # no-overwrite, unlike rename
    os.unlink(tmp)
  _fsync_parent(dst)
  _reached("linked")
  os.unlink(src)
  _fsync_parent(src)
  _reached("moved")


def _settle(src: str, dst: str, sha256: str) -> str:
  """Brings an interrupted move src -> dst to a clean state; returns "done" or "not moved"."""
  tmp = dst + TMP_SUFFIX
  if os.path.lexists(tmp):
    os.unlink(tmp)  # our own partial copy; the original is still at src
  have_src, have_dst = os.path.lexists(src), os.path.lexists(dst)
  if have_dst and not have_src:
    return "done"
  if have_src and not have_dst:
    return "not moved"
  if have_src and have_dst:
    if os.path.samefile(src, dst) or fileio.sha256_file(dst) == sha256:
      os.unlink(src)  # the destination holds the same bytes: finish the move
      _fsync_parent(src)
      return "done"
    raise MoveError(f"cannot settle the move {src} -> {dst}: both exist and differ")
  raise MoveError(f"cannot settle the move {src} -> {dst}: neither exists")


# ------------------------------------------------------------------------------ runs


@dataclasses.dataclass
class MoveReport:
  moved: list[Move] = dataclasses.field(default_factory=list)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  journal: str | None = None


def _new_journal_path(move_to: str) -> str:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
  return os.path.join(move_to, f"{JOURNAL_PREFIX}{stamp}-{os.getpid()}.jsonl")


def apply(moves: Sequence[Move], idx: store.Index, move_to: str, root: str) -> MoveReport:
  """Moves each file under the journal, after checking it against the index (size and mtime)."""
  report = MoveReport()
  if not moves:
    return report
  os.makedirs(move_to, exist_ok=True)
  report.journal = _new_journal_path(move_to)
  with Journal(report.journal) as j:
    j.write({"op": "begin", "version": JOURNAL_VERSION, "index": idx.path, "root": root})
    for n, m in enumerate(moves):
      known = idx.get_file_stat(m.src)
      try:
        st = os.stat(m.src)
      except OSError as e:
        report.skipped.append((m.src, f"cannot stat: {e.strerror}"))
        continue
      if known is None:
        report.skipped.append((m.src, "not in the index"))
        continue
      if (st.st_size, st.st_mtime_ns) != (known.size, known.mtime_ns):
        report.skipped.append((m.src, "changed since it was indexed (size or mtime): re-index"))
        continue
      if os.path.lexists(m.dst):
        report.skipped.append((m.src, f"{m.dst} already exists: not overwritten"))
        continue
      sha = fileio.sha256_file(m.src)
      rec = {"op": "intent", "n": n, "src": m.src, "dst": m.dst, "sha256": sha}
      j.write({**rec, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
      _reached("intent")
      _move_file(m.src, m.dst)
      j.write({"op": "done", "n": n})
      report.moved.append(m)
    j.write({"op": "end"})
  return report


def _pending(records: list[dict], start: str, finish: str) -> dict[int, dict]:
  """Records `start` that have no `finish` after them, by move number."""
  open_: dict[int, dict] = {}
  for r in records:
    if r["op"] == start:
      open_[r["n"]] = r
    elif r["op"] == finish or (r["op"] == "abandoned" and r.get("of") == start):
      open_.pop(r["n"], None)
  return open_


def recover(journal: str) -> list[str]:
  """Settles a journal left without an `end` record by a killed run; returns what it did, in words."""
  records = read_journal(journal)
  if records[-1]["op"] == "end":
    return []
  said = []
  with Journal(journal) as j:
    for direction, (start, finish) in (("move", ("intent", "done")), ("undo", ("undo", "undone"))):
      for n, r in sorted(_pending(records, start, finish).items()):
        src, dst = (r["src"], r["dst"]) if direction == "move" else (r["dst"], r["src"])
        outcome = _settle(src, dst, r["sha256"])
        if outcome == "done":
          j.write({"op": finish, "n": n, "recovered": True})
          said.append(f"completed the interrupted {direction} {src} -> {dst}")
        else:
          j.write({"op": "abandoned", "n": n, "of": start})
          said.append(f"rolled back the interrupted {direction} of {src} (it never left)")
    j.write({"op": "end", "recovered": True})
  return said or [f"closed the journal {journal} of an interrupted run (no move was in flight)"]


def recover_all(move_to: str) -> list[str]:
  """`recover` on every journal in `move_to`."""
  out = []
  for path in journals_in(move_to):
    out.extend(recover(path))
  return out


def undo(journal: str) -> MoveReport:
  """Moves every file the journal moved back to where it was, newest first, checking its sha256.

  Files whose destination is gone or changed are skipped with the reason; an already undone move
  is not repeated.
  """
  recover(journal)
  records = read_journal(journal)
  intents = {r["n"]: r for r in records if r["op"] == "intent"}
  done = [r["n"] for r in records if r["op"] == "done"]
  undone = {r["n"] for r in records if r["op"] == "undone"}
  report = MoveReport(journal=journal)
  with Journal(journal) as j:
    j.write({"op": "begin_undo"})
    for n in reversed(done):
      if n in undone:
        continue
      r = intents[n]
      if not os.path.lexists(r["dst"]):
        report.skipped.append((r["dst"], "no longer there"))
        continue
      if os.path.lexists(r["src"]):
        report.skipped.append((r["dst"], f"{r['src']} exists again: not overwritten"))
        continue
      if fileio.sha256_file(r["dst"]) != r["sha256"]:
        report.skipped.append((r["dst"], "changed since it was moved (sha256): left there"))
        continue
      j.write({"op": "undo", "n": n, "src": r["src"], "dst": r["dst"], "sha256": r["sha256"]})
      _reached("intent")
      _move_file(r["dst"], r["src"])
      j.write({"op": "undone", "n": n})
      report.moved.append(Move(r["dst"], r["src"]))
    j.write({"op": "end"})
  return report
