"""Acting on duplicates: keepers, journaled moves, undo byte for byte, and SIGKILL mid-move."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import faultlib
import numpy as np
import pytest
from PIL import Image

from engine import store
from engine.app import dedup, grouping, indexing, moves, sample


def _write(path, seed, size=(96, 72), quality=85):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sample.scene(np.random.default_rng(seed), *size).save(path, quality=quality)
  return str(path)


@pytest.fixture
def collection(tmp_path):
  """Photos in nested folders; each `dup` is a byte copy of its `orig` (same stub vector), older."""
  root = tmp_path / "photos"
  origs = [_write(root / "a" / f"p{i}.jpg", 10 + i) for i in range(3)]
  _write(root / "b" / "other.jpg", 99)
  dups = []
  for i, src in enumerate(origs[:2]):
    dst = root / "b" / "deep" / f"copy{i}.jpg"
    os.makedirs(dst.parent, exist_ok=True)
    shutil.copyfile(src, dst)
    dups.append(str(dst))
  # The copies are the older files: same pixels and size, so age decides and they are kept.
  for i, (o, d) in enumerate(zip(origs, dups, strict=False)):
    os.utime(d, ns=(1_000_000_000 * (1000 + i),) * 2)
    os.utime(o, ns=(1_000_000_000 * (2000 + i),) * 2)
  index = str(tmp_path / "idx")
  indexing.index_folder(str(root), index, faultlib.StubExtractor(), progress=False)
  return {"root": root, "origs": origs, "dups": dups, "index": index, "tmp": tmp_path}


def _snapshot(root) -> dict[str, tuple[bytes, int]]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      out[os.path.relpath(p, root)] = (pathlib.Path(p).read_bytes(), os.stat(p).st_mtime_ns)
  return out


def _result(index):
  with store.Index.open(index, readonly=True) as idx:
    sel = dedup.select_threshold(idx, threshold=0.999)
    return dedup.find(idx, sel)


def test_keeper_resolution_then_size_then_age(tmp_path):
  big = _write(tmp_path / "big.jpg", 1, (200, 150), 50)
  small = _write(tmp_path / "small.jpg", 1, (100, 75), 95)
  d = moves.choose_keeper([moves.file_info(small), moves.file_info(big)])
  assert d.keeper.path == big and "resolution (200x150)" in d.reason
  heavy = _write(tmp_path / "heavy.jpg", 1, (100, 75), 98)
  d = moves.choose_keeper([moves.file_info(small), moves.file_info(heavy)])
  assert d.keeper.path == heavy and "largest file" in d.reason
  twin = tmp_path / "twin.jpg"
  shutil.copyfile(small, twin)
  os.utime(twin, ns=(10**18, 10**18))
  os.utime(small, ns=(2 * 10**18, 2 * 10**18))
  d = moves.choose_keeper([moves.file_info(small), moves.file_info(str(twin))])
  assert d.keeper.path == str(twin) and d.reason.startswith("oldest")
  assert [f.path for f in d.others] == [small]


def test_outputs_name_keepers_and_the_rule(collection):
  res = _result(collection["index"])
  assert len(res.groups) == 2
  for d, (o, c) in zip(
    res.decisions, zip(collection["origs"], collection["dups"], strict=False), strict=False
  ):
    assert d.keeper.path == c and "oldest" in d.reason and [f.path for f in d.others] == [o]
  doc = json.loads(dedup.render(res, "json"))
  assert doc["rule"].startswith("every pair") and doc["linkage"] == "complete"
  assert doc["expected_note"].startswith("expected precision unknown")
  assert {g["keeper"] for g in doc["groups"]} == set(collection["dups"])
  csv_text = dedup.render(res, "csv")
  assert csv_text.count("\nkeep") == 0 and csv_text.count(",keep,") == 2
  text = dedup.render(res, "text")
  assert "every pair of images in a group scores >= 0.9990" in text
  html = dedup.render(res, "html")
  assert html.count("<figure") == 4 and "complete linkage" in html


def test_move_then_undo_restores_every_byte(collection):
  root, index = collection["root"], collection["index"]
  before = _snapshot(root)
  res = _result(index)
  dest = str(collection["tmp"] / "aside")
  plan, common = moves.plan(res.decisions, dest, index)
  assert common == str(root)
  assert sorted(m.dst for m in plan) == [os.path.join(dest, "a", f"p{i}.jpg") for i in range(2)]
  with store.Index.open(index, readonly=True) as idx:
    done = moves.apply(plan, idx, dest, common)
  assert len(done.moved) == 2 and not done.skipped
  for o in collection["origs"][:2]:
    assert not os.path.exists(o)
  for m in plan:
    assert pathlib.Path(m.dst).read_bytes() == before[os.path.relpath(m.src, root)][0]
  records = moves.read_journal(done.journal)
  assert [r["op"] for r in records] == ["begin", "intent", "done", "intent", "done", "end"]
  back = moves.undo(done.journal)
  assert len(back.moved) == 2 and not back.skipped
  assert _snapshot(root) == before, "every file back, same bytes and mtime"
  assert moves.undo(done.journal).moved == [], "an undone journal is not undone twice"


def test_refuses_the_index_folder_and_changed_files(collection):
  res = _result(collection["index"])
  index = collection["index"]
  for bad in (os.path.join(index, "aside"), str(collection["tmp"])):
    with pytest.raises(moves.MoveError, match="index"):
      moves.plan(res.decisions, bad, index)
  dest = str(collection["tmp"] / "aside")
  plan, common = moves.plan(res.decisions, dest, index)
  changed = plan[0].src
  with open(changed, "ab") as f:
    f.write(b"\0")  # size differs from the index's record
  touched = plan[1].src
  st = os.stat(touched)
  os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
  with store.Index.open(index, readonly=True) as idx:
    done = moves.apply(plan, idx, dest, common)
  assert not done.moved and len(done.skipped) == 2
  assert all("changed since it was indexed" in why for _, why in done.skipped)
  assert os.path.exists(changed) and os.path.exists(touched)


def test_never_overwrites_a_destination(collection):
  res = _result(collection["index"])
  dest = collection["tmp"] / "aside"
  plan, common = moves.plan(res.decisions, str(dest), collection["index"])
  os.makedirs(os.path.dirname(plan[0].dst))
  with open(plan[0].dst, "wb") as f:
    f.write(b"precious")
  with store.Index.open(collection["index"], readonly=True) as idx:
    done = moves.apply(plan, idx, str(dest), common)
  assert pathlib.Path(plan[0].dst).read_bytes() == b"precious" and os.path.exists(plan[0].src)
  assert len(done.moved) == 1 and "already exists" in done.skipped[0][1]


_CHILD = """
import json, sys
from engine import store
from engine.app import moves
point, n, index, dest, common, plan = sys.argv[1:]
moves.kill_at(point, int(n))
plan = [moves.Move(**m) for m in json.loads(plan)]
with store.Index.open(index, readonly=True) as idx:
  moves.apply(plan, idx, dest, common)
