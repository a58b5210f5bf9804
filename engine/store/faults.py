"""Crash points for the fault-injection tests.

The store calls `reached(point)` at each step of a commit where a crash leaves distinct debris:
`segment_write` (a segment temp file, partly written), `segment_file` (one segment file renamed
into place), `catalog` (catalog transaction committed, manifest not replaced) and `manifest`
(manifest replaced, in-memory state not updated). Nothing is armed unless a test arms it in the
process it wants to crash (`kill_at`, or `set_hook` to observe); unarmed, a point costs one test.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

POINTS = ("segment_write", "segment_file", "catalog", "manifest")

_hook: Callable[[str], None] | None = None


def set_hook(hook: Callable[[str], None] | None) -> Callable[[str], None] | None:
  """Calls `hook(point)` at every crash point from now on (None: disarm). Returns the previous."""
  global _hook
  previous, _hook = _hook, hook
  return previous


def kill_at(point: str, n: int = 1) -> None:
  """SIGKILLs this process the `n`-th time it reaches `point`."""
  if point not in POINTS:
    raise ValueError(f"unknown crash point {point!r}, expected one of {POINTS}")
  left = [int(n)]

  def hook(p: str) -> None:
    if p == point:
      left[0] -= 1
      if left[0] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)

  set_hook(hook)


def reached(point: str) -> None:
  if _hook is not None:
    _hook(point)
