r"""Writes the sample photo collection of the demo (synthetic scenes and transformed copies).

python -m engine.sample --output=DIR [--scenes=48] [--queries=12] [--seed=0]
"""

from __future__ import annotations

from absl import app, flags

from engine.app.sample import make_collection

_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the collection into.")
_SCENES = flags.DEFINE_integer("scenes", 48, "Number of photos.", lower_bound=1)
_QUERIES = flags.DEFINE_integer("queries", 12, "Number of transformed copies.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
flags.mark_flag_as_required("output")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  truth = make_collection(_OUTPUT.value, _SCENES.value, _QUERIES.value, _SEED.value)
  print(f"wrote {_SCENES.value} photos and {len(truth)} queries under {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
