r"""What collection statistics do to scores: distinct photos against copies of one photo.

  python -m bench.statistics --sample=DIR [--work=DIR] [--weights=random] [--descriptor=gem]

Takes a sample collection (`python -m engine.sample --output=DIR`: DIR/photos, DIR/queries and
DIR/ground_truth.json), indexes its photos and its transformed copies with `engine.app.indexing`
(into --work, reused when already there), then, through `Index.search` itself, reports the score
distribution between distinct photos (every photo against every other) and between each copy and
its original: raw, with centering, and with whitening learned on the photos' index
(`Index.learn_statistics`). Prints a table; --output writes JSON.
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np
from absl import app, flags

from engine import store
from engine.app import extraction, indexing
from engine.common.fileio import atomic_write_json

_SAMPLE = flags.DEFINE_string("sample", None, "A sample collection (engine.sample --output).")
_WORK = flags.DEFINE_string("work", None, "Where the indexes go (default: SAMPLE/bench-stats).")
_WEIGHTS = flags.DEFINE_string("weights", "random", "Weights spec (see engine.index --help).")
_DESCRIPTOR = flags.DEFINE_string("descriptor", "gem", "Descriptor.")
_WHITEN = flags.DEFINE_string("whiten", "whiten:32", "The whitening policy compared.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")
flags.mark_flag_as_required("sample")


def _summary(x: np.ndarray) -> dict:
  return {
    "n": int(x.size),
    "median": float(np.median(x)),
    "p01": float(np.percentile(x, 1)),
    "p99": float(np.percentile(x, 99)),
  }


def measure(photos_index: str, copies_index: str, truth: dict[str, str], policies) -> dict:
  """Score summaries per statistics policy (the photos' index re-learns each in turn)."""
  out = {}
  with store.Index.open(copies_index, readonly=True) as cidx:
    copies = [q for q in truth if q in cidx]
    qvecs = cidx.get_vectors(copies)
  with store.Index.open(photos_index) as idx:
    keys = idx.keys()
    vecs = idx.get_vectors(keys)
    for policy in policies:
      idx.learn_statistics(policy)
      s, k = idx.search(vecs, k=len(keys))
      distinct = np.array(
        [v for row, qk in enumerate(keys) for v, kk in zip(s[row], k[row], strict=True) if kk != qk]
      )
      s, k = idx.search(qvecs, k=len(keys))
      to_original = np.array(
        [
          v
          for row, q in enumerate(copies)
          for v, kk in zip(s[row], k[row], strict=True)
          if kk == truth[q]
        ]
      )
      rank1 = float(np.mean([k[row, 0] == truth[q] for row, q in enumerate(copies)]))
      out[policy] = {
        "distinct": _summary(distinct),
        "copy_to_original": _summary(to_original),
        "copies_top1": rank1,
        "statistics_rows": (idx.statistics_info or {}).get("rows"),
      }
    idx.learn_statistics("none")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sample = _SAMPLE.value
  work = _WORK.value or os.path.join(sample, "bench-stats")
  with open(os.path.join(sample, "ground_truth.json"), encoding="utf-8") as f:
    truth = json.load(f)
  settings = extraction.Settings(weights=_WEIGHTS.value, backend="xla")
  idx_paths = {}
  for part in ("photos", "queries"):
    idx_paths[part] = path = os.path.join(work, part + ".idx")
    extractor = extraction.for_index(path, settings, descriptor=_DESCRIPTOR.value)
    indexing.index_folder(os.path.join(sample, part), path, extractor, progress=False)
  policies = ["none", "center", _WHITEN.value]
  res = measure(idx_paths["photos"], idx_paths["queries"], truth, policies)
  print(f"# {platform.processor() or platform.machine()}; {_DESCRIPTOR.value}, {_WEIGHTS.value}")
  print("| statistics | distinct median | distinct p99 | copy-original median | p01 | top-1 |")
  print("|---|---|---|---|---|---|")
  for policy, r in res.items():
    d, c = r["distinct"], r["copy_to_original"]
    print(
      f"| {policy} | {d['median']:.3f} | {d['p99']:.3f} | {c['median']:.3f} | {c['p01']:.3f} "
      f"| {r['copies_top1']:.2f} |"
    )
  if _OUTPUT.value:
    atomic_write_json(_OUTPUT.value, {"sample": sample, "results": res})


if __name__ == "__main__":
  app.run(main)
