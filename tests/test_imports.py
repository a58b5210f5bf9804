"""Importing the engine, its binaries and the weights tools changes nothing outside them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = textwrap.dedent(
  """
  import logging, os, stat, sys, tempfile

  os.umask(0o027)
  real_umask, umask_calls = os.umask, []
  os.umask = lambda mask: umask_calls.append(mask) or real_umask(mask)
  from PIL import ImageFile

  ImageFile.LOAD_TRUNCATED_IMAGES = True  # the application's choice, not the engine's
  logging.getLogger("onnx_ir").setLevel(logging.DEBUG)
  before = {n: g.level for n, g in logging.Logger.manager.loggerDict.items()
            if isinstance(g, logging.Logger)}
  root_level = logging.getLogger().level

  import engine, engine.cli, engine.index, weights.convert, weights.fetch  # one binary: flags clash
  from engine.app import extraction, indexing, report, retrieval, sample, service, walk
  from engine.common import fileio

  assert not umask_calls, umask_calls
  assert ImageFile.LOAD_TRUNCATED_IMAGES is True
  assert logging.getLogger().level == root_level
  changed = {n: (lvl, logging.getLogger(n).level) for n, lvl in before.items()
             if logging.getLogger(n).level != lvl}
  assert not changed, changed
  ours = {n: g.level for n, g in logging.Logger.manager.loggerDict.items()
          if isinstance(g, logging.Logger) and n.split(".")[0] in ("engine", "weights") and g.level}
  assert not ours, ours

  # Files get the modes open() and mkdir() would give under the process umask.
  folder = tempfile.mkdtemp()
  fileio.atomic_write_text(os.path.join(folder, "f.txt"), "x")
  assert stat.S_IMODE(os.stat(os.path.join(folder, "f.txt")).st_mode) == 0o640
  assert fileio.current_umask() == 0o027 and not umask_calls, umask_calls
  print("ok")
  """
)


def test_importing_changes_no_process_state():
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    timeout=300,
  )
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
