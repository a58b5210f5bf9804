"""Native CPU kernels, called from jit-compiled code through XLA's FFI.

`scan_topk.cc`: a fused scan + top-k over int8 rows (x86 CPUs with AVX512-VNNI), bfloat16 rows
(AVX512-BF16) and float16 rows (AVX-512; few queries); see the file's header and BUILD.md for why
XLA's own products are not enough on CPU. It is compiled from source with the system C++ compiler
on first use, against the FFI headers that ship with jaxlib, and cached in `native/` of the
engine's cache (`$VGG_RETRIEVAL_CACHE`, default `~/.cache/vgg-retrieval`), keyed by the source, the
jaxlib version and the compiler. Where a kernel cannot be used (another architecture, a CPU without
the extension, no compiler, `VGG_RETRIEVAL_NATIVE=0`) `available(dtype)` is False, the reason is
logged once, and `engine.search` runs XLA's products instead: same results, slower.

`python -m engine.kernels.native` builds the kernels and prints which are usable.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from absl import logging

from engine.common import fileio

INT8_TOPK = "vgg_int8_topk"
BF16_TOPK = "vgg_bf16_topk"
F16_TOPK = "vgg_f16_topk"
SOURCE = Path(__file__).with_name("scan_topk.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")


def _cache_dir() -> Path:
  return Path(fileio.cache_root()) / "native"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def build() -> Path:
  """Compiles `scan_topk.cc` (once per source, jaxlib and compiler) and returns the library's path.

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
  out = _cache_dir() / f"scan_topk-{digest.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
    obj = Path(scratch) / SOURCE.with_suffix(".so").name
    proc = subprocess.run(
      [cxx, *_FLAGS, f"-I{include}", str(SOURCE), "-o", str(obj)], capture_output=True, text=True
    )
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
    # fsynced and renamed: a crash never leaves a torn library to load (a concurrent build of
    # the same key writes the same bytes).
    fileio.atomic_write(out, lambda f: f.write(obj.read_bytes()))
  return out


_load_lock = threading.Lock()


def _load() -> dict[str, str | None]:
  """Builds, loads and registers the kernels once: {dtype: None when usable, else why not}."""
  with _load_lock:  # concurrent first searches must not build or register twice
    return _load_once()


@functools.cache
def _load_once() -> dict[str, str | None]:
  if os.environ.get("VGG_RETRIEVAL_NATIVE", "1") == "0":
    return dict.fromkeys(_KERNELS, "disabled by VGG_RETRIEVAL_NATIVE=0")
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return dict.fromkeys(
      _KERNELS, f"the kernels are for x86-64 (this machine: {platform.machine()})"
    )
  try:
    import ctypes

    import jax

    lib = ctypes.CDLL(str(build()))
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return dict.fromkeys(_KERNELS, f"could not build or load {SOURCE.name}: {e}")
  out = {}
  for dtype, (target, handler, supported, extension) in _KERNELS.items():
    if not getattr(lib, supported)():
      out[dtype] = f"this CPU lacks {extension}"
      continue
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, handler)), platform="cpu")
    out[dtype] = None
  return out


# storage dtype -> (FFI target, handler symbol, support probe, the CPU extension it needs)
_KERNELS = {
  "int8": (INT8_TOPK, "VggInt8TopK", "vgg_int8_topk_supported", "AVX512-VNNI"),
  "bfloat16": (BF16_TOPK, "VggBf16TopK", "vgg_bf16_topk_supported", "AVX512-BF16"),
  "float16": (F16_TOPK, "VggF16TopK", "vgg_f16_topk_supported", "AVX-512"),
}
_logged: set[str] = set()


def available(dtype: str = "int8") -> bool:
  """True when the scan kernel for `dtype` ("int8", "bfloat16", "float16") is usable here."""
  reason = _load()[dtype]
  if reason is not None and dtype not in _logged:
    _logged.add(dtype)
    logging.info("native %s search kernel not used (XLA instead): %s", dtype, reason)
  return reason is None


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


def status() -> str:
  """A one-line description for benchmarks and bug reports."""
  parts = [f"{d}: {'in use' if r is None else f'off ({r})'}" for d, r in _load().items()]
  return "native scan kernels: " + "; ".join(parts)
