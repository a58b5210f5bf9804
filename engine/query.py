r"""Finds the indexed images most similar to query images.

  python -m engine.query --index=DIR --query=FILE_OR_DIR [--k=10] [--format=text|json]
      [--html=FILE] [--min_score=X]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Queries are described by the extractor the index was built with (recorded in its manifest), so
their features are always comparable with the index's. Prints the ranked paths and scores (cosine
similarity, 1 = identical direction); --html writes a self-contained page with thumbnails.
With the distributed flags, N processes (hosts) started alike each scan 1/N of the index's rows
and process 0 prints the merged answer.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from engine import cli
from engine.app import extraction, report, retrieval
from engine.common import textio
from engine.store import sharded

_INDEX = flags.DEFINE_string("index", None, "Index folder built by engine.index.")
_QUERY = flags.DEFINE_string("query", None, "Query image, or a folder of query images.")
_K = flags.DEFINE_integer("k", 10, "Matches per query (at most the number of indexed images).")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "Output format on stdout.")
_HTML = flags.DEFINE_string("html", None, "Also write a self-contained HTML results page here.")
_MIN_SCORE = flags.DEFINE_float("min_score", None, "Drop matches scoring below this.")
cli.define_extractor_flags()
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)
flags.mark_flags_as_required(["index", "query"])


def main(argv):
  # File names that are not UTF-8 print as \udcXX escapes (also valid inside JSON strings).
  sys.stdout.reconfigure(errors="backslashreplace")
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors():
    cli.check_output_file(_HTML.value)
    if _K.value <= 0:
      raise cli.UserError(f"--k must be positive, got {_K.value}")
    cluster = cli.join_cluster(_INDEX.value)
    extractor = extraction.for_index(_INDEX.value, cli.settings(), explicit=cli.explicit_settings())
    scan = (
      sharded.ProcessScan(cluster.process_id, cluster.num_processes)
      if cluster.distributed
      else None
    )
    results = retrieval.query_index(
      _INDEX.value, _QUERY.value, extractor, k=_K.value, min_score=_MIN_SCORE.value, scan=scan
    )
    if cluster.process_id != 0:
      return  # every process holds the merged answer; process 0 prints it
    random_note = (
      "RANDOM weights (not ImageNet): scores show visual similarity of a random network"
      if extractor.weights_info.is_random
      else None
    )
    for path, reason in results.failed:
      print(f"skipped query {textio.escape(path)}: {textio.escape(reason)}", file=sys.stderr)
    if _FORMAT.value == "json":
      out = {
        "index": _INDEX.value,
        "weights": extractor.weights_info.source,
        "results": [
          {
            "query": q,
            "matches": [{"rank": r + 1, "key": k, "score": s} for r, (k, s) in enumerate(m)],
          }
          for q, m in results.matches
        ],
        "failed": [{"query": p, "reason": r} for p, r in results.failed],
      }
      json.dump(out, sys.stdout, indent=2, ensure_ascii=False)
      print()
    else:
      if random_note:
        print(f"[{random_note}]")
      for q, matches in results.matches:
        print(f"query: {textio.escape(q)}")
        for rank, (key, score) in enumerate(matches, 1):
          print(f"  {rank:3d}  {score:.4f}  {textio.escape(key)}")
        if not matches:
          print("  (no match above --min_score)")
    if _HTML.value:
      rows = [report.Row(f"query: {q}", q, m) for q, m in results.matches]
      report.write(_HTML.value, f"Results for {_QUERY.value}", rows, random_note)
      print(f"wrote {_HTML.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
