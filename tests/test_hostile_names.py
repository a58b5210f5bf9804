"""File names that break line-based outputs: newlines, tabs, backslashes, control characters and
bytes that are not UTF-8. Every text output keeps one record per line, and names round-trip."""

import os

import binlib
import numpy as np
import pytest
from conftest import write_image

from engine.app import extraction, indexing
from engine.common import textio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "x.jpg\n    1  1.0000  /etc/evil.jpg"
NAMES = ["plain.png", "bad\nname.png", "tab\there.png", "back\\slash.png", EVIL + ".png"]
NON_UTF8 = b"caf\xe9.png"  # a Latin-1 name: not UTF-8


@pytest.fixture(scope="module")
def extractor(tiny_extractor):
  return tiny_extractor("gem", weights="random:4", batch_size=16)


def _folder(root, with_non_utf8=True):
  os.makedirs(root, exist_ok=True)
  for i, name in enumerate(NAMES):
    write_image(os.path.join(root, name), seed=i)
  if with_non_utf8:
    write_image(os.fsdecode(os.path.join(os.fsencode(root), NON_UTF8)), seed=9)
  with open(os.path.join(root, "broken\nfile.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 truncated")
  return root


def test_text_escaping_round_trips():
  names = [*NAMES, os.fsdecode(NON_UTF8), "nul\x00", "\x85\u2028", "\\x41", "\\"]
  data = textio.encode([[n, "why\tnot"] for n in names])
  assert data.count(b"\n") == len(names)
  assert textio.decode(data) == [[n, "why\tnot"] for n in names]
  assert "\n" not in textio.escape(EVIL)


def test_extract_outputs_change_together_and_round_trip(tmp_path, extractor):
  out = str(tmp_path / "feats")
  extraction.extract_to_folder(extractor, _folder(str(tmp_path / "a"), False), out)
  first, first_paths = extraction.read_folder(out)
  # A second run over names that are not UTF-8 replaces both outputs, consistently.
  src = _folder(str(tmp_path / "b"))
  res = extraction.extract_to_folder(extractor, src, out)
  feats, paths = extraction.read_folder(out)
  assert feats.shape[0] == len(paths) == res.count == len(NAMES) + 1
  assert sorted(os.path.relpath(p, src) for p in paths) == sorted([*NAMES, os.fsdecode(NON_UTF8)])
  assert all(os.path.exists(p) for p in paths)  # every name round-trips to its file
  with open(os.path.join(out, "paths.txt"), "rb") as f:
    assert f.read().count(b"\n") == len(paths)
  with open(os.path.join(out, "errors.txt"), "rb") as f:
    (bad,) = textio.decode(f.read())
  assert bad[0].endswith("broken\nfile.jpg")
  np.testing.assert_allclose(
    feats[paths.index(os.path.join(src, "plain.png"))],
    first[first_paths.index(os.path.join(str(tmp_path / "a"), "plain.png"))],
    rtol=1e-5,
    atol=1e-6,
  )


def test_extract_folder_out_of_step_is_refused(tmp_path, extractor):
  out = str(tmp_path / "feats")
  extraction.extract_to_folder(extractor, _folder(str(tmp_path / "a"), False), out)
  with open(os.path.join(out, "paths.txt"), "ab") as f:
    f.write(b"extra.jpg\n")
  with pytest.raises(extraction.UserError, match="does not match"):
    extraction.read_folder(out)


def test_failures_file_keeps_one_line_per_file(tmp_path, extractor):
  src = _folder(str(tmp_path / "photos"))
  index = str(tmp_path / "idx")
  report = indexing.index_folder(src, index, extractor, progress=False)
  assert len(report.failed) == 1
  with open(os.path.join(index, "last_run_failures.tsv"), "rb") as f:
    rows = textio.decode(f.read())
  assert [r[0] for r in rows] == [os.path.join(src, "broken\nfile.jpg")]


def test_query_text_output_cannot_be_spoofed(tmp_path, extractor):
  src = _folder(str(tmp_path / "photos"), False)
  index = str(tmp_path / "idx")
  indexing.index_folder(src, index, extractor, progress=False)
  proc = binlib.run(
    "engine.query",
    f"--index={index}",
    f"--query={src}/{EVIL}.png",
    *["--weights=random:4", "--config=tiny", "--image_size=64", "--backend=xla", "--k=10"],
  )
  lines = proc.out.splitlines()
  ranks = [ln for ln in lines if ln.startswith("  ") and ln.split()[0].isdigit()]
  assert len(ranks) == len(NAMES)  # one line per match: no injected rank line
  assert not any(ln.split()[2:3] == ["/etc/evil.jpg.png"] for ln in lines)  # the injected one
