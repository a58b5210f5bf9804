r"""Finds groups of near-duplicate images in an index.

  python -m engine.dedup --index=DIR [--threshold=0.9] [--html=FILE] [--format=text|json]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

A self-join of the index through the search kernel, in chunks (never an N x N matrix): images
whose cosine similarity is at least --threshold are linked, and linked images form a group.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from engine import cli, store
from engine.app import report, retrieval
from engine.common import textio
from engine.store import sharded

_INDEX = flags.DEFINE_string("index", None, "Index folder built by engine.index.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.9, "Cosine similarity that makes a duplicate.")
_K = flags.DEFINE_integer("k", 32, "Neighbours examined per image.", lower_bound=1)
_HTML = flags.DEFINE_string("html", None, "Also write a self-contained HTML page of the groups.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "Output format on stdout.")
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)
flags.mark_flag_as_required("index")


def main(argv):
  # File names that are not UTF-8 print as \udcXX escapes (also valid inside JSON strings).
  sys.stdout.reconfigure(errors="backslashreplace")
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors():
    cli.check_output_file(_HTML.value)
    if not -1.0 <= _THRESHOLD.value <= 1.0:
      raise cli.UserError(f"--threshold must be in [-1, 1], got {_THRESHOLD.value}")
    if not store.exists(_INDEX.value):
      raise cli.UserError(f"no index at {_INDEX.value}")
    cluster = cli.join_cluster(_INDEX.value)
    scan = (
      sharded.ProcessScan(cluster.process_id, cluster.num_processes)
      if cluster.distributed
      else None
    )
    with store.Index.open(_INDEX.value, readonly=True) as idx:
      groups = retrieval.find_duplicates(idx, _THRESHOLD.value, k=_K.value, scan=scan)
    if cluster.process_id != 0:
      return  # every process holds the merged answer; process 0 prints it
    if _FORMAT.value == "json":
      out = [[{"key": k, "score": s} for k, s in g] for g in groups]
      json.dump({"threshold": _THRESHOLD.value, "groups": out}, sys.stdout, indent=2)
      print()
    else:
      for i, group in enumerate(groups, 1):
        print(f"group {i} ({len(group)} images)")
        for key, score in group:
          print(f"  {score:.4f}  {textio.escape(key)}")
      print(f"{len(groups)} groups of near-duplicates at threshold {_THRESHOLD.value}")
    if _HTML.value:
      rows = [report.Row(f"group {i} ({len(g)} images)", None, g) for i, g in enumerate(groups, 1)]
      report.write(_HTML.value, f"Near-duplicates at {_THRESHOLD.value}", rows)
      print(f"wrote {_HTML.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