"""


@pytest.mark.parametrize(
  "point, n, settled",
  [("intent", 2, "rolled back"), ("linked", 2, "completed"), ("moved", 1, "completed")],
)
def test_a_move_killed_by_sigkill_is_settled_on_the_next_run(collection, point, n, settled):
  root, index = collection["root"], collection["index"]
  before = _snapshot(root)
  res = _result(index)
  dest = str(collection["tmp"] / "aside")
  plan, common = moves.plan(res.decisions, dest, index)
  arg = json.dumps([{"src": m.src, "dst": m.dst} for m in plan])
  child = subprocess.run(
    [sys.executable, "-c", _CHILD, point, str(n), index, dest, common, arg],
    cwd=faultlib.ROOT,
    env={**os.environ, "PYTHONPATH": faultlib.ROOT},
    capture_output=True,
    timeout=120,
  )
  assert child.returncode == -signal.SIGKILL, child.stderr.decode()
  (journal,) = moves.journals_in(dest)
  assert moves.read_journal(journal)[-1]["op"] != "end"
  m = plan[n - 1]
  if point == "linked":
    assert os.path.exists(m.src) and os.path.exists(m.dst), "killed with both names present"
  said = moves.recover_all(dest)
  assert len(said) == 1 and settled in said[0]
  assert os.path.exists(m.dst) != os.path.exists(m.src), "exactly one copy after recovery"
  assert moves.recover_all(dest) == [], "a settled journal needs nothing more"
  back = moves.undo(journal)
  assert not back.skipped
  assert _snapshot(root) == before


def test_undo_killed_midway_is_settled_too(collection):
  root, index = collection["root"], collection["index"]
  before = _snapshot(root)
  res = _result(index)
  dest = str(collection["tmp"] / "aside")
  plan, common = moves.plan(res.decisions, dest, index)
  with store.Index.open(index, readonly=True) as idx:
    journal = moves.apply(plan, idx, dest, common).journal
  child = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys\nfrom engine.app import moves\nmoves.kill_at('linked', 1)\nmoves.undo(sys.argv[1])",
      journal,
    ],
    cwd=faultlib.ROOT,
    env={**os.environ, "PYTHONPATH": faultlib.ROOT},
    capture_output=True,
    timeout=120,
  )
  assert child.returncode == -signal.SIGKILL, child.stderr.decode()
  said = moves.recover_all(dest)
  assert len(said) == 1 and "completed the interrupted undo" in said[0]
  back = moves.undo(journal)
  assert len(back.moved) == 1
  assert _snapshot(root) == before


def test_torn_last_journal_line_is_ignored(tmp_path):
  path = tmp_path / f"{moves.JOURNAL_PREFIX}x.jsonl"
  with moves.Journal(str(path)) as j:
    j.write({"op": "begin", "version": moves.JOURNAL_VERSION, "index": "i", "root": "r"})
  with open(path, "ab") as f:
    f.write(b'{"op": "inte')
  assert [r["op"] for r in moves.read_journal(str(path))] == ["begin"]
  assert "interrupted run" in moves.recover(str(path))[0]


def test_keeper_reads_heic_dimensions_when_installed(tmp_path):
  pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is not installed")
  img = Image.new("RGB", (40, 30), (10, 200, 30))
  pillow_heif.from_pillow(img).save(str(tmp_path / "x.heic"))
  info = moves.file_info(str(tmp_path / "x.heic"))
  assert (info.width, info.height) == (40, 30) and info.error is None


def test_moves_across_file_systems_copy_then_link(collection, monkeypatch):
  """Where a hard link cannot be made (another file system), the copy path keeps every byte."""
  import errno

  real_link = os.link

  def link(src, dst, **kw):
    if not str(src).endswith(moves.TMP_SUFFIX):
      raise OSError(errno.EXDEV, "Invalid cross-device link")
    return real_link(src, dst, **kw)

  monkeypatch.setattr(os, "link", link)
  root = collection["root"]
  before = _snapshot(root)
  res = _result(collection["index"])
  dest = str(collection["tmp"] / "aside")
  plan, common = moves.plan(res.decisions, dest, collection["index"])
  with store.Index.open(collection["index"], readonly=True) as idx:
    done = moves.apply(plan, idx, dest, common)
  assert len(done.moved) == 2
  assert not [f for f in os.listdir(os.path.join(dest, "a")) if f.endswith(moves.TMP_SUFFIX)]
  for m in plan:
    assert not os.path.exists(m.src)
    assert (pathlib.Path(m.dst).read_bytes(), os.stat(m.dst).st_mtime_ns) == before[
      os.path.relpath(m.src, root)
    ]
  moves.undo(done.journal)
  assert _snapshot(root) == before


def test_every_output_escapes_hostile_names(tmp_path):
  evil = str(tmp_path / '<script>alert("x")</script>\n&.jpg')
  plain = str(tmp_path / "b.jpg")
  _write(evil, 1)
  _write(plain, 1, size=(128, 96))
  g = grouping.Group((evil, plain), (0.97, 0.97), 0.97)
  d = moves.choose_keeper([moves.file_info(evil), moves.file_info(plain)])
  res = dedup.Result(
    dedup.Selection(0.95, "--threshold", None, "no calibration <b>"), "complete", [g], [d]
  )
  page = dedup.render(res, "html")
  assert "<script>" not in page and "<b>" not in page and "&lt;script&gt;" in page
  text = dedup.render(res, "text")
  assert "\\n&.jpg" in text and text.count("\n") == 4, "one line per member, the name escaped"
  rows = list(csv.reader(io.StringIO(dedup.render(res, "csv"))))
  assert rows[1][1:3] == ["keep", plain] and rows[2][1:3] == ["duplicate", evil]
  doc = json.loads(dedup.render(res, "json"))
  assert doc["groups"][0]["members"][1]["key"] == evil
