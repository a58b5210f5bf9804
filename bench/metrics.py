"""Retrieval quality: average precision, recall@k, ground-truth files and their converters.

Ground truth is a JSON file::

  {
    "protocol": "oxford" | "holidays" | "plain" | "revisited",
    "queries": {
      "<query id>": {
        "image": "<key of the query image>",          # optional, default: the query id
        "bbox": [x1, y1, x2, y2],                     # optional query region (Oxford/Paris)
        "relevant": ["<key>", ...],
        "junk": ["<key>", ...],                       # optional
        "easy": [...], "hard": [...]                  # revisited only (relevant = easy + hard)
      }
    }
  }

Keys are image names without folder and extension ("all_souls_000013", "100301"): `key_of` maps
an index key (a path) to one.

Protocols:
  oxford: Oxford 5k / Paris 6k buildings (Philbin et al. 2007). Junk images are removed from the
    ranking before scoring (they neither help nor hurt); relevant = good + ok. AP is the area under
    the precision-recall curve by the trapezoidal rule, exactly as the official `compute_ap.cpp`:
    the curve starts at (recall 0, precision 1) and every ranked item adds the trapezoid between the
    previous (recall, precision) point and its own.
  holidays: INRIA Holidays (Jegou et al. 2008). The query image is removed from its own ranking;
    AP by the same trapezoidal rule (the official `holidays_map.py`, `score_ap_from_ranks_1`).
  plain: nothing removed (queries that are not in the database, as in the copy-detection bench).
  revisited: Revisited Oxford / Paris (Radenovic et al., CVPR 2018), scored three ways as the
    authors' `compute_map` does: Easy (relevant = easy; junk and hard removed), Medium (easy + hard;
    junk removed), Hard (hard; junk and easy removed); a query without relevant images in a setup
    is left out of that setup's mean. `evaluate_revisited` returns the three.

`ap="noninterpolated"` gives the other common definition instead (mean of the precision at the rank
of each relevant item, as TREC and scikit-learn's `average_precision_score`); it is never lower than
the trapezoidal one.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

PROTOCOLS = ("oxford", "holidays", "plain", "revisited")
REVISITED_SETUPS = {  # setup -> (relevant parts, removed parts)
  "easy": (("easy",), ("junk", "hard")),
  "medium": (("easy", "hard"), ("junk",)),
  "hard": (("hard",), ("junk", "easy")),
}
AP_RULES = ("trapezoid", "noninterpolated")


def key_of(path: str) -> str:
  """An index key (a file path) -> the image name used in ground-truth files (no folder, no ext)."""
  return os.path.splitext(os.path.basename(path))[0]


def positive_ranks(
  ranking: Sequence[str],
  relevant: Iterable[str],
  ignore: Iterable[str] = (),
) -> tuple[list[int], int]:
  """0-based ranks of the relevant items after dropping ignored ones.

  Args:
    ranking: keys, best first (may be truncated: missing relevant items count as never found).
    relevant: the relevant keys.
    ignore: keys removed from the ranking before it is scored (junk, the query itself).

  Returns:
    (ranks of relevant items in the cleaned ranking, ascending; number of relevant items).
  """
  rel = set(relevant)
  drop = set(ignore)  # as compute_ap.cpp: an ignored key is skipped even if listed as relevant
  ranks, r = [], 0
  for key in ranking:
    if key in drop:
      continue
    if key in rel:
      ranks.append(r)
    r += 1
  return ranks, len(rel)


def ap_from_ranks(ranks: Sequence[int], n_relevant: int, rule: str = "trapezoid") -> float:
  """Average precision from the 0-based ranks of the relevant items found.

  The trapezoidal rule adds, for the j-th hit (0-based) at rank r, the trapezoid of width
  1 / n_relevant between precision j / r (left; 1 when r == 0) and (j + 1) / (r + 1) (right). This
  is what `compute_ap.cpp` accumulates item by item (non-hits add zero width).

  Args:
    ranks: ascending 0-based ranks of the relevant items that were retrieved.
    n_relevant: total number of relevant items (> 0).
    rule: "trapezoid" (Oxford/Paris/Holidays official) or "noninterpolated".
  """
  if n_relevant <= 0:
    raise ValueError("a query needs at least one relevant item")
  if rule not in AP_RULES:
    raise ValueError(f"rule must be one of {AP_RULES}, got {rule!r}")
  ap = 0.0
  for j, r in enumerate(ranks):
    right = (j + 1) / (r + 1)
    if rule == "trapezoid":
      left = 1.0 if r == 0 else j / r
      ap += (left + right) / 2.0 / n_relevant
    else:
      ap += right / n_relevant
  return ap


def compute_ap_cpp(ranking: Sequence[str], pos: Iterable[str], amb: Iterable[str]) -> float:
  """A line-by-line port of the official Oxford `compute_ap.cpp` (the reference for tests)."""
  pos, amb = set(pos), set(amb)
  old_recall, old_precision, ap = 0.0, 1.0, 0.0
  intersect, j = 0, 0
  for key in ranking:
    if key in amb:
      continue
    if key in pos:
      intersect += 1
    recall = intersect / len(pos)
    precision = intersect / (j + 1.0)
    ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
    old_recall, old_precision = recall, precision
    j += 1
  return ap


def query_ignore(protocol: str, query: str, entry: Mapping) -> set[str]:
  """Keys removed from a query's ranking under `protocol`."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  ignore = set(entry.get("junk", ()))
  if protocol == "holidays":
    ignore.add(entry.get("image", query))
  return ignore


