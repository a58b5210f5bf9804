r"""What collection statistics do to scores: distinct photos against copies of one photo.

  python -m bench.statistics --sample=DIR [--work=DIR] [--weights=random] [--descriptor=gem]
  python -m bench.statistics --speed_rows=200000       # search time with and without statistics

Takes a sample collection (`python -m engine.sample --output=DIR`: DIR/photos, DIR/queries and
DIR/ground_truth.json), indexes its photos and its transformed copies with `engine.app.indexing`
(into --work, reused when already there), then, through `Index.search` itself, reports the score
distribution between distinct photos (every photo against every other) and between each copy and
its original: raw, with centering, and with whitening learned on the photos' index
(`Index.learn_statistics`). Prints a table; --output writes JSON.

--speed_rows=N instead times `Index.search` on N random int8 rows (D = 512, a shared component
as real descriptors have): raw, centred and whitened, for 1 and 100 queries (medians of
--repeats runs after a warm-up), and the first search after opening, which computes the per-row
factors of the statistics. Q=100 is also timed with `method="int8-xla"` (XLA's int8 product, the
path batches with statistics took before the native kernel had the rank-one term), interleaved
with the default path in the same rounds, so the ratio holds under the same load.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.machine import cpu_model
from bench.timing import interleaved_times
from engine import store
from engine.app import extraction, indexing
from engine.common.fileio import atomic_write_json
from engine.kernels import native

_SAMPLE = flags.DEFINE_string("sample", None, "A sample collection (engine.sample --output).")
_WORK = flags.DEFINE_string("work", None, "Where the indexes go (default: SAMPLE/bench-stats).")
_WEIGHTS = flags.DEFINE_string("weights", "random", "Weights spec (see engine.index --help).")
_DESCRIPTOR = flags.DEFINE_string("descriptor", "gem", "Descriptor.")
_WHITEN = flags.DEFINE_string("whiten", "whiten:32", "The whitening policy compared.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")
_SPEED_ROWS = flags.DEFINE_integer("speed_rows", 0, "Time searches on this many random rows.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per setting (--speed_rows).")


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


def _median_s(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _interleaved_median_s(fns: dict, repeats: int) -> dict:
  """Medians of `repeats` rounds that run every fn once each, after one warm-up of each."""
  for fn in fns.values():
    fn()
  return {name: float(np.median(v)) for name, v in interleaved_times(fns, repeats).items()}


def speed(n: int, repeats: int, d: int = 512) -> dict:
  """Search times on n random int8 rows: {policy: {"q1", "q100", "q100_xla", "open_first_q1"}
  seconds}."""
  rng = np.random.default_rng(0)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "i")
    with store.Index.create(path, dim=d, dtype="int8") as idx:
      common = rng.normal(size=d).astype(np.float32) * 2
      for a in range(0, n, 65536):
        b = min(n, a + 65536)
        x = rng.normal(size=(b - a, d)).astype(np.float32) + common
        idx.add(x, [str(i) for i in range(a, b)])
      idx.compact()
    queries = rng.normal(size=(100, d)).astype(np.float32) + common
    for policy in ("none", "center", "whiten:256"):
      with store.Index.open(path) as idx:
        idx.learn_statistics(policy)
      res = {}
      with store.Index.open(path, readonly=True) as idx:
        t = time.perf_counter()
        idx.search(queries[:1], k=10)
        res["open_first_q1"] = time.perf_counter() - t
        res["q1"] = _median_s(lambda idx=idx: idx.search(queries[:1], k=10), repeats)
        res.update(
          _interleaved_median_s(
            {
              "q100": lambda idx=idx: idx.search(queries, k=10),
              "q100_xla": lambda idx=idx: idx.search(queries, k=10, method="int8-xla"),
            },
            max(1, repeats // 2),
          )
        )
      out[policy] = res
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SPEED_ROWS.value:
    res = speed(_SPEED_ROWS.value, _REPEATS.value)
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs; N={_SPEED_ROWS.value}, D=512, int8, k=10")
    print(f"# {native.status()}")
    print(
      "| statistics | first search after open, Q=1 (s) | Q=1 (ms) | Q=1 x raw | Q=100 (ms) "
      "| Q=100 x raw | Q=100, XLA int8 product (ms) | default / XLA |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for policy, r in res.items():
      print(
        f"| {policy} | {r['open_first_q1']:.2f} | {1e3 * r['q1']:.1f} "
        f"| {r['q1'] / res['none']['q1']:.2f} | {1e3 * r['q100']:.1f} "
        f"| {r['q100'] / res['none']['q100']:.2f} | {1e3 * r['q100_xla']:.1f} "
        f"| {r['q100'] / r['q100_xla']:.2f} |"
      )
    if _OUTPUT.value:
      atomic_write_json(
        _OUTPUT.value, {"speed": res, "rows": _SPEED_ROWS.value, "cpu": cpu_model()}
      )
    return
  if not _SAMPLE.value:
    raise app.UsageError("--sample (or --speed_rows) is required")
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
  print(f"# {cpu_model()}; {_DESCRIPTOR.value}, {_WEIGHTS.value}")
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
