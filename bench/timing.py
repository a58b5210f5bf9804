"""Timing the benchmarks share."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
  """Seconds of each call of each fn over `rounds` rounds that run every fn once each, in turn.

  Interleaving puts every implementation through the same moments of a noisy machine, so their
  ratios mean more than back-to-back runs'. Callers warm up (compile) each fn first.
  """
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times