def evaluate(
  rankings: Mapping[str, Sequence[str]],
  truth: Mapping,
  ks: Sequence[int] = (1, 10),
  rule: str = "trapezoid",
) -> dict:
  """mAP and mean recall@k of rankings against a ground truth.

  Args:
    rankings: query id -> keys, best first (the whole database for exact AP).
    truth: the parsed ground-truth JSON (see the module docstring).
    ks: cut-offs for recall@k = |relevant in the top k of the cleaned ranking| / |relevant|.
    rule: AP rule, see `ap_from_ranks`.

  Returns:
    {"map", "recall@k" for each k, "queries", "missing" (queries with no ranking), "per_query":
    {query: {"ap", "recall@k"...}}}. Queries with no ranking score zero and are listed.
  """
  protocol = truth.get("protocol", "plain")
  per_query, missing = {}, []
  for q, entry in truth["queries"].items():
    ranking = rankings.get(q)
    if ranking is None:
      missing.append(q)
      ranking = ()
    ranks, n_rel = positive_ranks(ranking, entry["relevant"], query_ignore(protocol, q, entry))
    row = {"ap": ap_from_ranks(ranks, n_rel, rule)}
    for k in ks:
      row[f"recall@{k}"] = sum(r < k for r in ranks) / n_rel
    per_query[q] = row
  n = max(len(per_query), 1)
  out = {"map": sum(r["ap"] for r in per_query.values()) / n, "queries": len(per_query)}
  for k in ks:
    out[f"recall@{k}"] = sum(r[f"recall@{k}"] for r in per_query.values()) / n
  out["missing"] = missing
  out["per_query"] = per_query
  return out


def evaluate_revisited(
  rankings: Mapping[str, Sequence[str]],
  truth: Mapping,
  ks: Sequence[int] = (1, 10),
  rule: str = "trapezoid",
) -> dict:
  """`evaluate` under the Easy, Medium and Hard setups of a revisited ground truth:
  {"easy": ..., "medium": ..., "hard": ...}, each as `evaluate` returns it."""
  out = {}
  for setup, (pos, neg) in REVISITED_SETUPS.items():
    queries = {}
    for q, entry in truth["queries"].items():
      relevant = sorted({k for part in pos for k in entry.get(part, ())})
      if relevant:
        junk = sorted({k for part in neg for k in entry.get(part, ())})
        queries[q] = {"image": entry.get("image", q), "relevant": relevant, "junk": junk}
    out[setup] = evaluate(rankings, {"protocol": "oxford", "queries": queries}, ks, rule)
  return out


def revisited_to_truth(path: str | os.PathLike) -> dict:
  """The Revisited Oxford / Paris ground truth, as JSON, -> the JSON ground truth.

  The authors publish `gnd_roxford5k.pkl` / `gnd_rparis6k.pkl`, Python pickles, which this engine
  never loads. Convert your copy once into JSON with the same fields (the one-line command is in
  bench/README.md): {"imlist": [names], "qimlist": [names], "gnd": [{"bbx": [x1, y1, x2, y2],
  "easy": [imlist indices], "hard": [...], "junk": [...]}]} (query i is qimlist[i]).
  """
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  try:
    imlist, qimlist, gnd = raw["imlist"], raw["qimlist"], raw["gnd"]
    if len(gnd) != len(qimlist) or not gnd:
      raise ValueError(f"{len(gnd)} ground-truth entries for {len(qimlist)} queries")
    queries = {}
    for qname, entry in zip(qimlist, gnd, strict=True):
      parts = {}
      for part in ("easy", "hard", "junk"):
        idx = [int(i) for i in entry.get(part, [])]
        if any(not 0 <= i < len(imlist) for i in idx):
          raise ValueError(f"query {qname}: {part} index outside imlist")
        parts[part] = sorted({key_of(str(imlist[i])) for i in idx})
      q = key_of(str(qname))
      queries[q] = {
        "image": q,
        "relevant": sorted(set(parts["easy"]) | set(parts["hard"])),
        **parts,
      }
      if entry.get("bbx") is not None:
        box = [float(v) for v in entry["bbx"]]
        if len(box) != 4:
          raise ValueError(f"query {qname}: bbx must be 4 numbers")
        queries[q]["bbox"] = box
  except (KeyError, TypeError) as e:
    raise ValueError(
      f"{path}: not a revisited ground truth ({e!r}); see revisited_to_truth"
    ) from None
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return {"protocol": "revisited", "queries": queries}


