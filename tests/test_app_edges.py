"""Edges of the app layer: k beyond the size of the index, the dtype of an existing index."""

import pytest
from conftest import write_image

from engine.app import indexing, retrieval
from engine.common.errors import UserError
from engine.features.extractor import Extractor


@pytest.fixture(scope="module")
def three(tmp_path_factory):
  folder = tmp_path_factory.mktemp("three")
  for i in range(3):
    write_image(folder / f"{i}.png", seed=i)
  index = str(tmp_path_factory.mktemp("idx") / "i")
  extractor = Extractor("random:4", "gem", config="tiny", image_size=64, backend="xla")
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
