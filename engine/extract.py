r"""Extracts descriptors of images into `features.npy` and `paths.txt`.

  python -m engine.extract --images=DIR_OR_FILE --weights=DIR|random --descriptor=fc2 --output=DIR

Writes `DIR/features.npy` (float32 `[N, D]`, L2-normalised unless --normalize=false) and
`DIR/paths.txt` (one path per line, same order). Files that cannot be decoded are listed in
`DIR/errors.txt` with the reason and skipped. With --precision=int8 the model is first quantised on
--calibration_images of the images, and `DIR/extract.json` records it.
"""

from __future__ import annotations

from absl import app, flags

from engine import cli
from engine.app import extraction

_IMAGES = flags.DEFINE_string("images", None, "Image file or folder (searched recursively).")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for features.npy, paths.txt, errors.txt.")
_NORMALIZE = flags.DEFINE_bool("normalize", True, "L2-normalise each descriptor.")
cli.define_descriptor_flags("fc2", "Descriptor: a network layer or a pooling of conv5_3.")
cli.define_extractor_flags()
cli.define_calibration_flag()
flags.adopt_module_key_flags(cli)
flags.mark_flags_as_required(["images", "output"])


def main(argv):
  cli.configure_process()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors():
    extractor = extraction.build(cli.descriptor(), cli.settings(), normalize=_NORMALIZE.value)
    out = extraction.extract_to_folder(
      extractor,
      _IMAGES.value,
      _OUTPUT.value,
      calibration_images=flags.FLAGS.calibration_images,
    )
  label = " (RANDOM weights, not ImageNet)" if extractor.weights_info.is_random else ""
  print(
    f"wrote {out.count} x {out.dim} {extractor.descriptor.name} features to {_OUTPUT.value}"
    f"{label}; {len(out.skipped)} files skipped (see errors.txt)"
  )


if __name__ == "__main__":
  app.run(main)