def load_truth(path: str | os.PathLike) -> dict:
  """Reads and checks a ground-truth JSON file."""
  with open(path, encoding="utf-8") as f:
    truth = json.load(f)
  if not isinstance(truth, dict) or not isinstance(truth.get("queries"), dict):
    raise ValueError(f"{path}: expected an object with a 'queries' object")
  if truth.setdefault("protocol", "plain") not in PROTOCOLS:
    raise ValueError(f"{path}: protocol must be one of {PROTOCOLS}, got {truth['protocol']!r}")
  for q, entry in truth["queries"].items():
    if not entry.get("relevant"):
      raise ValueError(f"{path}: query {q!r} has no relevant images")
  return truth


def save_truth(truth: Mapping, path: str | os.PathLike) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(truth, f, indent=1, sort_keys=True)


def _read_names(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.split()[0] for line in f if line.strip()]


def oxford_to_truth(gt_dir: str | os.PathLike) -> dict:
  """The official Oxford 5k / Paris 6k ground-truth folder -> the JSON ground truth.

  The folder (`gt_files_170407.tgz` for Oxford, `paris_120310.tgz`'s ground truth for Paris) holds,
  per query `{landmark}_{n}`: `_query.txt` (one line: image name, Oxford with an `oxc1_` prefix,
  and the query box x1 y1 x2 y2), `_good.txt` and `_ok.txt` (relevant images: both count) and
  `_junk.txt` (ignored). Query ids are `{landmark}_{n}`; the query image and box are recorded.
  """
  gt_dir = os.fspath(gt_dir)
  queries = {}
  for name in sorted(os.listdir(gt_dir)):
    if not name.endswith("_query.txt"):
      continue
    qid = name[: -len("_query.txt")]
    with open(os.path.join(gt_dir, name), encoding="utf-8") as f:
      fields = f.read().split()
    if len(fields) != 5:
      raise ValueError(f"{name}: expected 'image x1 y1 x2 y2', got {' '.join(fields)!r}")
    image = fields[0].removeprefix("oxc1_")
    lists = {}
    for part in ("good", "ok", "junk"):
      p = os.path.join(gt_dir, f"{qid}_{part}.txt")
      if not os.path.exists(p):
        raise ValueError(f"{p} is missing (every query needs good, ok and junk lists)")
      lists[part] = _read_names(p)
    queries[qid] = {
      "image": image,
      "bbox": [float(v) for v in fields[1:]],
      "relevant": sorted(set(lists["good"]) | set(lists["ok"])),
      "junk": sorted(set(lists["junk"])),
    }
  if not queries:
    raise ValueError(f"no *_query.txt files in {gt_dir}")
  return {"protocol": "oxford", "queries": queries}


def holidays_to_truth(names: str | os.PathLike | Iterable[str]) -> dict:
  """INRIA Holidays file names (or their folder) -> the JSON ground truth.

  Images are named by number (`100000.jpg` ...); `number // 100` is the scene, the image whose
  `number % 100 == 0` is the scene's query and the others are its relevant images, as in the
  official `holidays_map.py`. Scenes with no other image are dropped (they have nothing to find).
  Files that are not named by a number are ignored.
  """
  if isinstance(names, (str, os.PathLike)):
    names = os.listdir(names)
  groups: dict[int, list[int]] = collections.defaultdict(list)
  for name in names:
    stem = key_of(name)
    if stem.isdigit():
      groups[int(stem) // 100].append(int(stem))
  width = max((len(key_of(n)) for n in names if key_of(n).isdigit()), default=6)
  queries = {}
  for scene in sorted(groups):
    members = sorted(groups[scene])
    query = scene * 100
    if query not in members or len(members) < 2:
      continue
    qid = f"{query:0{width}d}"
    queries[qid] = {
      "image": qid,
      "relevant": [f"{m:0{width}d}" for m in members if m != query],
      "junk": [],
    }
  if not queries:
    raise ValueError("no Holidays scene with a query (NNNN00) and at least one other image")
  return {"protocol": "holidays", "queries": queries}


def rank_with_index(
  index, queries_qd: np.ndarray, k: int | None = None, search=None
) -> list[list[str]]:
  """Searches an `engine.store.Index`: `[Q, D]` queries -> per query the ranked keys (names).

  Args:
    index: an open engine.store.Index.
    queries_qd: query descriptors.
    k: ranking depth; None ranks the whole index (exact AP).
    search: `(queries, k) -> (scores, keys)` instead of `index.search` (query expansion).
  """
  k = k or len(index)
  search = search or (lambda q, k: index.search(q, k=k))
  _, keys = search(np.asarray(queries_qd, np.float32), k)
  return [[key_of(key) for key in row] for row in keys]
