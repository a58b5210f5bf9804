"""Calibration curves: what a duplicate threshold means in precision, for given weights.

A curve is measured by `python -m bench.copydetect --dedup` on the offline copy-detection
benchmark (photos, their transformed copies, distractors): for each threshold, the precision of
the pairs that the grouping puts together and the recall of the copies (the fraction grouped with
their original). It holds for one extractor (weights,
descriptor, preprocessing, precision, dim), one set of collection statistics and one linkage, and
is stored with the weights:

  WEIGHTS_DIR/calibration.json                       converted weights (next to the checkpoint)
  weights/calibration/random_<config>_seed<N>.json   seeded random weights (deterministic, so the
                                                     curve is reproducible and ships with the code)

File format (version 1)::

  {"format_version": 1, "weights": "<params fingerprint>",
   "curves": [{"extractor": {...Extractor.fingerprint()...}, "statistics": "none",
               "linkage": "complete", "benchmark": {...what was measured, when...},
               "points": [{"threshold": t, "precision": p, "recall": r, "pairs": n}, ...]}]}

Points are sorted by threshold, increasing. The precision of a threshold is measured on the
benchmark's mix of copies and distinct photos; a collection with fewer duplicates has more false
pairs per true one, so it is an estimate, stated as such.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

from engine.common.errors import UserError
from engine.common.fileio import atomic_write_json

FORMAT_VERSION = 1
FILE = "calibration.json"
RANDOM_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "weights",
  "calibration",
)
# Named tiers -> the precision of pairs they ask for.
TIERS = {"exact": 0.99, "near": 0.95, "similar": 0.8}


class CalibrationError(UserError):
  """A calibration file that is missing, unreadable or does not fit the index."""


def path_for(weights_spec: str | None, weights_fingerprint: str) -> str | None:
  """Where the calibration of these weights lives (None: nowhere it could)."""
  if weights_fingerprint.startswith("random:"):
    # "random:vgg16:seed=0" -> random_vgg16_seed0.json
    parts = weights_fingerprint.replace("seed=", "seed").split(":")
    return os.path.join(RANDOM_DIR, "_".join(parts) + ".json")
  if weights_spec and os.path.isdir(weights_spec):
    return os.path.join(weights_spec, FILE)
  return None


def _fail(path: str, why: str) -> CalibrationError:
  return CalibrationError(f"calibration file {path}: {why}")


def _check_points(path: str, points) -> list[dict]:
  if not isinstance(points, list) or not points:
    raise _fail(path, "a curve has no points")
  out, last = [], -math.inf
  for p in points:
    try:
      t, prec, rec, n = (p["threshold"], p["precision"], p["recall"], p["pairs"])
    except (KeyError, TypeError) as e:
      raise _fail(path, f"a point lacks {e}") from e
    nums = (t, prec, rec)
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in nums):
      raise _fail(path, f"non-numeric point {p!r}")
    if not (-1 <= t <= 1 and 0 <= prec <= 1 and 0 <= rec <= 1) or not isinstance(n, int) or n < 0:
      raise _fail(path, f"point out of range {p!r}")
    if t <= last:
      raise _fail(path, "points are not sorted by increasing threshold")
    last = t
    out.append({"threshold": float(t), "precision": float(prec), "recall": float(rec), "pairs": n})
  return out


def load(path: str) -> dict:
  """Reads and validates a calibration file."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise _fail(path, "missing") from e
  except (OSError, ValueError) as e:
    raise _fail(path, f"unreadable ({e})") from e
  if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
    raise _fail(path, f"unsupported format (want format_version {FORMAT_VERSION})")
  if not isinstance(data.get("weights"), str) or not isinstance(data.get("curves"), list):
    raise _fail(path, "want string 'weights' and a list of 'curves'")
  for c in data["curves"]:
    if not isinstance(c, dict) or not isinstance(c.get("extractor"), dict):
      raise _fail(path, "a curve lacks its extractor")
    if not isinstance(c.get("statistics"), str) or not isinstance(c.get("linkage"), str):
      raise _fail(path, "a curve lacks its statistics or linkage")
    c["points"] = _check_points(path, c.get("points"))
  return data


def save_curve(path: str, curve: Mapping) -> None:
  """Adds `curve` to the file at `path` (created if missing), replacing the curve of the same
  extractor, statistics and linkage; written atomically."""
  weights = curve["extractor"]["weights"]
  data = {"format_version": FORMAT_VERSION, "weights": weights, "curves": []}
  if os.path.exists(path):
    data = load(path)
    if data["weights"] != weights:
      raise _fail(path, f"holds curves of weights {data['weights']}, not {weights}")
  _check_points(path, curve["points"])
  same = ("extractor", "statistics", "linkage")
  data["curves"] = [c for c in data["curves"] if any(c[f] != curve[f] for f in same)]
  data["curves"].append(json.loads(json.dumps(dict(curve))))
  atomic_write_json(path, data)


def find_curve(
  metadata: Mapping, statistics: str = "none", linkage: str = "complete"
) -> tuple[dict | None, str]:
  """The curve measured for an index's extractor, statistics and linkage.

  Returns:
    (curve, "") or (None, why there is none: a sentence for the user).
  Raises:
    CalibrationError: a calibration file exists but is damaged or belongs to other weights.
  """
  fp = metadata.get("extractor")
  if not isinstance(fp, dict) or not isinstance(fp.get("weights"), str):
    return None, "the index does not record its extractor's weights"
  path = path_for(metadata.get("weights_spec"), fp["weights"])
  if path is None or not os.path.exists(path):
    where = f" (looked for {path})" if path else ""
    return None, f"no calibration for weights {fp['weights'][:24]}{where}"
  data = load(path)
  if data["weights"] != fp["weights"]:
    raise _fail(path, f"is for weights {data['weights']}, the index uses {fp['weights']}")
  for c in data["curves"]:
    if c["extractor"] == fp and c["statistics"] == statistics and c["linkage"] == linkage:
      return c, ""
  return None, (
    f"{path} has no curve for this index's descriptor and settings ({fp.get('descriptor')}, "
    f"{fp.get('preprocessing')}, statistics {statistics}, linkage {linkage}): run "
    "`python -m bench.copydetect --dedup` with them"
  )


def threshold_for(curve: Mapping, precision: float) -> dict:
  """The lowest threshold whose precision, and that of every higher threshold measured, reaches
  `precision` (the most recall for it); thresholds that grouped no pair count for nothing. Returns
  that point.

  Raises:
    CalibrationError: no measured threshold reaches it.
  """
  points: Sequence[dict] = curve["points"]
  best = None
  for p in reversed(points):
    if not p["pairs"]:
      continue  # nothing grouped there: no measure of precision, and nothing to show
    if p["precision"] < precision:
      break
    best = p
  if best is None:
    top = max(points, key=lambda p: (p["pairs"] > 0, p["precision"], p["threshold"]))
    raise CalibrationError(
      f"no threshold reaches precision {precision} on the calibration benchmark (best "
      f"{top['precision']:.3f} at threshold {top['threshold']:.4f}): ask for less, or give "
      "--threshold"
    )
  return best


def expected_at(curve: Mapping, threshold: float) -> dict | None:
  """The measured point at the highest calibrated threshold <= `threshold` (None: below them all)."""
  below = [p for p in curve["points"] if p["threshold"] <= threshold + 1e-9]
  return below[-1] if below else None
