r"""Exports the extraction model (weights, descriptor pooling, normalisation) to ONNX.

python -m engine.export --weights=DIR|random --descriptor=fc2 --output=model.onnx
"""

from __future__ import annotations

from absl import app, flags

from engine import cli
from engine.app import extraction
from engine.features.model import PRESETS
from engine.features.onnx_export import FORMATS, export_onnx

_WEIGHTS = flags.DEFINE_string(
  "weights", "auto", "Converted weights folder, 'random[:SEED]' (NOT ImageNet) or 'auto'."
)
_CONFIG = flags.DEFINE_enum("config", "vgg16", list(PRESETS), "Model preset for random.")
_GEM_P = flags.DEFINE_float("gem_p", 3.0, "GeM exponent.")
_NORMALIZE = flags.DEFINE_bool("normalize", True, "L2-normalise each descriptor.")
_FORMAT = flags.DEFINE_enum("format", "onnx", list(FORMATS), "Output format.")
_OUTPUT = flags.DEFINE_string("output", None, "File to write.")
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", 0, "Fixed batch size, or 0 for a symbolic batch.", lower_bound=0
)
_IMAGE_SIZE = flags.DEFINE_integer(
  "image_size", None, "Square input side (default: 224 for fc1/fc2/pool5, 320 otherwise)."
)
_HEIGHT = flags.DEFINE_integer("height", None, "Input height (pooled descriptors only).")
_WIDTH = flags.DEFINE_integer("width", None, "Input width (pooled descriptors only).")
cli.define_descriptor_flags("fc2", "Descriptor: a network layer or a pooling of conv5_3.")
flags.adopt_module_key_flags(cli)
flags.mark_flag_as_required("output")


def main(argv):
  cli.configure_process()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors():
    settings = extraction.Settings(
      weights=_WEIGHTS.value,
      config=_CONFIG.value,
      image_size=_IMAGE_SIZE.value,
      gem_p=_GEM_P.value,
    )
    extractor = extraction.build(cli.descriptor(), settings, normalize=_NORMALIZE.value)
    try:
      export_onnx(
        extractor,
        _OUTPUT.value,
        batch_size=_BATCH_SIZE.value or None,
        height=_HEIGHT.value,
        width=_WIDTH.value,
      )
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
