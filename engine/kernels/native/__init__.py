"""Native CPU kernels, called from jit-compiled code through XLA's FFI: the one owner of them.

`scan_topk.cc` is a fused scan + top-k over int8, bfloat16 and float16 rows (see `scan_topk.h` and
BUILD.md for why XLA's own products are not enough on CPU); the loops of each instruction set live in
`scan_avx512.cc`, `scan_avx2.cc`, `scan_amx.cc` and `scan_neon.cc`, all compiled by one compiler
run into one library (`SOURCES`; `neon_check.cc` and `emulated_check.cc` are test programs). This
module is its only Python face:
`scan_topk(...)` is the FFI call that `engine.kernels.topk` and the tests make, `available(dtype)`
and `isa(dtype)` say whether and how a dtype runs natively here, `build()` compiles the library.

Build step. Nothing compiles on import, while `topk` is traced, or while pytest collects tests:
`build()` runs only when called, from `python -m engine.kernels.native` (which scripts/setup.sh
runs) or from a test fixture. A search on a machine where the library was never built uses XLA's
products and says so once; building lazily inside a search would put a compiler run of many
seconds, and its failure modes, inside the first query of a service.

Run-time CPU dispatch. The CPU's features are read first (/proc/cpuinfo); a CPU that runs none
of the kernels' instruction sets (AVX2 + FMA + F16C, AVX-512, AArch64 NEON) gets no compiler run at
all. On x86-64 the one library holds the AVX2 and the AVX-512 loops (per-function target
attributes, baseline code elsewhere: no file is compiled with -m flags, so no AVX-512 code reaches
the paths an AVX2 CPU runs) and each call takes the best one the CPU has, unless `isa` names another
(tests):
  * int8: AMX-INT8 (tiles, TDPBSSD) for batches, else AVX512-VNNI (vpdpbusd), else AVX-VNNI (its
    VEX form on 256 bits), else AVX2 (vpmaddubsw + vpmaddwd); Linux must grant a process the AMX
    tile state, and where it refuses the next path runs and `status()` says why;
  * bfloat16: AVX512-BF16 (vdpbf16ps), else AVX2 (rows widened by a shift, FMA);
  * float16: AVX-512 (few queries), else AVX2 + F16C (vcvtph2ps, FMA).
On AArch64 NEON loops serve up to 8 queries (int8 with sdot when the CPU has it: the library is then
built with +dotprod; bfloat16 and float16 widened exactly, FMA); larger batches run XLA's products.

Cache trust. The library lives in `native/` of the engine's cache (`$VGG_RETRIEVAL_CACHE`, default
`~/.cache/vgg-retrieval`), named by a key of the sources and the header, jaxlib, the compiler and
its flags, with a sha256 digest written beside it at build time. It is loaded only when every folder
from the cache root down is owned by this user and not writable by group or others, and the file's
digest matches the recorded one: a torn or planted library is never dlopen'ed (`build()` rebuilds a
mismatch).

Emulation, for tests. With `VGG_RETRIEVAL_NATIVE_EMULATE=1` (or the path of SIMDe's include folder)
on x86-64 the library is built against SIMDe instead of the CPU's intrinsics (`simd_x86.h`): every
x86 loop, AVX-512 included, then runs on any x86-64 CPU and `paths(dtype)` lists them all, so
tests/test_native_emulated.py checks the paths this machine's CPU lacks. Never for searches.

Where no kernel can be used (another architecture, a CPU without the extensions, no library built,
an untrusted cache, `VGG_RETRIEVAL_NATIVE=0`) `available(dtype)` is False, one WARNING line says
why, and `engine.kernels.topk` runs XLA's products instead: same results, slower.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

from absl import logging

from engine.common import fileio

INT8_TOPK = "vgg_int8_topk"
BF16_TOPK = "vgg_bf16_topk"
F16_TOPK = "vgg_f16_topk"
_HERE = Path(__file__).parent
# The library's sources, in one place: compiled together by one compiler run. Each loop file is
# empty on the other architecture (#if), so one list serves x86-64 and AArch64.
SOURCES = tuple(
  _HERE / name
  for name in ("scan_topk.cc", "scan_avx512.cc", "scan_avx2.cc", "scan_amx.cc", "scan_neon.cc")
)
HEADERS = (_HERE / "scan_topk.h", _HERE / "simd_x86.h")
SOURCE = SOURCES[0]  # the dispatch and the FFI handlers
# ISO C++ (no -ffast-math, no FMA contraction): scores are the same float operations on every path.
_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-w")
DTYPES = ("int8", "bfloat16", "float16")

# The instruction-set paths of each dtype, best first: (name, code passed to the kernel, the
# /proc/cpuinfo flags it needs). The codes are scan_topk.h's kIsa*.
_AVX2 = frozenset({"avx2", "fma", "f16c"})
_AVX512 = frozenset({"avx512f", "avx512bw"})
_NEON = ("neon", 3, frozenset({"asimd"}))  # AArch64; int8 uses sdot where the CPU has asimddp
ISAS = {
  "int8": (
    ("amx-int8", 5, _AVX512 | {"amx_tile", "amx_int8"}),  # batches only (MANY_ONLY)
    ("avx512-vnni", 2, _AVX512 | {"avx512_vnni"}),
    ("avx-vnni", 4, _AVX2 | {"avx_vnni"}),  # the VEX vpdpbusd (Alder Lake, Sapphire Rapids, Zen 5)
    ("avx2", 1, _AVX2),
    _NEON,
  ),
  "bfloat16": (("avx512-bf16", 2, _AVX512 | {"avx512_bf16"}), ("avx2", 1, _AVX2), _NEON),
  "float16": (("avx512", 2, _AVX512), ("avx2", 1, _AVX2), _NEON),
}
# Queries per call of the few-query-only paths (the others take any number).
FEW_QUERIES = 8
# Paths for more than FEW_QUERIES queries only: few queries take the next path.
MANY_ONLY = {("int8", "amx-int8")}
MANY_QUERIES = {
  ("int8", "amx-int8"),
  ("int8", "avx512-vnni"),
  ("int8", "avx-vnni"),
  ("int8", "avx2"),
  ("bfloat16", "avx512-bf16"),
  ("bfloat16", "avx2"),
  ("float16", "avx2"),
}
EMULATE_ENV = "VGG_RETRIEVAL_NATIVE_EMULATE"
_TARGETS = {"int8": INT8_TOPK, "bfloat16": BF16_TOPK, "float16": F16_TOPK}
_HANDLERS = {"int8": "VggInt8TopK", "bfloat16": "VggBf16TopK", "float16": "VggF16TopK"}


def simde_include() -> Path | None:
  """SIMDe's include folder (the `cmeel-simde` wheel's, or the system's), or None."""
  import sysconfig

  given = os.environ.get(EMULATE_ENV, "")
  places = [Path(given)] if given not in ("", "0", "1") else []
  places += [Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "include"]
  places += [Path("/usr/include")]
  return next((p for p in places if (p / "simde" / "x86" / "avx512.h").is_file()), None)


