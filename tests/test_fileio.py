"""Crash-safety order of `atomic_write`: data fsynced before the rename, the folder fsynced after."""

from __future__ import annotations

import os
import stat

import pytest

from engine.common import fileio


class _Recorder:
  """`os` for fileio only, logging fsync (of a file or a folder), replace and unlink."""

  def __init__(self):
    self.events = []

  def __getattr__(self, name):
    return getattr(os, name)

  def fsync(self, fd):
    kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
    self.events.append(("fsync", kind, os.fstat(fd).st_size if kind == "file" else None))
    os.fsync(fd)

  def replace(self, a, b):
    self.events.append(("replace", os.path.basename(a), os.path.basename(b)))
    os.replace(a, b)


@pytest.fixture
def recorder(monkeypatch):
  rec = _Recorder()
  monkeypatch.setattr(fileio, "os", rec)
  return rec


def test_atomic_write_fsyncs_data_then_renames_then_fsyncs_the_folder(tmp_path, recorder):
  target = tmp_path / "out.bin"
  fileio.atomic_write(target, lambda f: f.write(b"x" * 1000))
  kinds = [e[0] if e[0] == "replace" else f"fsync-{e[1]}" for e in recorder.events]
  assert kinds == ["fsync-file", "replace", "fsync-dir"], recorder.events
  assert recorder.events[0][2] == 1000  # the data was flushed before its fsync
  assert recorder.events[1][2] == "out.bin" and recorder.events[1][1].endswith(".tmp")
  assert target.read_bytes() == b"x" * 1000
  assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_text_and_json_writers_keep_the_order(tmp_path, recorder):
  fileio.atomic_write_text(tmp_path / "f.txt", "hello")
  fileio.atomic_write_json(tmp_path / "sub" / "f.json", {"a": 1})
  kinds = [e[0] if e[0] == "replace" else f"fsync-{e[1]}" for e in recorder.events]
  assert kinds == ["fsync-file", "replace", "fsync-dir"] * 2, recorder.events
  assert (tmp_path / "f.txt").read_text() == "hello"
  assert (tmp_path / "sub" / "f.json").read_text() == '{\n  "a": 1\n}\n'


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, recorder):
  target = tmp_path / "keep.txt"
  target.write_text("old")

  def boom(f):
    f.write(b"partial")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    fileio.atomic_write(target, boom)
  assert target.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
  assert not any(e[0] == "replace" for e in recorder.events)


def test_new_files_get_the_umask_permissions(tmp_path):
  target = tmp_path / "perm.txt"
  fileio.atomic_write_text(target, "x")
  assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~fileio.current_umask()
  assert target.read_text() == "x"
