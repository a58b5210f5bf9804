"""The HTML report under hostile file names: parsed back, no injected element or attribute appears
and every name round-trips as text."""

from __future__ import annotations

import html.parser
import os

import numpy as np
import pytest
from PIL import Image

from engine.app import report

HOSTILE = [
  'a" onmouseover="alert(1)',
  "b' onerror='alert(2)",
  "c&amp;d & e",
  "<script>alert(3)<\\script>",
  "f><img src=x onerror=alert(4)>",
  "quote\"apos'lt<gt>",
  "ctl\x07\x1b\x7f\tend",
  "line\nbreak",
  "&#34;already-escaped&quot;",
  "--><!--",
]

# What the report itself emits: tag -> attributes allowed on it.
ALLOWED = {
  "html": {"lang"},
  "head": set(),
  "meta": {"charset"},
  "title": set(),
  "style": set(),
  "body": set(),
  "h1": set(),
  "h2": set(),
  "p": {"class"},
  "div": {"class", "title"},
  "figure": {"class"},
  "img": {"src", "alt", "title"},
  "figcaption": set(),
  "br": set(),
  "span": {"class"},
}


class _Page(html.parser.HTMLParser):
  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags = []  # (tag, attrs dict)
    self.stack = []
    self.text = {}  # tag -> list of text pieces directly inside it
    self.comments = []

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs), len(attrs)))
    if tag not in ("meta", "img", "br"):
      self.stack.append(tag)

  def handle_endtag(self, tag):
    assert self.stack and self.stack[-1] == tag, (tag, self.stack)
    self.stack.pop()

  def handle_data(self, data):
    if self.stack:
      self.text.setdefault(self.stack[-1], []).append(data)

  def handle_comment(self, data):
    self.comments.append(data)


def _parse(text: str) -> _Page:
  page = _Page()
  page.feed(text)
  page.close()
  assert not page.stack, page.stack
  return page


def _photo(path):
  arr = np.random.default_rng(len(path)).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  Image.fromarray(arr).save(path, "PNG")


@pytest.fixture
def hostile_files(tmp_path):
  folder = tmp_path / 'dir "&<x>'
  folder.mkdir()
  paths = []
  for i, name in enumerate(HOSTILE):
    p = os.path.join(folder, f"{name}.png")
    if i % 3 != 2:  # some decodable (an <img>), some missing (the placeholder <div>)
      _photo(p)
    paths.append(p)
  return paths


def _check_page(text, title, note, rows):
  page = _parse(text)
  for tag, attrs, n_attrs in page.tags:
    assert tag in ALLOWED, tag
    assert set(attrs) <= ALLOWED[tag], (tag, attrs)
    assert len(attrs) == n_attrs  # no attribute given twice
    assert not any(k.startswith("on") for k in attrs)
  assert not page.comments
  assert page.text["title"] == [title] and page.text["h1"] == [title]
  if note:
    assert any(tag == "p" and a.get("class") == "note" for tag, a, _ in page.tags)
    assert note in page.text["p"]
  assert page.text["h2"] == [r.title for r in rows]
  titled = [a["title"] for tag, a, _ in page.tags if tag in ("img", "div") and "title" in a]
  want = [p for r in rows for p in ([r.query] if r.query else []) + [m for m, _ in r.matches]]
  assert titled == want  # every full path round-trips through its attribute
  alts = [a["alt"] for tag, a, _ in page.tags if tag == "img"]
  assert alts == [os.path.basename(p) for p in want if os.path.exists(p)]
  captions = "".join(page.text.get("figcaption", []))
  for p in want:
    assert os.path.basename(p) in captions


def test_query_report_with_hostile_names(tmp_path, hostile_files):
  # As engine/query.py builds it: one row per query, its matches as (key, score).
  rows = [
    report.Row(f"query: {q}", q, [(k, 0.5 - 0.01 * j) for j, k in enumerate(hostile_files)])
    for q in hostile_files[:4]
  ]
  title = "Results for " + HOSTILE[0]
  note = "random weights: " + HOSTILE[4]
  out = tmp_path / "r.html"
  report.write(str(out), title, rows, note)
  _check_page(out.read_bytes().decode("utf-8"), title, note, rows)


def test_duplicate_report_with_hostile_names(tmp_path, hostile_files):
  # As engine/dedup.py builds it: groups without a query.
  groups = [hostile_files[:5], hostile_files[5:]]
  rows = [
    report.Row(f"group {i} ({len(g)} images)", None, [(p, 0.9) for p in g])
    for i, g in enumerate(groups, 1)
  ]
  text = report.render("Near-duplicates at 0.9", rows)
  _check_page(text, "Near-duplicates at 0.9", None, rows)


def test_every_attribute_value_is_quoted_and_escaped():
  rows = [report.Row("t", None, [("/nowhere/" + n, 1.0) for n in HOSTILE])]
  text = report.render('x" y', rows, note="<b>")
  assert "onmouseover=" not in text.replace("onmouseover=&quot;", "")
  assert "<script>" not in text and "<b>" not in text
  for n in HOSTILE:
    if any(c in n for c in "\"'<>&"):
      assert n not in text
