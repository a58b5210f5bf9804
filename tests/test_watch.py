"""engine.index --watch: the index follows a folder as files appear, change and vanish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("watchdog")

from engine import store
from engine.app import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--weights=random:5", "--config=tiny", "--image_size=64", "--batch_size=4", "--backend=xla"]


def scene(path, seed):
  sample.scene(np.random.default_rng(seed), 96, 80).save(path)


def keys_of(index) -> set[str] | None:
  if not store.exists(index):
    return None
  with store.Index.open(index, readonly=True) as idx:
    return set(idx.keys())


def wait_for(index, want, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if keys_of(index) == want:
      return
    time.sleep(0.2)
  pytest.fail(f"the index holds {keys_of(index)}, not {want}")


def _start_watching(photos, index, poll):
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "engine.index",
      f"--images={photos}",
      f"--index={index}",
      "--watch",
      f"--watch_poll={poll}",
      *TINY,
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
  )


@pytest.mark.parametrize("poll", [False, True])
def test_watch_indexes_new_changed_and_vanished_files(tmp_path, poll):
  photos = tmp_path / "photos"
  photos.mkdir()
  for i in range(2):
    scene(photos / f"a{i}.jpg", seed=i)
  index = tmp_path / "idx"
  # The test stops the binary with Ctrl-C's SIGINT. A suite started in the background by a
  # non-interactive shell runs with SIGINT ignored, which a child inherits (Python then never
  # raises KeyboardInterrupt): a handler here makes the child start with the default instead.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    proc = _start_watching(photos, index, poll)
  finally:
    signal.signal(signal.SIGINT, previous)
  try:
    wait_for(index, {str(photos / "a0.jpg"), str(photos / "a1.jpg")})
    (photos / "sub").mkdir()
    scene(photos / "sub" / "b.jpg", seed=10)
    wait_for(index, {str(photos / "a0.jpg"), str(photos / "a1.jpg"), str(photos / "sub" / "b.jpg")})
    with store.Index.open(index, readonly=True) as idx:
      before = idx.get_vectors([str(photos / "a0.jpg")])
    scene(photos / "a0.jpg", seed=99)  # new content under the same name
    os.remove(photos / "a1.jpg")
    wait_for(index, {str(photos / "a0.jpg"), str(photos / "sub" / "b.jpg")})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      with store.Index.open(index, readonly=True) as idx:
        after = idx.get_vectors([str(photos / "a0.jpg")])
      if not np.allclose(before, after):
        break
      time.sleep(0.2)
    assert not np.allclose(before, after), "the changed file was not indexed again"
    assert proc.poll() is None
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, _ = proc.communicate()
      pytest.fail(f"Ctrl-C did not stop the watching binary within 120 s:\n{out}")
  assert proc.returncode == 130, out
  assert "watching" in out and "Traceback" not in out, out
