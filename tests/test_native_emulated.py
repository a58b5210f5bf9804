"""The x86 loops of the native kernels this CPU may lack (AVX-512 VNNI / BF16, AVX-VNNI, AMX), emulated.

tests/test_native.py checks every instruction-set path the CPU runs; on an AVX2-only machine that
leaves the AVX-512 loops compiled but never executed. Here a child process builds the library
against SIMDe (`VGG_RETRIEVAL_NATIVE_EMULATE=1`, engine/kernels/native/simd_x86.h), where every x86
path runs on any x86-64 CPU, and runs test_native.py's per-path kernel tests on all of them.
"""

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.kernels import native

ROOT = Path(__file__).resolve().parents[1]
# The tests of test_native.py that take every path of a dtype (parametrised by `isa`, or looping
# over `native.paths`): integer / float64 brute force, extremes, ties across threads.
PER_PATH = (
  "int8_kernel_equals_integer_brute_force or int8_extremes or ties_go_to_the_lower_row"
  " or bf16_kernel_against_float64 or f16_kernel_against_float64 or int8_rank_one_term_is_exact"
  " or float_rank_one_term_against_float64"
)


@pytest.mark.skipif(
  platform.machine().lower() not in ("x86_64", "amd64"), reason="the emulated loops are x86's"
)
@pytest.mark.skipif(
  native.simde_include() is None,
  reason="needs SIMDe's headers (`pip install cmeel-simde`, in the test extra)",
)
def test_every_x86_path_under_emulation():
  env = dict(os.environ, **{native.EMULATE_ENV: "1"})
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=",
     "tests/test_native.py", "-k", PER_PATH],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
  passed = re.findall(r"::(\w+)\[?([^\s\]]*)\]? PASSED", proc.stdout)
  # Every AVX-512 path ran (none skipped for want of the CPU), next to the AVX2 ones.
  for test, path in [
    ("test_int8_kernel_equals_integer_brute_force", "avx512-vnni"),
    ("test_int8_kernel_equals_integer_brute_force", "avx-vnni"),
    ("test_int8_kernel_equals_integer_brute_force", "amx-int8"),
    ("test_int8_rank_one_term_is_exact", "avx512-vnni"),
    ("test_int8_rank_one_term_is_exact", "amx-int8"),
    ("test_ties_go_to_the_lower_row_whatever_the_threads", "avx512-vnni"),
    ("test_bf16_kernel_against_float64", "avx512-bf16"),
    ("test_f16_kernel_against_float64", "avx512"),
    ("test_int8_kernel_equals_integer_brute_force", "avx2"),
  ]:
    ran = any(t == test and f"-{path}-" in f"-{p}-" for t, p in passed)
    assert ran, (test, path, proc.stdout[-3000:])
  assert "test_int8_extremes_do_not_saturate PASSED" in proc.stdout
