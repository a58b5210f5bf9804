"""Retrieval-quality metrics (bench/metrics.py), their converters and the copy-detection bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import binlib
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import metrics

# ------------------------------------------------------------------------------ AP by hand


def test_ap_trapezoid_two_relevant():
  # ranking a x b y, relevant {a, b}: hits at 0-based ranks 0 and 2, recall step 1/2.
  # hit 1: left precision 1 (start of the curve), right 1/1 -> (1 + 1)/2 * 1/2 = 0.5
  # hit 2: left 1/2 (1 hit in 2 items), right 2/3       -> (1/2 + 2/3)/2 * 1/2 = 7/24
  # AP = 12/24 + 7/24 = 19/24
  ranking = ["a", "x", "b", "y"]
  ranks, n = metrics.positive_ranks(ranking, {"a", "b"})
  assert ranks == [0, 2] and n == 2
  assert metrics.ap_from_ranks(ranks, n) == pytest.approx(19 / 24)
  assert metrics.compute_ap_cpp(ranking, {"a", "b"}, set()) == pytest.approx(19 / 24)
  # non-interpolated: mean of precision at each hit = (1 + 2/3)/2 = 5/6
  assert metrics.ap_from_ranks(ranks, n, "noninterpolated") == pytest.approx(5 / 6)


def test_ap_junk_is_removed_before_scoring():
  # ranking j x a b, relevant {a, b}, junk {j}. Cleaned ranking: x a b -> hits at ranks 1, 2.
  # hit 1: left 0/1 = 0, right 1/2 -> (0 + 1/2)/2 * 1/2 = 1/8
  # hit 2: left 1/2, right 2/3     -> (1/2 + 2/3)/2 * 1/2 = 7/24
  # AP = 3/24 + 7/24 = 10/24 = 5/12
  ranking = ["j", "x", "a", "b"]
  ranks, n = metrics.positive_ranks(ranking, {"a", "b"}, ignore={"j"})
  assert ranks == [1, 2]
  assert metrics.ap_from_ranks(ranks, n) == pytest.approx(5 / 12)
  assert metrics.compute_ap_cpp(ranking, {"a", "b"}, {"j"}) == pytest.approx(5 / 12)
  # Without removing it the junk counts as a miss: hits at ranks 2, 3.
  # (0 + 1/3)/2 * 1/2 = 1/12; (1/3 + 2/4)/2 * 1/2 = 5/24 -> AP = 2/24 + 5/24 = 7/24
  ranks, n = metrics.positive_ranks(ranking, {"a", "b"})
  assert metrics.ap_from_ranks(ranks, n) == pytest.approx(7 / 24)


def test_ap_single_relevant_and_truncated_ranking():
  # One relevant item at 0-based rank r > 0: trapezoid (0/r + 1/(r+1))/2 = 1/(2(r+1)).
  assert metrics.ap_from_ranks([0], 1) == pytest.approx(1.0)
  assert metrics.ap_from_ranks([1], 1) == pytest.approx(1 / 4)
  assert metrics.ap_from_ranks([4], 1) == pytest.approx(1 / 10)
  assert metrics.ap_from_ranks([4], 1, "noninterpolated") == pytest.approx(1 / 5)
  # A relevant item missing from a truncated ranking adds nothing: a x with {a, b} -> 1/2.
  ranks, n = metrics.positive_ranks(["a", "x"], {"a", "b"})
  assert metrics.ap_from_ranks(ranks, n) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    metrics.ap_from_ranks([], 0)


def test_ap_matches_the_official_compute_ap_on_random_rankings():
  rng = np.random.default_rng(7)
  for _ in range(200):
    n = int(rng.integers(3, 40))
    keys = [f"k{i}" for i in rng.permutation(n)]
    pos = set(rng.choice(keys, int(rng.integers(1, n)), replace=False))
    amb = set(rng.choice(keys, int(rng.integers(0, n // 3 + 1)), replace=False)) - pos
    cut = keys[: int(rng.integers(1, n + 1))]
    ranks, n_rel = metrics.positive_ranks(cut, pos, amb)
    assert metrics.ap_from_ranks(ranks, n_rel) == pytest.approx(
      metrics.compute_ap_cpp(cut, pos, amb), abs=1e-12
    )


# ------------------------------------------------------------------------------ protocols


def test_evaluate_oxford_junk_and_recall():
  truth = {
    "protocol": "oxford",
    "queries": {
      "q1": {"image": "a", "relevant": ["a", "b"], "junk": ["j"]},
      "q2": {"image": "c", "relevant": ["c"]},
    },
  }
  rankings = {"q1": ["j", "x", "a", "b"], "q2": ["x", "c", "j"]}
  res = metrics.evaluate(rankings, truth, ks=(1, 2))
  # q1 = 5/12 (above); q2: c at rank 1 -> 1/4. mAP = (5/12 + 3/12)/2 = 1/3.
  assert res["per_query"]["q1"]["ap"] == pytest.approx(5 / 12)
  assert res["per_query"]["q2"]["ap"] == pytest.approx(1 / 4)
  assert res["map"] == pytest.approx(1 / 3)
  # recall@1: q1 0 (x first after junk removal), q2 0; recall@2: q1 1/2, q2 1 -> 3/4.
  assert res["recall@1"] == 0.0
  assert res["recall@2"] == pytest.approx(0.75)


def test_evaluate_holidays_excludes_the_query_itself():
  truth = {"protocol": "holidays", "queries": {"100000": {"relevant": ["100001", "100002"]}}}
  # The query ranks itself first; removed, the ranking is 100001 x 100002 -> 19/24 as above.
  ranking = ["100000", "100001", "x", "100002"]
  assert metrics.evaluate({"100000": ranking}, truth)["map"] == pytest.approx(19 / 24)
  # Kept (plain protocol) it is a miss: hits at 1 and 3 -> (0 + 1/2)/4 + (1/3 + 1/2)/4 = 1/3.
  truth["protocol"] = "plain"
  assert metrics.evaluate({"100000": ranking}, truth)["map"] == pytest.approx(1 / 3)


def test_evaluate_counts_missing_queries_as_zero():
  truth = {"protocol": "plain", "queries": {"a": {"relevant": ["x"]}, "b": {"relevant": ["y"]}}}
  res = metrics.evaluate({"a": ["x"]}, truth)
  assert res["map"] == pytest.approx(0.5) and res["missing"] == ["b"]


# ------------------------------------------------------------------------------ converters


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_oxford_converter(tmp_path):
  gt = tmp_path / "gt"
  _write(gt / "all_souls_1_query.txt", "oxc1_all_souls_000013 136.5 34.1 648.5 955.7\n")
  _write(gt / "all_souls_1_good.txt", "all_souls_000013\nall_souls_000026\n")
  _write(gt / "all_souls_1_ok.txt", "all_souls_000040\nall_souls_000026\n")
  _write(gt / "all_souls_1_junk.txt", "all_souls_000091\n")
  # Paris style: no oxc1_ prefix, an empty junk list.
  _write(gt / "defense_2_query.txt", "paris_defense_000605 10 20 30 40\n")
  _write(gt / "defense_2_good.txt", "paris_defense_000041\n")
  _write(gt / "defense_2_ok.txt", "")
  _write(gt / "defense_2_junk.txt", "")
  truth = metrics.oxford_to_truth(gt)
  assert truth["protocol"] == "oxford"
  assert truth["queries"]["all_souls_1"] == {
    "image": "all_souls_000013",
    "bbox": [136.5, 34.1, 648.5, 955.7],
    "relevant": ["all_souls_000013", "all_souls_000026", "all_souls_000040"],
    "junk": ["all_souls_000091"],
  }
  assert truth["queries"]["defense_2"]["image"] == "paris_defense_000605"
  assert truth["queries"]["defense_2"]["junk"] == []
  out = tmp_path / "truth.json"
  metrics.save_truth(truth, out)
  assert metrics.load_truth(out) == truth
  (gt / "defense_2_junk.txt").unlink()
  with pytest.raises(ValueError, match="defense_2_junk"):
    metrics.oxford_to_truth(gt)


def test_holidays_converter(tmp_path):
  names = ["100000.jpg", "100001.jpg", "100002.jpg", "100100.jpg", "100101.jpg", "100200.jpg"]
  for n in [*names, "README.txt"]:
    _write(tmp_path / "jpg" / n, "")
  truth = metrics.holidays_to_truth(tmp_path / "jpg")
  assert truth == {
    "protocol": "holidays",
    "queries": {
      "100000": {"image": "100000", "relevant": ["100001", "100002"], "junk": []},
      "100100": {"image": "100100", "relevant": ["100101"], "junk": []},
    },  # scene 1002 has only its query: nothing to find, dropped
  }
  with pytest.raises(ValueError):
    metrics.holidays_to_truth(["100001.jpg"])


def test_load_truth_rejects_bad_files(tmp_path):
  p = tmp_path / "t.json"
  p.write_text(json.dumps({"protocol": "nope", "queries": {}}))
  with pytest.raises(ValueError, match="protocol"):
    metrics.load_truth(p)
  p.write_text(json.dumps({"queries": {"q": {"relevant": []}}}))
  with pytest.raises(ValueError, match="no relevant"):
    metrics.load_truth(p)


# ------------------------------------------------------------------------------ with an index


def _holidays_index(path):
  """Five 2-d unit vectors at known angles, keyed like Holidays files."""
  from engine.store import Index

  angles = {"100000": 0, "100001": 10, "100100": 20, "100002": 35, "100101": 90}
  vecs = np.array([[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in angles.values()])
  with Index.create(path, dim=2, dtype="float32") as idx:
    idx.add(vecs, [f"/photos/{k}.jpg" for k in angles])


def test_quality_against_an_index(tmp_path):
  from bench import quality
  from engine.store import Index

  _holidays_index(tmp_path / "idx")
  truth = metrics.holidays_to_truth([f"{k}.jpg" for k in ("100000", "100001", "100002")])
  truth["queries"]["100100"] = {"image": "100100", "relevant": ["100101"]}
  with Index.open(tmp_path / "idx", readonly=True) as idx:
    q = quality.query_vectors(idx, truth, "index", None, False)
    ranked = metrics.rank_with_index(idx, q)
  res = metrics.evaluate(dict(zip(truth["queries"], ranked, strict=True)), truth)
  # From 0 deg: self, 100001 (10), 100100 (20), 100002 (35), 100101 (90); self removed the
  # relevant ones are at ranks 0 and 2 -> 19/24. From 20 deg: self, 100001 (10 away), 100002 (15),
  # 100000 (20), 100101 (70): 100101 at rank 3 -> (0 + 1/4)/2 = 1/8. mAP = (19/24 + 3/24)/2.
  assert res["per_query"]["100000"]["ap"] == pytest.approx(19 / 24)
  assert res["per_query"]["100100"]["ap"] == pytest.approx(1 / 8)
  assert res["map"] == pytest.approx(11 / 24)
  assert res["recall@1"] == pytest.approx(0.25) and res["recall@10"] == pytest.approx(1.0)


def test_quality_binary(tmp_path):
  _holidays_index(tmp_path / "idx")
  for k in ("100000", "100001", "100002", "100100", "100101"):
    _write(tmp_path / "jpg" / f"{k}.jpg", "")
  truth, out = tmp_path / "truth.json", tmp_path / "res.json"
  run = lambda *a: binlib.run("bench.quality", f"--ground_truth={truth}", *a)
  run(f"--convert_holidays={tmp_path / 'jpg'}")
  r = run(f"--index={tmp_path / 'idx'}", f"--output={out}")
  assert json.loads(out.read_text())["map"] == pytest.approx(11 / 24)
  assert "holidays" in r.out.splitlines()[-1]


def test_quality_extracts_cropped_queries_with_the_index_extractor(tmp_path):
  from PIL import Image

  from bench import quality
  from engine.features.extractor import Extractor
  from engine.store import Index

  ex = Extractor("random:1", "gem", config="tiny", image_size=64, batch_size=2)
  rng = np.random.default_rng(3)
  files = {}
  for name in ("q0", "a1", "b2"):
    files[name] = tmp_path / "jpg" / f"{name}.png"
    files[name].parent.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).save(files[name])
  with Index.create(
    tmp_path / "idx", dim=ex.dim, dtype="float32", metadata=ex.index_metadata()
  ) as idx:
    idx.add(ex([str(p) for p in files.values()]), [str(p) for p in files.values()])
  truth = {
    "protocol": "oxford",
    "queries": {"q": {"image": "q0", "bbox": [8, 4, 72, 52], "relevant": ["a1"]}},
  }
  with Index.open(tmp_path / "idx", readonly=True) as idx:
    got = quality.query_vectors(idx, truth, "extract", str(tmp_path / "jpg"), crop=True)
    whole = quality.query_vectors(idx, truth, "index", None, crop=False)
  crop = np.asarray(Image.open(files["q0"]).convert("RGB"))[4:52, 8:72]
  np.testing.assert_allclose(got, ex.extract_arrays([crop]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, whole, atol=1e-3)  # the crop changed the descriptor


# ------------------------------------------------------------------------------ copy detection


def test_copydetect_one_pass_equals_the_extractor():
  from bench import copydetect
  from engine.features import images
  from engine.features.extractor import Extractor

  rng = np.random.default_rng(0)
  pixels = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(3)]
  pixels.append(rng.integers(0, 256, (64, 48, 3), np.uint8))
  for names, size in ((["fc2", "pool5"], None), (["mac", "spoc", "gem", "rmac"], 64)):
    base = Extractor("random:2", names[0], batch_size=2, config="tiny", image_size=size)
    prepared = [images.from_array(p, base.preprocessing) for p in pixels]
    got = copydetect.extract_many(base, names, prepared)
    for n in names:
      ref = Extractor("random:2", n, batch_size=2, config="tiny", image_size=size)
      np.testing.assert_allclose(got[n], ref.extract_arrays(pixels), rtol=1e-5, atol=1e-6)


def test_copydetect_dataset_and_baseline():
  from PIL import Image

  from bench import copydetect
  from engine.features.preprocess import Preprocessing

  photos = copydetect.generated_photos(2, seed=1)
  pre = {"pooled": Preprocessing("torch", "keep_aspect", 64)}
  db, keys, queries, truth = copydetect.build_dataset(
    photos, copydetect.generated_photos(3, seed=2), ["hflip", "logo", "rot45"], pre
  )
  assert keys == [
    "orig/scene_000", "orig/scene_001", *(f"distractor/scene_{i:03d}" for i in range(3))
  ]  # fmt: skip
  assert len(queries) == 6 and len(truth["queries"]) == 6
  assert truth["queries"]["scene_001/logo"]["relevant"] == ["orig/scene_001"]
  assert all(max(p.shape[:2]) == 64 for p in queries.pixels["pooled"])
  for name in copydetect.PIXEL_BASELINES:
    v = copydetect.pixel_baseline(db.thumbs, name)
    assert v.shape == (5, 768)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
  img = photos[0][1]
  for name, fn in copydetect.TRANSFORMS.items():
    out = fn(img)
    assert isinstance(out, Image.Image) and out.mode == "RGB", name


def test_copydetect_small_run(tmp_path):
  out = tmp_path / "cd.json"
  r = binlib.run(
    "bench.copydetect", "--small", "--transforms=hflip,crop80,jpeg20", "--descriptors=fc2,gem",
    f"--output={out}",
  )  # fmt: skip
  res = json.loads(out.read_text())
  got = {(row["weights"], row["descriptor"], row["dtype"]) for row in res["rows"]}
  assert ("random", "gem", "int8") in got and ("pixels", "pix16", "float32") in got
  for row in res["rows"]:
    assert set(row["by_transform"]) == {"hflip", "crop80", "jpeg20"}
    assert 0.0 <= row["all"]["map"] <= 1.0
  assert "recall@1 per transformation" in r.out


def test_bench_modules_import_side_by_side():
  # Flags are defined only under __main__, so the bench modules import together without clashes.
  import importlib

  for name in ("quality", "copydetect", "pipeline", "scaling"):
    importlib.import_module(f"bench.{name}")
  from bench import scaling

  # int8 at N = 1e6, D = 512: 512 MB of codes + 4 MB of scales at 30 GB/s = 17.2 ms;
  # Q = 100: 2 * 1e6 * 512 * 100 = 102.4 GFLOP at 1200 GFLOP/s = 85.3 ms.
  f = scaling.floors(1_000_000, 512, 100, "int8", 30.0, {"int8": 1200.0})
  assert f["memory_s"] == pytest.approx(516e6 / 30e9)
  assert f["compute_s"] == pytest.approx(102.4 / 1200)


def test_bench_is_a_package_run_without_path_edits():
  """`python -m bench.NAME` from the repository root finds engine and bench as they are."""
  folder = os.path.join(REPO, "bench")
  assert os.path.isfile(os.path.join(folder, "__init__.py"))
  for name in sorted(os.listdir(folder)):
    if name.endswith(".py"):
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        assert "sys.path" not in f.read(), name
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run(
    [sys.executable, "-m", "bench.search", "--help"],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=env,
  )
  assert "--n" in r.stdout and "Traceback" not in r.stderr, r.stderr
