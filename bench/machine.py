"""The machine a benchmark runs on: the CPU model and the extensions the kernels care about.

Every benchmark prints `cpu_line()` and records `cpu_model()` / `cpu_flags()` with its figures, so
numbers from different CPUs (AVX2 only, AVX-512 VNNI/BF16, AMX) are never compared by mistake.
"""

from __future__ import annotations

import os
import platform

KERNEL_FLAGS = (
  "avx2",
  "fma",
  "f16c",
  "avx512f",
  "avx512_vnni",
  "avx512_bf16",
  "amx_int8",
  "amx_bf16",
)


def _cpuinfo(field: str) -> str | None:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(field):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model() -> str:
  """The CPU's model name (Linux), else what `platform` knows."""
  return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
  """The kernel-relevant extensions this CPU has, space-separated ("" for none of them)."""
  have = set((_cpuinfo("flags") or "").split())
  return " ".join(f for f in KERNEL_FLAGS if f in have)


def cpu_line() -> str:
  """One line for a benchmark's output: model, logical CPUs, extensions."""
  return f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; {cpu_flags() or 'no AVX2'}"
