"""The index against hostile folders and manifests: it never deletes or overwrites what it did not
write, reads from read-only media and odd paths, and refuses manifests that point outside."""

import contextlib
import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest

from engine.store import Index, IndexCorruptError, IndexExistsError

D = 16


def _data(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, D)).astype(np.float32), [f"k{i}" for i in range(n)]


def _make(path, n=40, dtype="int8"):
  x, keys = _data(n)
  with Index.create(path, dim=D, dtype=dtype) as idx:
    idx.add(x[: n // 2], keys[: n // 2])
    idx.add(x[n // 2 :], keys[n // 2 :])
  return x, keys


def _user_files(folder):
  os.makedirs(folder, exist_ok=True)
  files = {"holiday.jpg": b"\xff\xd8 a photo", "seg-holiday.jpg": b"mine", ".notes.tmp": b"notes"}
  files |= {"seg-000001.npy.bak": b"a backup", ".seg-000002.npy.tmp": b"not a temp of ours"}
  for name, data in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
  return files


def _assert_intact(folder, files):
  for name, data in files.items():
    with open(os.path.join(folder, name), "rb") as f:
      assert f.read() == data, name


def test_create_refuses_a_folder_of_user_files(tmp_path):
  folder = str(tmp_path / "photos")
  files = _user_files(folder)
  for _ in range(2):
    with pytest.raises(IndexExistsError, match="not empty"):
      Index.create(folder, dim=D)
  _assert_intact(folder, files)
  assert sorted(os.listdir(folder)) == sorted(files)


def test_writer_never_removes_files_it_did_not_write(tmp_path):
  folder = str(tmp_path / "idx")
  x, keys = _make(folder)
  files = _user_files(folder)  # dropped into a live index folder by hand
  with Index.open(folder) as idx:  # recovery runs here
    idx.add(x[:3] + 1, ["new0", "new1", "new2"])
    idx.delete(keys[:5])
    idx.compact()
  with Index.open(folder) as idx:
    assert len(idx) == len(keys) - 5 + 3
  _assert_intact(folder, files)


def test_create_refuses_the_catalog_of_an_index_without_its_manifest(tmp_path):
  folder = str(tmp_path / "idx")
  _make(folder)
  for f in os.listdir(folder):
    if f.startswith("seg-"):
      os.unlink(os.path.join(folder, f))
  os.unlink(os.path.join(folder, "MANIFEST.json"))
  with pytest.raises(IndexCorruptError, match="MANIFEST.json is missing"):
    Index.create(folder, dim=D)


@pytest.mark.parametrize("name", ["i#x", "i?mode=rw", "i%41b", "sp ace;'\""])
def test_odd_characters_in_the_index_path(tmp_path, name):
  parent = tmp_path / "p"
  parent.mkdir()
  path = str(parent / name)
  x, keys = _make(path)
  for readonly in (True, False):
    with Index.open(path, readonly=readonly) as idx:
      _, got = idx.search(x[:3], k=1)
      assert list(got[:, 0]) == keys[:3]
  assert os.listdir(parent) == [name]  # no stray catalog outside the index


@contextlib.contextmanager
def _read_only_view(src, dst):
  os.makedirs(dst)
  try:
    subprocess.run(["mount", "--bind", src, dst], check=True, capture_output=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"a read-only bind mount needs mount privileges here: {e}")
  try:
    subprocess.run(["mount", "-o", "remount,ro,bind", dst], check=True, capture_output=True)
    yield
  finally:
    subprocess.run(["umount", dst], check=False, capture_output=True)


def test_readers_work_on_read_only_media(tmp_path):
  src, view = str(tmp_path / "src"), str(tmp_path / "view")
  os.makedirs(src)
  x, keys = _make(os.path.join(src, "idx"))
  with _read_only_view(src, view):
    ro = os.path.join(view, "idx")
    with pytest.raises(OSError):
      open(os.path.join(ro, "probe"), "w").close()
    with Index.open(ro, readonly=True) as idx:
      assert len(idx) == len(keys)
      _, got = idx.search(x[:4], k=1)
      assert list(got[:, 0]) == keys[:4]


def _edit_manifest(folder, edit):
  path = os.path.join(folder, "MANIFEST.json")
  with open(path) as f:
    m = json.load(f)
  edit(m)
  with open(path, "w") as f:
    json.dump(m, f)


def _file_of(name):
  def edit(m):
    m["segments"][0]["files"]["vectors"]["file"] = name

  return edit


@pytest.mark.parametrize(
  "edit, message",
  [
    (_file_of("../outside.npy"), "bad segment entry"),
    (_file_of("/etc/passwd"), "bad segment entry"),
    (_file_of("seg-000002.npy"), "bad segment entry"),  # another segment's file
    (lambda m: m.update(next_segment=2), "next_segment 2 is not above every segment"),
    (lambda m: m["segments"].append(dict(m["segments"][0])), "twice"),
  ],
)
def test_manifest_must_stay_inside_its_own_files(tmp_path, edit, message):
  folder = str(tmp_path / "idx")
  _make(folder)
  shutil.copy(os.path.join(folder, "seg-000001.npy"), tmp_path / "outside.npy")
  _edit_manifest(folder, edit)
  for readonly in (True, False):
    with pytest.raises(IndexCorruptError, match=message):
      Index.open(folder, readonly=readonly)


def test_a_segment_that_is_a_fifo_is_refused_without_blocking(tmp_path):
  folder = str(tmp_path / "idx")
  _make(folder)
  seg = os.path.join(folder, "seg-000001.npy")
  os.unlink(seg)
  os.mkfifo(seg)
  result = []
  t = threading.Thread(target=lambda: result.append(_open_error(folder)), daemon=True)
  t.start()
  t.join(20)
  assert result and "not a regular file" in result[0]


def _open_error(folder):
  try:
    Index.open(folder, readonly=True).close()
  except IndexCorruptError as e:
    return str(e)
  return "opened"


def test_values_the_dtype_cannot_hold(tmp_path):
  x = np.full((2, D), 3e38, np.float32)
  x[1] *= -1
  with Index.create(tmp_path / "n", dim=D, dtype="float16") as idx:  # normalising: unit rows
    idx.add(x, ["a", "b"])
    np.testing.assert_allclose(idx.get_vectors(["a", "b"]) * np.sqrt(D), [[1] * D, [-1] * D], 1e-3)
  with Index.create(tmp_path / "raw", dim=D, dtype="float16", normalize=False) as idx:
    with pytest.raises(ValueError, match="beyond what float16 can store"):
      idx.add(np.full((1, D), 1e5, np.float32), ["a"])
    assert len(idx) == 0


def test_a_reader_racing_a_merge_reloads(tmp_path, monkeypatch):
  path = str(tmp_path / "idx")
  x, keys = _make(path)
  real, fired = np.load, []

  def load(fname, *a, **kw):  # the writer's merge removes the file between the checks and the map
    if not fired:
      fired.append(fname)
      with Index.open(path) as writer:
        writer.compact()
    return real(fname, *a, **kw)

  monkeypatch.setattr(np, "load", load)
  with Index.open(path, readonly=True) as idx:
    assert fired and idx.keys() == keys
