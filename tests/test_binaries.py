"""End to end: the binaries as a user runs them, on a temporary photo folder.

They run in this process (`binlib.run`: the same `python -m` entry, flags, output and exit code,
without 8-10 s of start-up and compilation per run); `test_every_binary_runs_as_a_process` runs
each of them once as a real subprocess.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil

import binlib
import numpy as np
import pytest
from binlib import TINY
from conftest import shared_data_or_skip, write_image

from engine.app import sample


def run(module, *args, ok=True, subprocess=False):
  """A binary's run; ok=False: it must fail without a traceback (usage errors print more lines)."""
  r = binlib.run(module, *args, ok=True if ok else None, subprocess=subprocess)
  if not ok:
    assert r.returncode > 0, f"{module} {args} should have failed:\n{r.out}"
    assert "Traceback" not in r.err, r.err
  return r


def _summary(proc):
  line = [ln for ln in proc.out.splitlines() if ln.startswith("indexed ")][-1]
  words = line.replace(",", "").split()
  return {words[i]: int(words[i + 1]) for i in range(0, 8, 2)}


class _Html(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.text, self.tags, self.imgs = [], [], 0

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    self.imgs += tag == "img"

  def handle_data(self, data):
    self.text.append(data)


def write_scene(path, seed, size=(96, 80)):
  """A distinct synthetic photo (random noise images all look alike to a random network)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sample.scene(np.random.default_rng(seed), *size).save(path)


@pytest.fixture
def photos(tmp_path):
  folder = tmp_path / "photos"
  for i in range(6):
    write_scene(folder / f"p{i}.jpg", seed=100 + i)
  write_scene(folder / "nested" / "deep.png", seed=200, size=(80, 96))
  (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  (folder / "readme.txt").write_text("not an image")
  return folder


def test_every_binary_runs_as_a_process(tmp_path):
  """Each binary once as a real `python -m` child: entry point, pipes and exit code of a process."""
  out, index = tmp_path / "sample", tmp_path / "idx"
  r = run("engine.sample", f"--output={out}", "--scenes=5", "--queries=1", subprocess=True)
  assert "wrote 5 photos and 1 queries" in r.out
  r = run("engine.index", f"--images={out / 'photos'}", f"--index={index}", *TINY, subprocess=True)
  assert _summary(r) == {"indexed": 5, "unchanged": 0, "failed": 0, "pruned": 0}
  (query,) = json.loads((out / "ground_truth.json").read_text())
  r = run(
    "engine.query",
    f"--index={index}",
    f"--query={query}",
    "--k=2",
    "--backend=xla",
    subprocess=True,
  )
  assert r.out.count("query: ") == 1 and len(re.findall(r"^ +[12] ", r.out, re.M)) == 2, r.out
  r = run("engine.dedup", f"--index={index}", "--format=json", subprocess=True)
  assert "groups" in json.loads(r.out)
  feats = tmp_path / "feats"
  r = run(
    "engine.extract", f"--images={out / 'queries'}", f"--output={feats}", *TINY, subprocess=True
  )
  assert np.load(feats / "features.npy").shape == (1, 32)  # fc2 of the tiny model
  onnx = tmp_path / "m.onnx"
  r = run(
    "engine.export", "--weights=random:5", "--config=tiny", "--descriptor=gem", f"--output={onnx}",
    "--height=64", "--width=64", subprocess=True,
  )  # fmt: skip
  assert onnx.stat().st_size > 0
  p = run(
    "engine.query", f"--index={index}", f"--query={query}", "--k=0", ok=False, subprocess=True
  )
  assert p.returncode == 1 and p.err.startswith("error: ") and "k" in p.err


def test_index_reindex_add_change_prune_query_dedup(tmp_path, photos):
  index = str(tmp_path / "idx")
  first = run("engine.index", f"--images={photos}", f"--index={index}", *TINY)
  assert _summary(first) == {"indexed": 7, "unchanged": 0, "failed": 1, "pruned": 0}
  assert "corrupt.jpg" in first.out and "RANDOM" in first.out
  failures = (tmp_path / "idx" / "last_run_failures.tsv").read_text()
  assert "corrupt.jpg\t" in failures

  again = run("engine.index", f"--images={photos}", f"--index={index}", *TINY)
  assert _summary(again)["indexed"] == 0 and _summary(again)["unchanged"] == 7

  shutil.copy(photos / "p0.jpg", photos / "copy_of_p0.jpg")
  os.utime(photos / "p1.jpg")  # touched, same content: not re-extracted
  write_scene(photos / "p2.jpg", seed=999)  # new content
  third = run("engine.index", f"--images={photos}", f"--index={index}", *TINY)
  assert _summary(third)["indexed"] == 2 and _summary(third)["unchanged"] == 6

  os.remove(photos / "p3.jpg")
  fourth = run(
    "engine.index", f"--images={photos}", f"--index={index}", "--prune", "--compact", *TINY
  )
  assert _summary(fourth)["pruned"] == 1
  assert re.search(r"compacted \d+ segments into 1 \(7 images\)", fourth.out), fourth.out

  q = run(
    "engine.query",
    f"--index={index}",
    f"--query={photos / 'p0.jpg'}",
    "--k=3",
    "--format=json",
    f"--html={tmp_path / 'r.html'}",
  )
  out = json.loads(q.out)
  matches = out["results"][0]["matches"]
  assert {matches[0]["key"], matches[1]["key"]} == {
    str(photos / "p0.jpg"),
    str(photos / "copy_of_p0.jpg"),
  }
  assert matches[0]["score"] > 0.99 and len(matches) == 3
  assert all(str(photos / "p3.jpg") != m["key"] for m in matches)
  page = _Html()
  page.feed((tmp_path / "r.html").read_text())
  assert page.imgs == 4  # the query and its three matches
  for m in matches:
    assert any(os.path.basename(m["key"]) in t for t in page.text)

  text = run("engine.query", f"--index={index}", f"--query={photos}", "--k=2")
  assert text.out.count("query: ") == 7  # every decodable photo left, corrupt one skipped
  assert "corrupt.jpg" in text.err

  d = run("engine.dedup", f"--index={index}", "--threshold=0.999", "--format=json")
  out = json.loads(d.out)
  groups = out["groups"]
  assert [sorted(m["key"] for m in g["members"]) for g in groups] == [
    sorted([str(photos / "p0.jpg"), str(photos / "copy_of_p0.jpg")])
  ]
  assert out["rule"].startswith("every pair") and "expected precision" in out["expected_note"]
  assert groups[0]["keeper"] == str(photos / "p0.jpg") and "oldest" in groups[0]["reason"]

  # Moving the copy aside: a dry run, then --apply, then --undo restores it byte for byte.
  copy_bytes = (photos / "copy_of_p0.jpg").read_bytes()
  aside = tmp_path / "aside"
  dry = run("engine.dedup", f"--index={index}", "--threshold=0.999", f"--move_to={aside}")
  assert "would move" in dry.err and (photos / "copy_of_p0.jpg").exists()
  moved = run(
    "engine.dedup", f"--index={index}", "--threshold=0.999", f"--move_to={aside}", "--apply"
  )
  assert "moved 1 files" in moved.err and not (photos / "copy_of_p0.jpg").exists()
  assert (aside / "copy_of_p0.jpg").read_bytes() == copy_bytes
  journal = re.search(r"--undo=(\S+)", moved.err).group(1)
  run("engine.dedup", f"--undo={journal}")
  assert (photos / "copy_of_p0.jpg").read_bytes() == copy_bytes
  assert not (aside / "copy_of_p0.jpg").exists()


def test_html_escapes_file_names(tmp_path):
  folder = tmp_path / "evil"
  write_image(folder / "<script>alert(1)</script>.jpg", seed=1)
  write_image(folder / "b&q.jpg", seed=2)
  index = str(tmp_path / "idx")
  run("engine.index", f"--images={folder}", f"--index={index}", *TINY)
  run("engine.query", f"--index={index}", f"--query={folder}", "--k=2", f"--html={tmp_path}/r.html")
  page = (tmp_path / "r.html").read_text()
  assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in page
  parsed = _Html()
  parsed.feed(page)
  assert "script" not in parsed.tags


def test_errors_are_one_line_with_nonzero_exit(tmp_path, photos):
  index = str(tmp_path / "idx")
  run("engine.index", f"--images={photos}", f"--index={index}", *TINY)
  query = str(photos / "p0.jpg")
  p = run("engine.query", f"--index={index}", f"--query={query}", "--k=0", ok=False)
  assert "k" in p.err
  # Checked before any work: not after extracting and searching.
  p = run(
    "engine.query", f"--index={index}", f"--query={query}", "--html=/no/such/r.html", ok=False
  )
  assert "the folder /no/such does not exist" in p.err and "RANDOM" not in p.out
  p = run("engine.query", f"--index={tmp_path / 'missing'}", f"--query={query}", ok=False)
  assert "no index" in p.err
  p = run(
    "engine.query", f"--index={index}", f"--query={photos / 'corrupt.jpg'}", "--k=1", ok=False
  )
  assert "decod" in p.err
  p = run("engine.index", f"--images={photos}", f"--index={index}", "--weights=/no/such", ok=False)
  assert "does not exist" in p.err
  p = run(
    "engine.index", f"--images={photos}", f"--index={index}", "--descriptor=mac", *TINY, ok=False
  )
  assert "different extractor" in p.err and "descriptor" in p.err
  empty = tmp_path / "empty"
  empty.mkdir()
  p = run("engine.index", f"--images={empty}", f"--index={tmp_path / 'idx2'}", *TINY, ok=False)
  assert "no images" in p.err
  p = run("engine.index", "--images=/no/such/folder", f"--index={tmp_path / 'i3'}", *TINY, ok=False)
  assert "no such" in p.err
  p = run("engine.index", f"--index={index}", ok=False)
  assert "images" in p.err


@pytest.mark.parametrize(
  "module, listed",
  [
    ("engine.index", ["--images", "--descriptor", "--weights", "--batch_size", "--backend"]),
    ("engine.query", ["--query", "--weights", "--batch_size", "--backend", "--precision"]),
    ("engine.extract", ["--output", "--descriptor", "--weights", "--batch_size", "--config"]),
    ("engine.export", ["--output", "--descriptor", "--weights", "--batch_size"]),
    (
      "engine.dedup",
      ["--index", "--threshold", "--k", "--precision", "--tier", "--linkage"],
    ),  # reads an index: no extractor flags
  ],
)
def test_help_lists_the_flags_a_user_needs(module, listed):
  out = run(module, "--help", ok=False).out  # absl's --help exits 1
  for flag in listed:
    assert f"{flag}:" in out or f"{flag}=" in out, (module, flag, out)
  assert "--[no]normalize" in out or module not in ("engine.extract", "engine.export")
  assert "every pair of images in a group" in out or module != "engine.dedup"


_LAYER_CHILD = """
from absl import app
from engine import cli
cli.define_descriptor_flags("fc2", "Descriptor.")
cli.define_extractor_flags()
app.run(lambda argv: print(cli.descriptor(), sorted(cli.explicit_settings())))
"""


def test_layer_is_a_deprecated_spelling_of_descriptor(tmp_path):
  """--layer still works for one release, with a warning; given with --descriptor, they must agree."""
  child = tmp_path / "child.py"
  child.write_text(_LAYER_CHILD)
  plain, old, both = (
    binlib.run(str(child), ok=True),
    binlib.run(str(child), "--layer=mac", ok=True),
    binlib.run(str(child), "--layer=mac", "--descriptor=gem", ok=None),
  )
  assert plain.out.split("[")[0].split() == ["fc2"] and "deprecated" not in plain.err
  assert old.out.startswith("mac ['descriptor']") and "--layer is deprecated" in old.err
  assert both.returncode != 0 and "disagree" in both.err and "Traceback" not in both.err


@pytest.mark.parametrize("error", ["errors.UserError", "errors.SettingsError", "ValueError"])
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, error):
  """Only a UserError is the user's to fix; a ValueError from inside the library is a bug."""
  from engine.app import extraction
  from engine.common import errors

  message = f"planted {error}"
  exc = {"errors.UserError": errors.UserError, "errors.SettingsError": errors.SettingsError}.get(
    error, ValueError
  )

  def build(*args, **kwargs):
    raise exc(message)

  monkeypatch.setattr(extraction, "build", build)
  proc = binlib.run(
    "engine.extract", f"--images={tmp_path}", f"--output={tmp_path / 'out'}", ok=None
  )
  assert message in proc.err, proc.err
  if error == "ValueError":
    assert proc.returncode != 0 and "Traceback" in proc.err, proc.err
  else:
    assert proc.returncode == 1 and "Traceback" not in proc.err, proc.err
    assert [ln for ln in proc.err.splitlines() if ln.strip()] == [f"error: {message}"]


def test_extract_writes_features_and_paths(tmp_path, photos):
  out = tmp_path / "feats"
  run("engine.extract", f"--images={photos}", f"--output={out}", "--descriptor=fc2", *TINY)
  feats = np.load(out / "features.npy")
  paths = (out / "paths.txt").read_text().splitlines()
  assert feats.shape == (7, 32) and len(paths) == 7 and feats.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, rtol=1e-5)
  assert "corrupt.jpg" in (out / "errors.txt").read_text()


def test_shared_photos_transformed_copies_rank_above_unrelated(tmp_path):
  """The flip, resize and rotation of a real photo come back above every unrelated photo."""
  data = shared_data_or_skip()
  photos = tmp_path / "photos"
  shutil.copytree(data / "base_images", photos / "base")
  for name in ["ukbench00120_hflip.jpg", "ukbench00120_resize.jpg", "ukbench00120_rotation.jpg"]:
    shutil.copy(data / "mixed_images" / name, photos / name)
  index = str(tmp_path / "idx")
  args = ["--weights=random", "--descriptor=gem", "--image_size=224", "--batch_size=8"]
  run("engine.index", f"--images={photos}", f"--index={index}", *args)
  q = run(
    "engine.query",
    f"--index={index}",
    f"--query={photos / 'base' / 'ukbench00120.jpg'}",
    "--k=13",
    "--format=json",
  )
  keys = [os.path.basename(m["key"]) for m in json.loads(q.out)["results"][0]["matches"]]
  assert keys[0] == "ukbench00120.jpg"
  assert set(keys[1:4]) == {
    "ukbench00120_hflip.jpg",
    "ukbench00120_resize.jpg",
    "ukbench00120_rotation.jpg",
  }, keys
