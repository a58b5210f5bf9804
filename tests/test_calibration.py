"""Calibration curves: stored with the weights, validated, and turned into thresholds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine.app import calibration, dedup
from engine.common.errors import UserError
from engine.store import Index

FP = {
  "model": "tiny",
  "weights": "f" * 64,
  "weights_source": "torchvision",
  "descriptor": {"name": "gem", "p": 3.0},
  "preprocessing": {"convention": "torch", "resize": "keep_aspect", "size": 64},
  "precision": "fp32",
  "dim": 4,
}
POINTS = [
  {"threshold": 0.5, "precision": 0.40, "recall": 1.0, "pairs": 90},
  {"threshold": 0.7, "precision": 0.96, "recall": 0.9, "pairs": 30},
  {"threshold": 0.8, "precision": 0.93, "recall": 0.8, "pairs": 28},  # noise: a dip
  {"threshold": 0.9, "precision": 0.97, "recall": 0.6, "pairs": 20},
  {"threshold": 0.95, "precision": 0.99, "recall": 0.3, "pairs": 9},
  {"threshold": 1.0, "precision": 1.0, "recall": 0.0, "pairs": 0},  # nothing grouped
]


def _curve(**kw):
  return {
    "extractor": FP,
    "statistics": "none",
    "linkage": "complete",
    "benchmark": {"tool": "test"},
    "points": POINTS,
    **kw,
  }


@pytest.fixture
def weights_dir(tmp_path):
  d = tmp_path / "weights"
  d.mkdir()
  return str(d)


def _index(tmp_path, weights_dir, fp=FP):
  idx = Index.create(
    tmp_path / "idx",
    dim=4,
    dtype="float32",
    metadata={"extractor": fp, "weights_spec": weights_dir},
  )
  idx.add(np.eye(4, dtype=np.float32), [f"k{i}" for i in range(4)])
  return idx


def test_a_precision_target_picks_the_lowest_threshold_that_holds_above(tmp_path, weights_dir):
  calibration.save_curve(os.path.join(weights_dir, calibration.FILE), _curve())
  with _index(tmp_path, weights_dir) as idx:
    sel = dedup.select_threshold(idx, precision=0.95)
    assert sel.threshold == 0.9, "0.7 reaches 0.96, but 0.8 above it does not"
    assert "expected precision 0.970" in sel.describe()
    assert dedup.select_threshold(idx, tier="similar").threshold == 0.7
    assert dedup.select_threshold(idx).chosen_by.startswith("default --tier=exact")
    raw = dedup.select_threshold(idx, threshold=0.92)
    assert raw.threshold == 0.92 and raw.expected["precision"] == 0.97
    assert dedup.select_threshold(idx, threshold=0.1).expected is None
    with pytest.raises(calibration.CalibrationError, match="no threshold reaches precision 0.999"):
      dedup.select_threshold(idx, precision=0.999)
    with pytest.raises(UserError, match="give one of"):
      dedup.select_threshold(idx, precision=0.9, threshold=0.5)


def test_missing_calibration_says_so_and_raw_thresholds_still_work(tmp_path, weights_dir):
  with _index(tmp_path, weights_dir) as idx:
    sel = dedup.select_threshold(idx, threshold=0.5)
    assert sel.expected is None and "no calibration" in sel.describe()
    assert dedup.select_threshold(idx).threshold == dedup.UNCALIBRATED_THRESHOLD
    with pytest.raises(calibration.CalibrationError, match="needs a calibration.*--threshold"):
      dedup.select_threshold(idx, tier="near")


def test_a_curve_for_other_settings_is_not_used(tmp_path, weights_dir):
  other = {**FP, "preprocessing": {**FP["preprocessing"], "size": 320}}
  calibration.save_curve(os.path.join(weights_dir, calibration.FILE), _curve(extractor=other))
  with (
    _index(tmp_path, weights_dir) as idx,
    pytest.raises(calibration.CalibrationError, match="no curve for this index"),
  ):
    dedup.select_threshold(idx, precision=0.9)
  calibration.save_curve(os.path.join(weights_dir, calibration.FILE), _curve())
  data = calibration.load(os.path.join(weights_dir, calibration.FILE))
  assert len(data["curves"]) == 2
  calibration.save_curve(os.path.join(weights_dir, calibration.FILE), _curve())
  assert len(calibration.load(os.path.join(weights_dir, calibration.FILE))["curves"]) == 2


@pytest.mark.parametrize(
  "damage, message",
  [
    (lambda d: d.update(format_version=7), "unsupported format"),
    (lambda d: d.update(weights="0" * 64), "is for weights"),
    (lambda d: d["curves"][0]["points"].reverse(), "not sorted"),
    (lambda d: d["curves"][0]["points"][0].update(precision=1.5), "out of range"),
    (lambda d: d["curves"][0]["points"][0].update(threshold="x"), "non-numeric"),
    (lambda d: d["curves"][0]["points"][0].pop("recall"), "lacks"),
    (lambda d: d["curves"][0].pop("statistics"), "statistics"),
  ],
)
def test_damaged_files_are_refused_with_the_reason(tmp_path, weights_dir, damage, message):
  path = os.path.join(weights_dir, calibration.FILE)
  calibration.save_curve(path, _curve())
  with open(path) as f:
    data = json.load(f)
  damage(data)
  with open(path, "w") as f:
    json.dump(data, f)
  with (
    _index(tmp_path, weights_dir) as idx,
    pytest.raises(calibration.CalibrationError, match=message),
  ):
    dedup.select_threshold(idx, precision=0.9)


def test_truncated_file_is_refused(tmp_path, weights_dir):
  path = os.path.join(weights_dir, calibration.FILE)
  calibration.save_curve(path, _curve())
  with open(path, "r+b") as f:
    f.truncate(40)
  with (
    _index(tmp_path, weights_dir) as idx,
    pytest.raises(calibration.CalibrationError, match="unreadable"),
  ):
    dedup.select_threshold(idx, tier="near")


def test_random_weights_have_their_own_file():
  path = calibration.path_for("random", "random:vgg16:seed=0")
  assert path.endswith(os.path.join("weights", "calibration", "random_vgg16_seed0.json"))
  assert calibration.path_for("random:7", "random:tiny:seed=7").endswith("random_tiny_seed7.json")
  assert calibration.path_for("/no/such/folder", "abc") is None


def test_shipped_calibration_files_are_valid():
  """Every curve committed for random weights loads, and is monotone enough to be used."""
  if not os.path.isdir(calibration.RANDOM_DIR):
    pytest.skip("no calibration shipped")
  names = [n for n in os.listdir(calibration.RANDOM_DIR) if n.endswith(".json")]
  for name in names:
    data = calibration.load(os.path.join(calibration.RANDOM_DIR, name))
    assert calibration.path_for("random", data["weights"]).endswith(name)
    for c in data["curves"]:
      assert c["points"][-1]["precision"] >= c["points"][0]["precision"]


def test_default_falls_back_to_the_most_precise_point(tmp_path, weights_dir):
  low = [dict(p, precision=min(p["precision"], 0.9)) for p in POINTS]
  calibration.save_curve(os.path.join(weights_dir, calibration.FILE), _curve(points=low))
  with _index(tmp_path, weights_dir) as idx:
    sel = dedup.select_threshold(idx)
    assert sel.threshold == 0.95 and "not reached" in sel.chosen_by
    with pytest.raises(calibration.CalibrationError):
      dedup.select_threshold(idx, tier="near")
