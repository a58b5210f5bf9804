"""Bad input: every odd image file is indexed or skipped with its reason; odd names survive every
output; bad flags and files end in one line, a non-zero exit and no traceback."""

from __future__ import annotations

import builtins
import concurrent.futures
import html.parser
import json
import os
import shutil
import struct
import zlib

import faultlib
import numpy as np
import pytest
from PIL import Image

from engine import store
from engine.app import indexing, report, sample

NON_UTF8 = os.fsdecode(b"caf\xe9 \xff.jpg")  # Latin-1 bytes: not UTF-8
NON_UTF8_BAD = os.fsdecode(b"bad\xfe.jpg")
LONG = "L" * 251 + ".jpg"  # 255 bytes, the usual file name limit
SCRIPT = "<script>alert(1).jpg"  # no "/": a name, not a folder
SCRIPT_NON_UTF8 = os.fsdecode(b"<script>\xe9.png")


def _scene(seed, size=(96, 72)):
  return sample.scene(np.random.default_rng(seed), *size)


def _png_header_only(path, w, h):
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  path.write_bytes(
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", ihdr)
    + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    + chunk(b"IEND", b"")
  )


def make_torture(folder) -> tuple[set[str], dict[str, str]]:
  """Writes the odd files; returns (paths that must be indexed, {path: reason substring})."""
  folder.mkdir(parents=True)
  good, bad = set(), {}

  def keep(name, img, **kw):
    p = folder / name
    img.save(p, **kw)
    good.add(str(p))

  keep("good.jpg", _scene(1))
  keep("png_named.jpg", _scene(2), format="PNG")  # wrong extension: recognised by content
  frames = [_scene(3 + i) for i in range(3)]
  keep("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
  keep("cmyk.jpg", _scene(6).convert("CMYK"))
  keep("deep16.png", Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)))
  pal = _scene(7).convert("P", palette=Image.ADAPTIVE, colors=16)
  pal.info["transparency"] = 0
  keep("palette_transparent.png", pal, transparency=0)
  keep("one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 40)))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees on display
  keep("exif_rotated.jpg", _scene(8, (120, 64)), exif=exif.tobytes())
  keep(NON_UTF8, _scene(9))
  keep(LONG, _scene(10))
  keep(SCRIPT, _scene(11))
  keep(SCRIPT_NON_UTF8, _scene(12))
  (folder / "sub").mkdir()
  keep("sub/nested.jpg", _scene(13))
  os.symlink("..", folder / "sub" / "loop")  # a folder symlink loop: walked once
  os.symlink("la.jpg", folder / "lb.jpg")  # a file symlink loop
  os.symlink("lb.jpg", folder / "la.jpg")
  bad[str(folder / "la.jpg")] = "broken symbolic link"
  bad[str(folder / "lb.jpg")] = "broken symbolic link"

  (folder / "zero.jpg").write_bytes(b"")
  bad[str(folder / "zero.jpg")] = "empty file"
  (folder / NON_UTF8_BAD).write_bytes(b"")
  bad[str(folder / NON_UTF8_BAD)] = "empty file"
  _scene(14).save(folder / "full.jpg")
  data = (folder / "full.jpg").read_bytes()
  (folder / "full.jpg").unlink()
  (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
  bad[str(folder / "truncated.jpg")] = "truncated"
  (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
  bad[str(folder / "corrupt.png")] = "not a decodable image"
  (folder / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="9"/>')
  bad[str(folder / "vector.svg")] = "not a decodable image"
  _png_header_only(folder / "bomb.png", 20000, 20000)
  bad[str(folder / "bomb.png")] = "too large"
  (folder / "notes.txt").write_text("not an image, silently ignored")
  (folder / "empty_folder").mkdir()
  return good, bad


@pytest.fixture(scope="module")
def tiny(tiny_extractor):
  return tiny_extractor()  # the extractor of faultlib.TINY


def _deny(monkeypatch, path):
  """Permission denied on one file (as root chmod does not stop reads: refuse the open)."""
  if os.geteuid() != 0:
    os.chmod(path, 0)
    return
  real_open, real_access = builtins.open, os.access

  def fake_open(file, *a, **kw):
    if isinstance(file, (str, bytes, os.PathLike)) and os.fspath(file) == path:
      raise PermissionError(13, "Permission denied", path)
    return real_open(file, *a, **kw)

  monkeypatch.setattr(builtins, "open", fake_open)
  monkeypatch.setattr(os, "access", lambda p, m, **kw: p != path and real_access(p, m, **kw))


def test_every_odd_file_is_indexed_or_skipped_with_its_reason(tmp_path, tiny, monkeypatch):
  folder = tmp_path / "torture"
  good, bad = make_torture(folder)
  unreadable = str(folder / "unreadable.jpg")
  _scene(15).save(unreadable)
  bad[unreadable] = "permission denied"
  _deny(monkeypatch, unreadable)
  idx = str(tmp_path / "idx")
  rep = indexing.index_folder(str(folder), idx, tiny, commit_every=4, progress=False)
  monkeypatch.undo()
  failed = dict(rep.failed)
  assert set(failed) == set(bad), set(failed) ^ set(bad)
  for path, reason in bad.items():
    assert reason in failed[path], (path, failed[path])
  assert rep.indexed == len(good)
  live = faultlib.check_index(idx)
  assert sorted(live) == sorted(good)  # the non-UTF-8 names come back exactly
  with store.Index.open(idx, readonly=True) as index:
    assert str(folder / NON_UTF8) in index and index.get_file_stat(str(folder / LONG)) is not None
    # Each key holds its own image's descriptor (int8: within quantisation).
    keys = sorted(good)
    np.testing.assert_allclose(
      index.get_vectors(keys), tiny.extract_paths(keys).features, atol=0.02
    )
  # The failures file lists each with its reason; odd names as their original bytes.
  lines = (tmp_path / "idx" / "last_run_failures.tsv").read_bytes().splitlines()
  assert sorted(ln.split(b"\t")[0] for ln in lines) == sorted(os.fsencode(p) for p in bad)
  again = indexing.index_folder(str(folder), idx, tiny, progress=False)
  assert again.indexed == 1 and again.unchanged == len(good)  # the file readable again


def test_exif_rotation_is_applied(tmp_path, tiny):
  img = _scene(20, (120, 64))
  exif = Image.Exif()
  exif[0x0112] = 6
  img.save(tmp_path / "tagged.png", exif=exif.tobytes())
  img.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
  img.save(tmp_path / "raw.png")
  f = tiny.extract_paths([tmp_path / p for p in ("tagged.png", "upright.png", "raw.png")]).features
  np.testing.assert_allclose(f[0], f[1], atol=1e-5)
  assert not np.allclose(f[0], f[2], atol=1e-3)


def test_folder_without_images_indexes_nothing(tmp_path, tiny):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("hi")
  rep = indexing.index_folder(str(tmp_path / "empty"), str(tmp_path / "idx"), tiny, progress=False)
  assert rep.indexed == rep.unchanged == 0 and not rep.failed


class _Html(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.text, self.tags = [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)

  def handle_data(self, data):
    self.text.append(data)


def test_report_escapes_every_name_including_non_utf8(tmp_path):
  names = [str(tmp_path / n) for n in (SCRIPT, SCRIPT_NON_UTF8, NON_UTF8, LONG)]
  rows = [report.Row(f"query: {n}", n, [(m, 0.5) for m in names]) for n in names]
  report.write(str(tmp_path / "r.html"), f"Results for {names[1]}", rows)
  page = (tmp_path / "r.html").read_bytes().decode("utf-8")  # valid UTF-8 throughout
  parsed = _Html()
  parsed.feed(page)
  assert "script" not in parsed.tags and "<script>" not in page
  assert "&lt;script&gt;\\udce9.png" in page  # odd bytes shown as escapes
  assert any(LONG in t for t in parsed.text)


def test_binaries_on_the_torture_folder(tmp_path):
  folder = tmp_path / "torture"
  good, bad = make_torture(folder)
  idx = str(tmp_path / "idx")
  p = faultlib.run("engine.index", f"--images={folder}", f"--index={idx}", *faultlib.TINY)
  assert f"indexed {len(good)}, unchanged 0, failed {len(bad)}" in p.out
  assert "skipped " + str(folder / NON_UTF8_BAD).encode("utf-8", "backslashreplace").decode() in (
    p.out
  )
  html_path = tmp_path / "r.html"
  q = faultlib.run(
    "engine.query",
    f"--index={idx}",
    f"--query={folder}",
    "--k=1",
    "--format=json",
    f"--html={html_path}",
    "--backend=xla",
  )
  out = json.loads(q.stdout.decode("utf-8"))  # valid UTF-8 JSON; odd bytes as \udcXX escapes
  top = {r["query"]: r["matches"][0]["key"] for r in out["results"]}
  assert set(top) == good and set(top.values()) <= good
  assert os.path.exists(os.fsencode(top[str(folder / NON_UTF8)]))  # round-trips to the bytes
  assert {f["query"] for f in out["failed"]} == set(bad)
  page = html_path.read_bytes().decode("utf-8")
  parsed = _Html()
  parsed.feed(page)
  assert "script" not in parsed.tags and "&lt;script&gt;alert(1).jpg" in page


def test_bad_flags_and_files_fail_in_one_line(tmp_path, tiny):
  photos = tmp_path / "photos"
  faultlib.make_photos(photos, 3)
  query = str(photos / "p000.jpg")
  meta = tiny.index_metadata()
  x = tiny.extract_paths([query]).features

  def make(name, metadata, dim=16, rows=True):
    with store.Index.create(tmp_path / name, dim=dim, metadata=metadata) as idx:
      if rows:
        idx.add(np.resize(x, (1, dim)), [query])
    return str(tmp_path / name)

  good = make("good", meta)
  other = json.loads(json.dumps(meta))
  other["extractor"]["model"] = "vgg16"
  other["weights_spec"] = "random:5"
  dim8 = json.loads(json.dumps(meta))
  dim8["extractor"]["dim"] = 8
  no_weights = tmp_path / "not_weights"
  no_weights.mkdir()
  shutil.copy(query, tmp_path / "undecodable.jpg")
  (tmp_path / "undecodable.jpg").write_bytes(b"\xff\xd8\xff\xe0 no")
  cases = [
    (["engine.query", f"--index={good}", f"--query={query}", f"--weights={no_weights}"], ""),
    (["engine.index", f"--images={photos}", f"--index={tmp_path / 'n'}", "--weights=/no/w"], ""),
    (["engine.query", f"--index={make('empty', meta, rows=False)}", f"--query={query}"], "empty"),
    (["engine.query", f"--index={make('dim8', dim8, dim=8)}", f"--query={query}"], "dim"),
    (
      ["engine.query", f"--index={good}", f"--query={query}", "--config=tiny", "--image_size=96"],
      "",  # extraction.for_index gets descriptor None for engine.query (see the report)
    ),
    (["engine.query", f"--index={make('other', other)}", f"--query={query}"], ""),
    (["engine.query", f"--index={good}", f"--query={query}", "--k=-3"], "k"),
    (
      ["engine.query", f"--index={good}", f"--query={tmp_path / 'undecodable.jpg'}", "--k=1"],
      "decod",
    ),
    (["engine.dedup", f"--index={tmp_path / 'nothing'}"], "no index"),
  ]

  def one(case):
    args, expect = case
    extra = [] if args[0] == "engine.dedup" else ["--backend=xla"]
    return faultlib.run(args[0], *args[1:], *extra, ok=None), case

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for p, (args, expect) in pool.map(one, cases):
      assert p.returncode not in (0, None) and p.returncode > 0, (args, p.out, p.err)
      assert "Traceback" not in p.err, (args, p.err)
      lines = [ln for ln in p.err.splitlines() if ln.strip() and not ln.startswith(("I", "W"))]
      assert lines and expect in p.err, (args, p.err)
