"""Native CPU kernels, called from jit-compiled code through XLA's FFI.

One kernel today: `int8_topk.cc`, a fused int8 scan + top-k for x86 CPUs with AVX512-VNNI (see the
file's header and BUILD.md for why XLA's own int8 product is not enough on CPU). It is compiled from
source with the system C++ compiler on first use, against the FFI headers that ship with jaxlib, and
cached in `native/` of the engine's cache (`$VGG_RETRIEVAL_CACHE`, default `~/.cache/vgg-retrieval`),
keyed by the source, the jaxlib version and the compiler. Where it cannot be used (another architecture, a CPU without
VNNI, no compiler, `VGG_RETRIEVAL_NATIVE=0`) `available()` is False, the reason is logged once, and
`engine.search` runs XLA's int8 product instead: same results, slower.

`python -m engine.native` builds the kernel and prints whether it is usable.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from absl import logging

from engine import fileio

INT8_TOPK = "vgg_int8_topk"
SOURCE = Path(__file__).with_name("int8_topk.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")


def _cache_dir() -> Path:
  return Path(fileio.cache_root()) / "native"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def build() -> Path:
  """Compiles `int8_topk.cc` (once per source, jaxlib and compiler) and returns the library's path.

  Raises:
    RuntimeError: no C++ compiler, or the compilation failed (its output is in the message).
  """
  import jax
  import jaxlib

  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX or install g++)")
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
  include = jax.ffi.include_dir()
  digest = hashlib.sha256()
  for part in (
    SOURCE.read_bytes(),
    jaxlib.__version__.encode(),
    version.encode(),
    str(_FLAGS).encode(),
  ):
    digest.update(part)
  out = _cache_dir() / f"int8_topk-{digest.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".int8_topk-", suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    proc = subprocess.run(
      [cxx, *_FLAGS, f"-I{include}", str(SOURCE), "-o", tmp], capture_output=True, text=True
    )
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the kernel; returns None when usable, else the reason it is not."""
  if os.environ.get("VGG_RETRIEVAL_NATIVE", "1") == "0":
    return "disabled by VGG_RETRIEVAL_NATIVE=0"
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return f"the kernel is for x86-64 (this machine: {platform.machine()})"
  try:
    import ctypes

    import jax

    lib = ctypes.CDLL(str(build()))
    if not lib.vgg_int8_topk_supported():
      return "this CPU lacks AVX512-VNNI"
    jax.ffi.register_ffi_target(INT8_TOPK, jax.ffi.pycapsule(lib.VggInt8TopK), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return f"could not build or load {SOURCE.name}: {e}"
  return None


def vnni_peak_gops(threads: int, seconds: float = 0.3) -> float:
  """Measured VNNI int8 multiply-add ceiling of `threads` cores at once, in GOP/s (needs the kernel)."""
  import ctypes
  from concurrent.futures import ThreadPoolExecutor

  if not available():
    raise RuntimeError(status())
  fn = ctypes.CDLL(str(build())).vgg_vnni_peak_gops
  fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int64]
  iters = max(1, int(fn(100_000) * 1e9 * seconds / (12 * 64 * 2)))  # calibrate, then time
  with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL during the call
    return sum(pool.map(fn, [iters] * threads))


def available() -> bool:
  """True when the int8 kernel is compiled, loaded and registered for this CPU."""
  reason = _load()
  if reason is not None and not getattr(available, "_logged", False):
    available._logged = True
    logging.info("native int8 search kernel not used (XLA's int8 product instead): %s", reason)
  return reason is None


def status() -> str:
  """A one-line description for benchmarks and bug reports."""
  reason = _load()
  return "native int8 kernel: in use" if reason is None else f"native int8 kernel: off ({reason})"