def emulated() -> bool:
  """Whether this process builds and loads the SIMDe-emulated x86 library (tests only)."""
  return os.environ.get(EMULATE_ENV, "0") not in ("", "0") and platform.machine().lower() in (
    "x86_64",
    "amd64",
  )


def cpu_flags() -> frozenset[str]:
  """The CPU's feature flags as /proc/cpuinfo names them (x86 "flags", ARM "Features").

  Under emulation, every flag an x86 path needs: SIMDe provides them all."""
  if emulated():
    return frozenset().union(*(need for d in DTYPES for _, _, need in ISAS[d][:-1]))
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      return frozenset(value.split())
  return frozenset()


def paths_for(dtype: str, flags: frozenset[str]) -> list[str]:
  """The instruction-set paths of `dtype` that a CPU with /proc/cpuinfo `flags` runs, best first:
  the dispatch decision as a pure function (the library's own cpuid check must agree, see
  `_probe`; tests ask it about CPUs this machine is not)."""
  return [name for name, _, need in ISAS[dtype] if need <= flags]


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cache_dir() -> Path:
  return Path(fileio.cache_root()) / "native"


def _untrusted(path: Path, root: Path) -> str | None:
  """Why `path` (a file or folder inside `root`, or `root` itself) may not be trusted, or None.

  Every folder from `root` down to `path` must be owned by this user and not writable by group or
  others: anyone else who can write there can replace the library and its digest together.
  """
  path, root = path.resolve(), root.resolve()  # symbolic links: judge what they point to
  if path != root and root not in path.parents:
    return f"{path} lies outside the cache {root}"
  chain = [path, *[p for p in path.parents if p == root or root in p.parents]]
  uid = os.getuid()
  for p in chain:
    try:
      st = os.stat(p)
    except FileNotFoundError:
      continue
    if st.st_uid != uid:
      return f"{p} is owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
      mode = stat.S_IMODE(st.st_mode)
      return f"{p} is writable by group or others (mode {mode:o}; `chmod go-w {p}` if it is yours)"
  return None


