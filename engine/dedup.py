r"""Finds groups of near-duplicate images in an index, suggests a keeper per group, and can move
the others aside (never deleting anything).

  python -m engine.dedup --index=DIR [--tier=exact|near|similar | --precision=P | --threshold=T]
      [--linkage=complete|representative|single] [--format=text|csv|json|html] [--html=FILE]
      [--move_to=DIR [--apply]]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
  python -m engine.dedup --undo=JOURNAL

Grouping rule (--linkage): "complete" (the default): every pair of images in a group scores at
least the threshold, so groups cannot chain (A~B and B~C never put A with C unless A~C);
"representative": every image scores at least the threshold against the group's first image;
"single": transitive (A~B, B~C makes one group of A, B, C), only when asked for. Scores are those
of `Index.search` (a self-join in chunks, among each image's --k nearest).

The threshold: --threshold (a raw score), or --precision (the precision of duplicate pairs wanted)
or --tier (exact: 0.99, near: 0.95, similar: 0.8), mapped to a threshold through the calibration
curve measured for the index's weights and descriptor on the copy-detection benchmark (stored
with the weights; `python -m bench.copydetect --dedup` measures it). Without any, --tier=exact when
the weights are calibrated, else 0.9. The output states the rule and the expected precision.

Each group names a keeper (highest resolution, then largest file, then oldest; the reason is
shown). --move_to=DIR moves the others to DIR under their paths relative to the groups' common
folder: a dry run listing the moves unless --apply. Applied moves are journaled in
DIR/dedup-journal-*.jsonl; --undo=JOURNAL moves every file back byte for byte. A run killed during
a move is settled (completed or rolled back) by the next run with the same --move_to.
"""

from __future__ import annotations

import sys

from absl import app, flags

from engine import cli, store
from engine.app import calibration, dedup, grouping, moves, report
from engine.common import textio
from engine.store import sharded

_INDEX = flags.DEFINE_string("index", None, "Index folder built by engine.index.")
_THRESHOLD = flags.DEFINE_float(
  "threshold", None, "Raw score two images need (cosine in [-1, 1]); excludes --precision/--tier."
)
_PRECISION = flags.DEFINE_float(
  "precision",
  None,
  "Wanted precision of duplicate pairs, e.g. 0.95: the threshold comes from the calibration "
  "curve of the index's weights.",
)
_TIER = flags.DEFINE_enum(
  "tier",
  None,
  sorted(calibration.TIERS),
  "Named precision targets: "
  + ", ".join(f"{k}={v}" for k, v in calibration.TIERS.items())
  + " (through the calibration curve).",
)
_LINKAGE = flags.DEFINE_enum(
  "linkage",
  "complete",
  list(grouping.LINKAGES),
  "complete: every pair in a group scores >= the threshold (no chaining); representative: every "
  "image scores >= it against the group's first; single: transitive chains (A~B, B~C -> A,B,C).",
)
_K = flags.DEFINE_integer("k", 32, "Neighbours examined per image.", lower_bound=1)
_FORMAT = flags.DEFINE_enum("format", "text", list(dedup.FORMATS), "Output format on stdout.")
_HTML = flags.DEFINE_string("html", None, "Also write a self-contained HTML page of the groups.")
_MOVE_TO = flags.DEFINE_string(
  "move_to", None, "Move every non-keeper here, keeping relative paths (dry run without --apply)."
)
_APPLY = flags.DEFINE_bool("apply", False, "Really move the files (with --move_to).")
_UNDO = flags.DEFINE_string("undo", None, "Move back every file a journal of --move_to moved.")
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)


def _say(line: str) -> None:
  print(line, file=sys.stderr)


def main(argv):
  cli.configure_process("search")
  # File names that are not UTF-8 print as \udcXX escapes (also valid inside JSON strings).
  sys.stdout.reconfigure(errors="backslashreplace")
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _UNDO.value is None and _INDEX.value is None:
    raise app.UsageError("--index is required (unless --undo=JOURNAL)")
  if _APPLY.value and not _MOVE_TO.value:
    raise app.UsageError("--apply needs --move_to")
  with cli.user_errors():
    if _UNDO.value is not None:
      res = moves.undo(_UNDO.value)
      for m in res.moved:
        print(f"restored {textio.escape(m.dst)}")
      for path, why in res.skipped:
        print(f"not restored {textio.escape(path)}: {why}")
      print(f"restored {len(res.moved)} files, {len(res.skipped)} not restored")
      return
    cli.check_output_file(_HTML.value)
    if not store.exists(_INDEX.value):
      raise cli.UserError(f"no index at {_INDEX.value}")
    cluster = cli.join_cluster(_INDEX.value)
    scan = (
      sharded.ProcessScan(cluster.process_id, cluster.num_processes)
      if cluster.distributed
      else None
    )
    if _MOVE_TO.value and cluster.process_id == 0:
      for line in moves.recover_all(_MOVE_TO.value):
        _say(textio.escape(line))
    with store.Index.open(_INDEX.value, readonly=True) as idx:
      selection = dedup.select_threshold(
        idx,
        threshold=_THRESHOLD.value,
        precision=_PRECISION.value,
        tier=_TIER.value,
        linkage=_LINKAGE.value,
      )
      if selection.expected is None and _FORMAT.value != "json" and cluster.process_id == 0:
        _say(f"note: {selection.describe()}")
      result = dedup.find(idx, selection, linkage=_LINKAGE.value, k=_K.value, scan=scan)
      if cluster.process_id != 0:
        return  # every process holds the merged answer; process 0 prints and moves
      sys.stdout.write(dedup.render(result, _FORMAT.value))
      if _HTML.value:
        report.write(
          _HTML.value,
          f"Near-duplicates at {selection.threshold:.4f}",
          dedup.html_rows(result),
          note=dedup.summary(result),
        )
        _say(f"wrote {_HTML.value}")
      if _MOVE_TO.value:
        plan, root = moves.plan(result.decisions, _MOVE_TO.value, idx.path)
        if not _APPLY.value:
          for m in plan:
            _say(f"would move {textio.escape(m.src)} -> {textio.escape(m.dst)}")
          _say(f"dry run: {len(plan)} files would move (relative to {root}); add --apply")
          return
        done = moves.apply(plan, idx, _MOVE_TO.value, root)
        for path, why in done.skipped:
          _say(f"not moved {textio.escape(path)}: {why}")
        undo = f"; undo with --undo={textio.escape(done.journal)}" if done.journal else ""
        _say(f"moved {len(done.moved)} files, {len(done.skipped)} not moved{undo}")


if __name__ == "__main__":
  app.run(main)
