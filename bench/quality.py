r"""Retrieval quality of an index against a ground truth: mAP and recall@k.

  # 1. convert the official ground truth once (the data sets are downloaded by the user)
  python -m bench.quality --convert_oxford=~/data/oxford5k/gt --ground_truth=oxford5k.json
  python -m bench.quality --convert_holidays=~/data/holidays/jpg --ground_truth=holidays.json
  python -m bench.quality --convert_revisited=gnd_roxford5k.json --ground_truth=roxford5k.json
  # 2. index the images, then score the index
  python -m engine.index --images=~/data/holidays/jpg --index=/tmp/holidays.idx --descriptor=gem
  python -m bench.quality --index=/tmp/holidays.idx --ground_truth=holidays.json

Protocols (from the ground truth's "protocol"; see bench/metrics.py): `oxford` removes junk images
from each ranking, `holidays` removes the query image from its own ranking; both compute AP by the
trapezoidal rule of the official evaluation code; `revisited` (Revisited Oxford / Paris) reports
mAP and recall@k under the Easy, Medium and Hard setups. `--qe`, `--dba` rank with the query
options of `engine.query` (engine/app/expansion.py); an index's collection statistics always
apply (`--raw_scores` for the raw cosine). Query descriptors come from the index itself
(`--queries=index`: the query images must be indexed, as in Holidays and the full-image Oxford
variant) or are extracted from the files in `--images` with the index's extractor
(`--queries=extract`), cropped to the ground truth's query box with `--crop` (the standard
Oxford/Paris protocol). Index keys are matched to ground-truth names by file name without folder
and extension. Prints a table last; `--output` writes JSON with the per-query APs.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from bench import metrics
from engine.common.fileio import atomic_write_json


def _find_images(folder: str) -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(folder):
    for name in files:
      out.setdefault(metrics.key_of(name), os.path.join(dirpath, name))
  return out


def query_vectors(index, truth: dict, mode: str, images: str | None, crop: bool, weights=None):
  """`[Q, D]` query descriptors in the order of truth["queries"], from the index or extracted."""
  qids = list(truth["queries"])
  names = [truth["queries"][q].get("image", q) for q in qids]
  if mode == "index":
    by_name = {}
    for key in index.keys():
      by_name.setdefault(metrics.key_of(key), key)
    missing = [n for n in names if n not in by_name]
    if missing:
      raise app.UsageError(
        f"{len(missing)} query images are not in the index (e.g. {missing[:3]}): index them or "
        "use --queries=extract --images=DIR"
      )
    return index.get_vectors([by_name[n] for n in names])
  from PIL import Image

  from engine.features.extractor import Extractor

  # An int8 index's queries run its own quantised model, kept in the index folder (OpenVINO).
  int8 = index.metadata.get("extractor", {}).get("precision") == "int8"
  extractor = Extractor.from_index_metadata(
    index.metadata, weights=weights, folder=index.path, **({"backend": "openvino"} if int8 else {})
  )
  files = _find_images(images)
  pixels = []
  for q, name in zip(qids, names, strict=True):
    if name not in files:
      raise app.UsageError(f"query image {name!r} not found under {images}")
    with Image.open(files[name]) as im:
      im = im.convert("RGB")
      box = truth["queries"][q].get("bbox")
      if crop and box:
        im = im.crop(tuple(int(round(v)) for v in box))
      pixels.append(np.asarray(im))
  return extractor.extract_arrays(pixels)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TRUTH.value:
    raise app.UsageError("--ground_truth is required")
  if _CONVERT_OXFORD.value or _CONVERT_HOLIDAYS.value or _CONVERT_REVISITED.value:
    if _CONVERT_OXFORD.value:
      truth = metrics.oxford_to_truth(os.path.expanduser(_CONVERT_OXFORD.value))
    elif _CONVERT_HOLIDAYS.value:
      truth = metrics.holidays_to_truth(os.path.expanduser(_CONVERT_HOLIDAYS.value))
    else:
      truth = metrics.revisited_to_truth(os.path.expanduser(_CONVERT_REVISITED.value))
    metrics.save_truth(truth, _TRUTH.value)
    print(f"wrote {len(truth['queries'])} {truth['protocol']} queries to {_TRUTH.value}")
    if not _INDEX.value:
      return
  if not _INDEX.value:
    raise app.UsageError("--index is required to evaluate")
  if _QUERIES.value == "extract" and not _IMAGES.value:
    raise app.UsageError("--queries=extract needs --images")
  from engine.store import Index

  truth = metrics.load_truth(_TRUTH.value)
  ks = [int(k) for k in _KS.value]
  with Index.open(_INDEX.value, readonly=True) as index:
    vecs = query_vectors(index, truth, _QUERIES.value, _IMAGES.value, _CROP.value, _WEIGHTS.value)
    ranked = metrics.rank_with_index(index, vecs, _K.value or None, _searcher(index))
    n_db = len(index)
  rankings = dict(zip(truth["queries"], ranked, strict=True))
  if truth["protocol"] == "revisited":
    setups = metrics.evaluate_revisited(rankings, truth, ks=ks, rule=_AP.value)
    res = {"setups": setups, "queries": len(truth["queries"])}
  else:
    res = metrics.evaluate(rankings, truth, ks=ks, rule=_AP.value)
    setups = {truth["protocol"]: res}
  res.update(
    protocol=truth["protocol"],
    ap_rule=_AP.value,
    index=_INDEX.value,
    database=n_db,
    queries_from=_QUERIES.value,
  )
  if _OUTPUT.value:
    atomic_write_json(_OUTPUT.value, res)
  print(
    f"{'protocol':9s} {'queries':>7s} {'database':>8s} {'mAP':>7s} "
    + " ".join(f"{'R@' + str(k):>6s}" for k in ks)
  )
  for name, r in setups.items():
    print(
      f"{name:9s} {r['queries']:7d} {n_db:8d} {r['map']:7.4f} "
      + " ".join(f"{r[f'recall@{k}']:6.3f}" for k in ks)
    )


def _searcher(index):
  """The ranking function the flags ask for: the index's search, raw, or with QE / DBA."""
  if _RAW.value:
    if _QE.value or _DBA.value:
      raise app.UsageError("--raw_scores does not combine with --qe / --dba")
    return lambda q, k: index.search(q, k=k, statistics="none")
  if not (_QE.value or _DBA.value):
    return None
  from engine.app import expansion

  return lambda q, k: expansion.search(
    index,
    q,
    k,
    qe=_QE.value,
    qe_alpha=_QE_ALPHA.value,
    dba_n=_DBA.value,
    shortlist=_SHORTLIST.value,
  )