def _flags(cpu: frozenset[str]) -> tuple[str, ...]:
  """Compiler flags: baseline code everywhere (the x86 kernels carry their own target attributes);
  on AArch64 the int8 loop is built with sdot only for a CPU that has it."""
  if platform.machine().lower() in ("aarch64", "arm64") and "asimddp" in cpu:
    return (*_FLAGS, "-march=armv8.2-a+dotprod")
  if emulated():
    include = simde_include()
    if include is None:
      raise RuntimeError(
        f"{EMULATE_ENV} is set but SIMDe's headers are not installed (cmeel-simde)"
      )
    # -O1: SIMDe's portable loops compile several times faster, and run fast enough for tests.
    return (*_FLAGS, "-O1", "-DVGG_SCAN_EMULATE", f"-I{include}")
  return _FLAGS


def _key(cxx: str) -> str:
  import jax
  import jaxlib

  version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
  digest = hashlib.sha256()
  for path in (*SOURCES, *HEADERS):  # the name too: a part moved between files changes the key
    digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    digest.update(path.read_bytes())
  for part in (
    jaxlib.__version__.encode(),
    version.encode(),
    str(_flags(cpu_flags())).encode(),
    jax.ffi.include_dir().encode(),
  ):
    digest.update(part)
  return digest.hexdigest()[:16]


def library_path() -> Path:
  """Where the library for these sources, jaxlib and compiler lives (built or not).

  Raises:
    RuntimeError: no C++ compiler found.
  """
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX or install g++)")
  return _cache_dir() / f"scan_topk-{_key(cxx)}.so"


def _digest_path(lib: Path) -> Path:
  return lib.with_name(lib.name + ".sha256")


def verify(lib: Path) -> str | None:
  """Why the library at `lib` must not be loaded, or None when it may be (trusted, digest matches)."""
  root = Path(fileio.cache_root())
  why = _untrusted(lib, root) or _untrusted(_digest_path(lib), root)
  if why:
    return f"untrusted cache: {why}"
  if not lib.exists() or not _digest_path(lib).exists():
    return f"not built (run `python -m engine.kernels.native`; looked for {lib})"
  recorded = _digest_path(lib).read_text().split()[0] if _digest_path(lib).stat().st_size else ""
  if fileio.sha256_file(lib) != recorded:
    return f"{lib.name} does not match its recorded sha256 (torn or replaced; rebuild it)"
  return None


def _compile(cxx: str, out: Path) -> None:
  """Compiles SOURCES into the one library `out` (a scratch path)."""
  import jax

  include = f"-I{jax.ffi.include_dir()}"
  proc = subprocess.run(
    [cxx, *_flags(cpu_flags()), include, *map(str, SOURCES), "-o", str(out)],
    capture_output=True,
    text=True,
  )
  if proc.returncode != 0:
    names = ", ".join(p.name for p in SOURCES)
    raise RuntimeError(f"compiling {names} failed:\n{proc.stderr[-4000:]}")


def _cannot_run(flags: frozenset[str]) -> str | None:
  """Why no kernel of the library runs on this machine, or None."""
  if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
    return f"the kernels are for x86-64 and AArch64 (this machine: {platform.machine()})"
  if not any(paths_for(d, flags) for d in DTYPES):
    return "this CPU has neither AVX2 + FMA + F16C nor AVX-512 (nor NEON)"
  return None


def build() -> Path:
  """Compiles SOURCES unless a verified library for these sources, jaxlib and compiler exists.

  Returns:
    The library's path; its sha256 digest is recorded beside it.

  Raises:
    RuntimeError: the CPU runs none of the kernels (nothing is compiled), no C++ compiler, an
      untrusted cache folder, or the compilation failed (its output is in the message).
  """
  why = _cannot_run(cpu_flags())
  if why:
    raise RuntimeError(f"not built: {why}")
  out = library_path()
  root = Path(fileio.cache_root())
  out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
  why = _untrusted(out.parent, root)
  if why:
    raise RuntimeError(f"not built: untrusted cache: {why}")
  if verify(out) is None:
    _forget_missing()
    return out
  with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
    obj = Path(scratch) / SOURCE.with_suffix(".so").name
    _compile(_compiler(), obj)
    data = obj.read_bytes()
  # Library first, then its digest, each fsynced and renamed: a crash leaves a missing or stale
  # digest, which `verify` refuses, never a torn library that loads.
  fileio.atomic_write(out, lambda f: f.write(data))
  fileio.atomic_write_text(_digest_path(out), f"{hashlib.sha256(data).hexdigest()}  {out.name}\n")
  for path in (out, _digest_path(out)):  # a umask of 002 would leave them group-writable: refused
    os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & ~0o022)
  _forget_missing()
  return out


