"""`Catalog.recover` on its own: its contract, row by row, on a hand-built catalog."""

from __future__ import annotations

from engine.store import catalog as catalog_lib


def _row(key, segment, row, gen):
  return (key, segment, row, "0" * 64, 1, 1, gen)


def test_recover_drops_unlisted_segments_newer_rows_and_newer_tombstones(tmp_path):
  cat = catalog_lib.Catalog(str(tmp_path), False, must_exist=False)
  try:
    cat.commit_rows([_row("a", "s1", 0, 1), _row("b", "s1", 1, 1)], [], 1)
    cat.commit_rows([_row("c", "s2", 0, 2)], [("s1", 0)], 2)
    # generation 3 never landed in the manifest: a row of a live segment (as a hand edit or a
    # future writer could leave), a row of a new segment, a tombstone
    cat.commit_rows([_row("d", "s2", 1, 3), _row("e", "s3", 0, 3)], [("s1", 1)], 3)
    cat.recover(["s1", "s2"], 2)
    assert cat.newest_generation() == 2
    assert list(cat.segment_rows("s1", 99)) == [(0, "a", True), (1, "b", False)]
    assert list(cat.segment_rows("s2", 99)) == [(0, "c", False)]
    assert list(cat.segment_rows("s3", 99)) == []
    cat.recover(["s2"], 2)  # a segment dropped from the manifest loses its rows
    assert list(cat.segment_rows("s1", 99)) == []
  finally:
    cat.close()