if __name__ == "__main__":
  # Flags exist only when run as a program, so the module stays importable next to others.
  _INDEX = flags.DEFINE_string("index", None, "Index folder to evaluate.")
  _TRUTH = flags.DEFINE_string(
    "ground_truth", None, "Ground-truth JSON (read, or written by --convert_*)."
  )
  _CONVERT_OXFORD = flags.DEFINE_string(
    "convert_oxford", None, "Folder of Oxford/Paris *_query/good/ok/junk.txt: write --ground_truth."
  )
  _CONVERT_HOLIDAYS = flags.DEFINE_string(
    "convert_holidays", None, "Folder of Holidays images (NNNNNN.jpg): write --ground_truth."
  )
  _CONVERT_REVISITED = flags.DEFINE_string(
    "convert_revisited",
    None,
    "Revisited Oxford/Paris ground truth converted to JSON (gnd_roxford5k.pkl's fields; see "
    "bench/README.md): write --ground_truth.",
  )
  _RAW = flags.DEFINE_bool("raw_scores", False, "Rank by the raw cosine (no index statistics).")
  _QE = flags.DEFINE_integer("qe", 0, "Alpha query expansion over N neighbours (0: off).")
  _QE_ALPHA = flags.DEFINE_float("qe_alpha", 3.0, "Alpha of --qe.")
  _DBA = flags.DEFINE_integer("dba", 0, "Query-time DBA over N neighbours (0: off).")
  _SHORTLIST = flags.DEFINE_integer("shortlist", 100, "Candidates --dba re-ranks.")
  _QUERIES = flags.DEFINE_enum(
    "queries",
    "index",
    ["index", "extract"],
    "Take query descriptors from the index or extract them.",
  )
  _IMAGES = flags.DEFINE_string(
    "images", None, "Folder holding the query images (--queries=extract)."
  )
  _CROP = flags.DEFINE_bool(
    "crop", False, "Crop query images to the ground truth's bbox (extract)."
  )
  _WEIGHTS = flags.DEFINE_string("weights", None, "Override the index's recorded weights folder.")
  _K = flags.DEFINE_integer("k", 0, "Ranking depth; 0 ranks the whole index (exact AP).")
  _KS = flags.DEFINE_list("recall_at", ["1", "10"], "Cut-offs of recall@k.")
  _AP = flags.DEFINE_enum("ap", "trapezoid", list(metrics.AP_RULES), "AP rule.")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
  app.run(main)