def _forget_missing() -> None:
  """After a build, a process that found no library looks again on its next `available`."""
  global _state
  with _lock:
    if _state is not None and _state.lib is None:
      _state = None


@dataclasses.dataclass
class _State:
  lib: ctypes.CDLL | None
  paths: dict[str, list[str]]  # dtype -> usable paths, best first
  reasons: dict[str, str]  # dtype -> why it has none
  notes: list[str] = dataclasses.field(default_factory=list)  # paths the CPU has but not in use
  warned: bool = False


_state: _State | None = None
_lock = threading.Lock()
_registered: set[str] = set()


def _probe(flags: frozenset[str]) -> _State:
  """Loads and registers a verified library (never compiles) and works out each dtype's paths."""
  if os.environ.get("VGG_RETRIEVAL_NATIVE", "1") == "0":
    return _State(None, {}, dict.fromkeys(DTYPES, "disabled by VGG_RETRIEVAL_NATIVE=0"))
  why = _cannot_run(flags)
  if why is None:
    try:
      lib_path = library_path()
      why = verify(lib_path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
      why = str(e)
  if why:
    return _State(None, {}, dict.fromkeys(DTYPES, why))
  import jax

  try:
    lib = ctypes.CDLL(str(lib_path))
  except OSError as e:
    return _State(None, {}, dict.fromkeys(DTYPES, f"could not load {lib_path.name}: {e}"))
  paths, reasons, notes = {}, {}, []
  for dtype in DTYPES:
    # Both the kernel's own cpuid check and /proc/cpuinfo must agree that a path runs here.
    probe = lib.vgg_topk_isas
    probe.restype, probe.argtypes = ctypes.c_int, [ctypes.c_int]
    mask = probe(DTYPES.index(dtype))
    codes = {name: code for name, code, _ in ISAS[dtype]}
    paths[dtype] = [p for p in paths_for(dtype, flags) if mask >> codes[p] & 1]
    if dtype == "int8" and "amx-int8" in paths_for(dtype, flags) and "amx-int8" not in paths[dtype]:
      notes.append(f"amx-int8 not used: {_amx_refusal(lib)}")
    if not paths[dtype]:
      reasons[dtype] = "this CPU lacks " + " or ".join(name.upper() for name, _, _ in ISAS[dtype])
      continue
    if _TARGETS[dtype] not in _registered:  # once per process: XLA keeps the first handler
      handler = jax.ffi.pycapsule(getattr(lib, _HANDLERS[dtype]))
      jax.ffi.register_ffi_target(_TARGETS[dtype], handler, platform="cpu")
      _registered.add(_TARGETS[dtype])
  return _State(lib, paths, reasons, notes)


def _amx_refusal(lib: ctypes.CDLL) -> str:
  """Why a CPU whose flags list AMX-INT8 does not get the AMX path (the library's AmxStatus)."""
  code = lib.vgg_amx_status()
  if code == -1:
    return "the library found no usable AMX tile state (cpuid / XCR0)"
  if code == 0:
    return "the library was built by a compiler without AMX support"
  return f"Linux refused this process the AMX tile state (arch_prctl: {os.strerror(code)})"


def _load() -> _State:
  global _state
  with _lock:  # concurrent first searches must not load or register twice
    if _state is None:
      _state = _probe(cpu_flags())
    if _state.reasons and not _state.warned:
      _state.warned = True
      logging.warning("%s; XLA's products run instead", _describe(_state))
    elif _state.notes and not _state.warned:
      _state.warned = True
      logging.warning("native scan kernels: %s", "; ".join(_state.notes))
    return _state


def _describe(state: _State) -> str:
  off = state.reasons
  if len(set(off.values())) == 1 and len(off) == len(DTYPES):
    return f"native scan kernels not used: {next(iter(off.values()))}"
  on = [f"{d} ({state.paths[d][0]})" for d in DTYPES if d not in off]
  parts = [f"{d}: {r}" for d, r in off.items()]
  return f"native scan kernels in use for {', '.join(on)}; not for {'; '.join(parts)}"


def pick_path(dtype: str, queries: int, paths: list[str], isa: str | None = None) -> str | None:
  """The first of `paths` (best first, e.g. `paths_for(dtype, flags)`), or `isa` if among them,
  that scans `queries` queries per call: the per-call dispatch, a pure function."""
  for path in paths:
    if queries <= FEW_QUERIES and (dtype, path) in MANY_ONLY:
      continue
    if isa in (None, path) and (queries <= FEW_QUERIES or (dtype, path) in MANY_QUERIES):
      return path
  return None


def _path_for(dtype: str, queries: int, isa: str | None = None) -> str | None:
  """The best path here (or `isa`, if it runs here) that scans `queries` queries per call."""
  return pick_path(dtype, queries, _load().paths.get(dtype, []), isa)


def available(dtype: str = "int8", queries: int = 1) -> bool:
  """True when a native scan kernel for rows of `dtype` and `queries` queries per call runs here.

  Never compiles: it loads a library that `build()` made earlier, after checking it.
  """
  return _path_for(dtype, queries) is not None


def isa(dtype: str) -> str | None:
  """The instruction-set path a call over `dtype` rows takes here ("avx2", ...), or None."""
  paths = _load().paths.get(dtype, [])
  return paths[0] if paths else None


def paths(dtype: str) -> list[str]:
  """Every instruction-set path of `dtype` this CPU runs, best first (tests compare them all)."""
  return list(_load().paths.get(dtype, []))


def scan_topk(
  queries,
  matrix,
  scales,
  qmul,
  bias,
  k: int,
  *,
  query_offset=None,
  row_weight=None,
  isa: str | None = None,
):
  """The fused scan: the k best rows per query by `dot(queries[q], matrix[r]) * scales[r] *
  qmul[q] + bias[r] + query_offset[q] * row_weight[r]`, computed in that order in float32 (no fused
  multiply-adds), ties to the lower row (an `jax.ffi.ffi_call`; works under jit and vmap).

  Args:
    queries: [Q, D] int8 in [-127, 127] for an int8 matrix (as `topk` quantises them; the AVX2
      path's sign trick needs it), else float32.
    matrix: [N, D] int8, bfloat16 or float16; D * itemsize a multiple of 4, D <= 65536.
    scales, bias: [N] float32 (bias -inf drops a row); qmul: [Q] float32.
    k: results per query, at most N.
    query_offset, row_weight: [Q] and [N] float32, a rank-one term (collection statistics);
      None for both: no term.
    isa: one of `paths(dtype)` to force that path; None takes the best one for Q queries.

  Returns:
    scores [Q, k] float32 best first, and ids [Q, k] int32 (-inf / -1 where fewer rows scored).

  Raises:
    RuntimeError: no native kernel for this dtype and Q here (see `status()`).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  dtype = jnp.dtype(matrix.dtype).name
  q = queries.shape[0]
  if isa is not None and isa not in paths(dtype):
    raise RuntimeError(f"the {isa} path of the {dtype} kernel does not run here: {status()}")
  path = _path_for(dtype, q, isa)
  if path is None:
    raise RuntimeError(f"no native {dtype} kernel for {q} queries here: {status()}")
  if (query_offset is None) != (row_weight is None):
    raise ValueError("query_offset and row_weight go together")
  if query_offset is None:
    query_offset = jnp.zeros((q,), jnp.float32)
    row_weight = jnp.zeros((matrix.shape[0],), jnp.float32)
  codes = {name: code for name, code, _ in ISAS[dtype]}
  out = (
    jax.ShapeDtypeStruct((q, k), jnp.float32),
    jax.ShapeDtypeStruct((q, k), jnp.int32),
  )
  call = jax.ffi.ffi_call(_TARGETS[dtype], out, vmap_method="sequential")
  return call(
    queries, matrix, scales, qmul, bias, query_offset, row_weight, isa=np.int64(codes[path])
  )


def int8_peak_gops(threads: int, seconds: float = 0.3) -> float:
  """The int8 multiply-add instruction ceiling of the path one query takes, `threads` cores at
  once, GOP/s (vpdpbusd with AVX512-VNNI or AVX-VNNI, vpmaddubsw + vpmaddwd with AVX2; AMX's
  TDPBSSD is not measured)."""
  from concurrent.futures import ThreadPoolExecutor

  if not available("int8"):
    raise RuntimeError(status())
  fn = _load().lib.vgg_int8_peak_gops
  fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_double]
  with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL during the call
    return sum(pool.map(fn, [seconds] * threads))


vnni_peak_gops = int8_peak_gops  # the name bench/scaling.py uses


def status() -> str:
  """A one-line description for benchmarks and bug reports."""
  s = _load()
  parts = [
    f"{d}: {'off (' + s.reasons[d] + ')' if d in s.reasons else 'in use, ' + '/'.join(s.paths[d])}"
    for d in DTYPES
  ]
  return "native scan kernels: " + "; ".join(parts + s.notes)
