r"""Duplicate groups on the sample collection: false groups among distinct photos, copies found.

  python -m engine.sample --output=out/s
  python -m engine.index --images=out/s/photos --index=out/s/idx          # photos, then
  python -m engine.index --images=out/s/queries --index=out/s/idx         # their 12 copies
  python -m bench.dedup_sample --index=out/s/idx --ground_truth=out/s/ground_truth.json

For each arm (the index's own scores; and "centered": the index's vectors minus their mean, L2
normalised, in numpy, as collection statistics would give at search time) the threshold of
`--tier` comes from the calibration of the index's weights (`engine.app.calibration`), unless
`--threshold` is given. Reports the groups among the distinct photos (any is a false duplicate),
the copies grouped with their original, and the precision of all grouped pairs.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile

import numpy as np
from absl import app, flags

from bench.copydetect import centre
from engine import store
from engine.app import calibration, grouping


def _evaluate(groups, truth: dict) -> dict:
  label = {q: o for q, o in truth.items()}
  where = {key: i for i, g in enumerate(groups) for key in g.keys}
  found = sum(where.get(q, -1) == where.get(o, -2) for q, o in truth.items())
  total = right = distinct_pairs = 0
  for g in groups:
    for i, a in enumerate(g.keys):
      for b in g.keys[i + 1 :]:
        total += 1
        ok = label.get(a, a) == label.get(b, b)
        right += ok
        distinct_pairs += not ok and a not in truth and b not in truth
  return {
    "groups": len(groups),
    "copies_with_original": found,
    "copies": len(truth),
    "pairs": total,
    "precision": right / total if total else 1.0,
    "false_pairs_among_distinct_photos": distinct_pairs,
  }


def main(argv):
  del argv
  with open(_TRUTH.value, encoding="utf-8") as f:
    truth = json.load(f)
  rows = []
  with store.Index.open(_INDEX.value, readonly=True) as idx:
    meta, dtype = idx.metadata, idx.dtype
    keys, vecs = [], []
    for k, x in idx.iter_chunks():
      keys += k
      vecs.append(x)
  x = np.concatenate(vecs)
  with tempfile.TemporaryDirectory() as tmp:
    for stats in ("none", "centered"):
      y = centre(x, x.mean(axis=0)) if stats == "centered" else x
      if _THRESHOLD.value is not None:
        t, how = _THRESHOLD.value, "--threshold"
      else:
        curve, why = calibration.find_curve(meta, stats, _LINKAGE.value)
        if curve is None:
          print(f"{stats}: {why}")
          continue
        point = calibration.threshold_for(curve, calibration.TIERS[_TIER.value])
        t, how = (
          point["threshold"],
          f"tier {_TIER.value} (benchmark precision {point['precision']:.3f})",
        )
      with store.Index.create(os.path.join(tmp, stats), dim=y.shape[1], dtype=dtype) as tidx:
        tidx.add(y, keys)
        res = _evaluate(grouping.find_groups(tidx, t, linkage=_LINKAGE.value), truth)
      rows.append({"statistics": stats, "threshold": t, "chosen_by": how, **res})
  print(f"{platform.processor() or platform.machine()}; {len(keys)} images, {len(truth)} copies")
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  # Flags exist only when run as a program, so the module stays importable next to others.
  _INDEX = flags.DEFINE_string("index", None, "Index of the sample photos and their copies.")
  _TRUTH = flags.DEFINE_string("ground_truth", None, "engine.sample's ground_truth.json.")
  _TIER = flags.DEFINE_enum("tier", "near", sorted(calibration.TIERS), "Calibrated tier.")
  _THRESHOLD = flags.DEFINE_float("threshold", None, "A raw threshold instead of the tier.")
  _LINKAGE = flags.DEFINE_enum("linkage", "complete", list(grouping.LINKAGES), "Grouping rule.")
  flags.mark_flags_as_required(["index", "ground_truth"])
  app.run(main)
