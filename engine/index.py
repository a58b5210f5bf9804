r"""Indexes a photo folder, incrementally.

  python -m engine.index --images=DIR --index=DIR [--weights=...] [--descriptor=gem]
      [--dtype=int8] [--batch_size=16] [--prune] [--compact] [--statistics=none|center|whiten:DIM]
  python -m engine.index --index=DIR --compact
  python -m engine.index --images=DIR --index=DIR --coordinator_address=HOST:PORT \
      --num_processes=N --process_id=P   (one per process or host)

Walks DIR recursively (symlink loops are visited once), picks images by content as well as by
extension, extracts only new or changed files and commits every --commit_every images: an
interrupted run (Ctrl-C, kill, power loss) resumes from its last commit. Ends with a summary;
files that could not be indexed are listed with their reason in INDEX/last_run_failures.tsv.
With the distributed flags, N processes (jax.distributed) each extract a share of the new and
changed files into a staging index of their own, and process 0 adds them all to the index and
reports; an interrupted run's staging indexes are folded in by the next run.
Exit code 0 when the run finished (even with skipped files), 1 when nothing could be done.
"""

from __future__ import annotations

import sys

from absl import app, flags

from engine import cli, store
from engine.app import extraction, indexing, process_indexing, watch
from engine.common import textio

_IMAGES = flags.DEFINE_string("images", None, "Folder of images (recursive) or one image file.")
_INDEX = flags.DEFINE_string("index", None, "Index folder (created on first use).")
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "int8",
  list(store.DTYPES),
  "Storage dtype of a new index (an existing one keeps its own).",
)
_PRUNE = flags.DEFINE_bool("prune", False, "Remove indexed files under --images that vanished.")
_COMPACT = flags.DEFINE_bool(
  "compact",
  False,
  "Then rewrite the index as few segments without deleted rows (--images may then be left out).",
)
_COMMIT_EVERY = flags.DEFINE_integer(
  "commit_every", 256, "Images per commit: the most work an interruption loses.", lower_bound=1
)
_STATISTICS = flags.DEFINE_string(
  "statistics",
  None,
  "Collection statistics the index learns from its own rows and applies to every search: none "
  "(raw cosine), center (subtract the mean of the indexed descriptors: scores between unrelated "
  "photos drop from near 1 to near 0) or whiten:DIM (mean and PCA whitening to DIM dimensions). "
  "Re-learned at the end of a run when the number of images doubled or halved since. Default: "
  "the index's recorded policy (none for a new index).",
)
_RELEARN = flags.DEFINE_bool(
  "relearn_statistics", False, "Re-learn the collection statistics at the end of this run anyway."
)
_WATCH = flags.DEFINE_bool(
  "watch",
  False,
  "Then keep indexing: watch --images and bring the index up to date (new, changed and vanished "
  "files) whenever files change, until interrupted.",
)
_WATCH_POLL = flags.DEFINE_bool(
  "watch_poll", False, "With --watch: poll the folder instead of file-system notifications."
)
_REPORT = flags.DEFINE_string(
  "report", None, "Failures file (path<TAB>reason); default INDEX/last_run_failures.tsv."
)
cli.define_descriptor_flags("gem", "Descriptor for a new index.")
cli.define_extractor_flags()
cli.define_calibration_flag()
cli.define_distributed_flags()
flags.adopt_module_key_flags(cli)
flags.mark_flag_as_required("index")


def main(argv):
  cli.configure_process()
  # File names that are not UTF-8 print as \udcXX escapes (also valid inside JSON strings).
  sys.stdout.reconfigure(errors="backslashreplace")
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WATCH.value and _IMAGES.value is None:
    raise app.UsageError("--watch needs --images")
  if _IMAGES.value is None and not _COMPACT.value:
    raise app.UsageError("--images is required (unless --compact alone is asked for)")
  with cli.user_errors():
    if _IMAGES.value is None:
      _compact()
      return
    cluster = cli.join_cluster(_INDEX.value)
    if cluster.distributed and _WATCH.value:
      raise cli.UserError("--watch runs in one process: leave out the distributed flags")
    extractor = extraction.for_index(
      _INDEX.value,
      cli.settings(),
      descriptor=cli.descriptor(),
      explicit=cli.explicit_settings(),
    )
    options = dict(
      dtype=None if flags.FLAGS["dtype"].using_default_value else _DTYPE.value,
      prune=_PRUNE.value,
      commit_every=_COMMIT_EVERY.value,
      report_path=_REPORT.value,
      statistics=_STATISTICS.value,
      relearn_statistics=_RELEARN.value,
    )
    if cluster.distributed:
      result = process_indexing.index_folder(
        _IMAGES.value, _INDEX.value, extractor, cluster, **options
      )
      if cluster.process_id != 0:
        return  # process 0 adds every process's share to the index and reports the run
      print(
        f"{cluster.num_processes} processes; process 0 added their {result.indexed} images to "
        f"the index in {result.merge_seconds:.2f} s"
      )
    else:
      result = indexing.index_folder(
        _IMAGES.value,
        _INDEX.value,
        extractor,
        calibration_images=flags.FLAGS.calibration_images,
        **options,
      )
    for path, reason in result.failed[:20]:
      print(f"skipped {textio.escape(path)}: {textio.escape(reason)}")
    if len(result.failed) > 20:
      print(f"... and {len(result.failed) - 20} more (see the failures file)")
    if result.recovered:
      print(f"recovered {result.recovered} images an interrupted run had extracted")
    if result.int8:
      print(result.int8)
    if result.statistics:
      print(result.statistics)
    label = " [RANDOM weights, not ImageNet]" if extractor.weights_info.is_random else ""
    print(f"{result.summary()}{label}")
    if result.indexed + result.unchanged == 0 and result.failed:
      raise cli.UserError("no image could be indexed")
    if result.indexed + result.unchanged + len(result.failed) == 0:
      raise cli.UserError(f"no images found under {_IMAGES.value}")
    if _COMPACT.value:
      _compact()
    if _WATCH.value:
      print(f"watching {_IMAGES.value} (Ctrl-C stops)", flush=True)
      watch.watch_folder(
        _IMAGES.value,
        _INDEX.value,
        extractor,
        commit_every=_COMMIT_EVERY.value,
        poll=_WATCH_POLL.value,
        on_pass=_print_pass,
      )


def _print_pass(report: indexing.IndexReport) -> None:
  if report.indexed or report.pruned:
    print(report.summary(), flush=True)


def _compact() -> None:
  with store.Index.open(_INDEX.value) as idx:
    before = len(idx.segments)
    idx.compact()
    print(f"compacted {before} segments into {len(idx.segments)} ({len(idx)} images)")


if __name__ == "__main__":
  app.run(main)
