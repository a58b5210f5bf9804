r"""Finds the indexed images most similar to query images.

  python -m engine.query --index=DIR --query=FILE_OR_DIR [--k=10] [--format=text|json]
      [--html=FILE] [--min_score=X] [--raw_scores] [--qe=N --qe_alpha=A] [--dba=N --shortlist=M]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Queries are described by the extractor the index was built with (recorded in its manifest), so
their features are always comparable with the index's. Prints the ranked paths and scores (cosine
similarity, 1 = identical direction; on an index with collection statistics, the cosine after
centering or whitening, said in the output); --html writes a self-contained page with thumbnails.
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
_RAW = flags.DEFINE_bool(
  "raw_scores",
  False,
  "Score with the raw cosine even if the index learned collection statistics (engine.index "
  "--statistics): for comparison.",
)
_QE = flags.DEFINE_integer(
  "qe",
  0,
  "Alpha query expansion: re-query with the top N matches averaged in (0: off).",
  lower_bound=0,
)
_QE_ALPHA = flags.DEFINE_float("qe_alpha", 3.0, "Alpha of --qe: match i weighs score_i^alpha.")
_DBA = flags.DEFINE_integer(
  "dba",
  0,
  "Database-side augmentation at query time: each of the best --shortlist matches is replaced "
  "by itself averaged with its own top N neighbours, and they are re-ranked (0: off).",
  lower_bound=0,
)
_DBA_ALPHA = flags.DEFINE_float("dba_alpha", 3.0, "Alpha of --dba's weights.")
_SHORTLIST = flags.DEFINE_integer(
  "shortlist", 100, "Matches --dba re-ranks (at least --k).", lower_bound=1
)
cli.define_extractor_flags()
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)
flags.mark_flags_as_required(["index", "query"])


def main(argv):
  cli.configure_process("search")
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
      _INDEX.value,
      _QUERY.value,
      extractor,
      k=_K.value,
      min_score=_MIN_SCORE.value,
      raw_scores=_RAW.value,
      qe=_QE.value,
      qe_alpha=_QE_ALPHA.value,
      dba=_DBA.value,
      dba_alpha=_DBA_ALPHA.value,
      shortlist=_SHORTLIST.value,
      scan=scan,
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
        "scores": results.scoring,
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
      print(f"[scores: {results.scoring}]")
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
