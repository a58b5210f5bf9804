"""Edges of the app layer: k beyond the size of the index, the dtype of an existing index, progress."""

import dataclasses
import io
import os
import threading

import pytest
from conftest import write_image

from engine.app import extraction, indexing, report, retrieval, walk
from engine.common.errors import UserError
from engine.features.extractor import IncompatibleExtractorError


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_extractor):
  folder = tmp_path_factory.mktemp("three")
  for i in range(3):
    write_image(folder / f"{i}.png", seed=i)
  index = str(tmp_path_factory.mktemp("idx") / "i")
  extractor = tiny_extractor("gem", weights="random:4", batch_size=16)
  indexing.index_folder(str(folder), index, extractor, progress=False)
  return folder, index, extractor


def test_k_beyond_the_index_returns_what_there_is(three):
  folder, index, extractor = three
  res = retrieval.query_index(index, str(folder / "1.png"), extractor, k=10)
  ((query, pairs),) = res.matches
  assert len(pairs) == 3 and pairs[0][0].endswith("1.png")


def test_an_existing_index_keeps_its_dtype(three):
  folder, index, extractor = three
  with pytest.raises(UserError, match="stores int8 vectors; dtype float16 applies to a new index"):
    indexing.index_folder(str(folder), index, extractor, dtype="float16", progress=False)
  report = indexing.index_folder(str(folder), index, extractor, dtype="int8", progress=False)
  assert report.indexed == 0


def test_one_setting_given_for_an_index_keeps_the_others(three):
  folder, index, extractor = three
  settings = extraction.Settings(weights="auto", config="vgg16", image_size=None)
  same = extraction.for_index(
    index, dataclasses.replace(settings, image_size=64), explicit={"image_size"}
  )
  assert same.fingerprint() == extractor.fingerprint()
  with pytest.raises(IncompatibleExtractorError, match="preprocessing"):
    extraction.for_index(
      index, dataclasses.replace(settings, image_size=96), explicit={"image_size"}
    )


def test_links_to_fifos_and_devices_say_what_they_are(tmp_path):
  os.mkfifo(tmp_path / "pipe")
  (tmp_path / "fifo.jpg").symlink_to(tmp_path / "pipe")
  (tmp_path / "dev.jpg").symlink_to("/dev/null")
  (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing")
  _, bad = walk.split_images(str(tmp_path))
  reasons = {os.path.basename(p): r for p, r in bad}
  assert reasons == {
    "fifo.jpg": "symbolic link to a FIFO, not a file",
    "dev.jpg": "symbolic link to a character device, not a file",
    "gone.jpg": "broken symbolic link",
  }


def test_a_thumbnail_of_a_fifo_does_not_block(tmp_path):
  os.mkfifo(tmp_path / "x.jpg")
  done = []
  t = threading.Thread(target=lambda: done.append(report.thumbnail_uri(str(tmp_path / "x.jpg"))))
  t.daemon = True
  t.start()
  t.join(20)
  assert done == [None]


def test_progress_rate_counts_from_the_first_image(monkeypatch):
  # 60 s of model building and compilation before the first image, then 2 images/s: the ETA must
  # come from the 2 images/s, not from 2 images over 61 s.
  clock = iter([0.0, 60.0, 61.0])
  monkeypatch.setattr(indexing.time, "monotonic", lambda: next(clock))
  out = io.StringIO()
  progress = indexing.Progress(100, out, every_s=0)
  progress.update(1)
  progress.update(3)
  first, second = out.getvalue().splitlines()
  assert first == "1/100 images, ETA ?"
  assert second == "3/100 images, 2.0 images/s, ETA 48 s"
