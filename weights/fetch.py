"""Downloads a published VGG-16 file, checks it against `weights.sources`, converts it into a cache.

    python -m weights.fetch --source=keras_h5|torchvision|timm [--cache_dir=DIR]

prints the converted weights folder (`CACHE/{source}-vgg16`, CACHE being the engine's cache:
`$VGG_RETRIEVAL_CACHE`, default `~/.cache/vgg-retrieval`, where `--weights=auto` looks); if it is
already there, nothing is downloaded. The download streams to a temporary file beside its final name and is renamed into place
only once its size and checksums match. Offline, the first connection attempt fails within
`timeout` seconds with a message that names the URL and the `weights.convert` command for a file
obtained some other way.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request

from absl import app

from engine.common.errors import UserError
from engine.common.fileio import atomic_write, cache_root, file_digests
from engine.features import checkpoint
from weights import convert as convert_lib
from weights import sources

CONNECT_TIMEOUT_S = 10.0
_CHUNK = 1 << 20


class FetchError(UserError):
  """A download that failed or did not verify; str() is one line a person can act on."""


def _by_other_means(src: sources.Source) -> str:
  return (
    f"if you have {src.filename} from elsewhere, convert it with `python -m weights.convert "
    f"--source={src.name} --input=FILE --output=DIR`"
  )


def _check(src: sources.Source, size: int, sha256: str, md5: str) -> str | None:
  """Why the file does not match the published record, or None if it does."""
  if src.size is not None and size != src.size:
    return f"size {size} bytes, expected {src.size}"
  if src.sha256 is not None and sha256 != src.sha256:
    return f"sha256 {sha256}, expected {src.sha256}"
  if src.sha256_prefix is not None and not sha256.startswith(src.sha256_prefix):
    return f"sha256 {sha256}, expected one starting with {src.sha256_prefix}"
  if src.md5 is not None and md5 != src.md5:
    return f"md5 {md5}, expected {src.md5}"
  return None


def _hashes(path: str) -> tuple[int, str, str]:
  digests = file_digests(path, "sha256", "md5")
  return os.path.getsize(path), digests["sha256"], digests["md5"]


def _download(src: sources.Source, path: str, timeout: float) -> None:
  """Streams `src.url` to `path` through a temporary file; verifies before the rename."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  request = urllib.request.Request(src.url, headers={"User-Agent": "vgg-retrieval-engine"})
  print(f"downloading {src.url}", file=sys.stderr)

  def stream_and_check(f):
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    try:
      with urllib.request.urlopen(request, timeout=timeout) as response:
        while block := response.read(_CHUNK):
          f.write(block)
          sha.update(block)
          md5.update(block)
          size += len(block)
    except (urllib.error.URLError, OSError, ValueError) as e:
      reason = getattr(e, "reason", None) or e
      raise FetchError(f"cannot download {src.url} ({reason}); {_by_other_means(src)}") from e
    problem = _check(src, size, sha.hexdigest(), md5.hexdigest())
    if problem:  # raising here deletes the temporary file: nothing unverified is kept
      raise FetchError(
        f"the file downloaded from {src.url} does not match weights/sources.py: {problem}; "
        "it was not used"
      )
    if src.sha256 is None:
      print(
        f"{src.filename}: sha256 {sha.hexdigest()} (no published sha256; checked "
        f"{'md5' if src.md5 else 'the sha256 prefix'})",
        file=sys.stderr,
      )

  atomic_write(path, stream_and_check)


def fetch(
  source: str,
  cache_dir: str | os.PathLike | None = None,
  *,
  timeout: float = CONNECT_TIMEOUT_S,
) -> str:
  """Makes sure `CACHE/{source}-vgg16` holds the converted official weights; returns its path.

  Args:
    source: `keras_h5`, `torchvision` or `timm`.
    cache_dir: where downloads (`downloads/{source}/{filename}`) and converted folders live;
      default the engine's cache (`engine.common.fileio.cache_root()`).
    timeout: seconds to wait for the connection and for each read.

  Raises:
    FetchError: unknown source, no network, or a file that does not match its published record.
    convert.ConvertError: the verified file does not convert (it should never happen).
  """
  try:
    src = sources.get(source)
  except ValueError as e:
    raise FetchError(str(e)) from e
  cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir or cache_root())))
  out_dir = os.path.join(cache_dir, f"{source}-vgg16")
  try:
    checkpoint.read_info(out_dir)
    return out_dir
  except checkpoint.WeightsError:
    pass
  path = os.path.join(cache_dir, "downloads", source, src.filename)
  if not (os.path.isfile(path) and _check(src, *_hashes(path)) is None):
    _download(src, path, timeout)
  convert_lib.convert(source, path, out_dir, overwrite=True)
  return out_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    path = fetch(_SOURCE.value, _CACHE_DIR.value)
  except UserError as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(path)


if __name__ == "__main__":
  from absl import flags

  _SOURCE = flags.DEFINE_enum("source", None, sorted(sources.SOURCES), "Which file to fetch.")
  _CACHE_DIR = flags.DEFINE_string(
    "cache_dir",
    None,
    "Downloads and converted weights folders go here (default: $VGG_RETRIEVAL_CACHE or "
    "~/.cache/vgg-retrieval, where --weights=auto looks).",
  )
  flags.mark_flag_as_required("source")
  app.run(main)
