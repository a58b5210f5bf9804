"""A stateful property test of the index against a plain dict.

Hypothesis drives random interleavings of add, delete, search, compact, reopen and a real SIGKILL
at each of the store's crash points (in a forked child), and after every step checks the index
against the model: the same live keys in the same order, the same vectors, and search results that
brute force over the model confirms. A killed operation must leave exactly the state before it or
exactly the state after it. 500 steps by default; VGG_RETRIEVAL_STATEFUL_STEPS=N runs more.
"""

import os
import shutil
import signal
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
  RuleBasedStateMachine,
  invariant,
  precondition,
  rule,
  run_state_machine_as_test,
)

from engine.store import Index, faults, segments

D = 8
KEYS = [f"k{i}" for i in range(24)] + ["caf\u00e9/\u00fc.jpg", "bad\udcff.jpg"]
STEPS = int(os.environ.get("VGG_RETRIEVAL_STATEFUL_STEPS", "500"))
_EXAMPLES = 10
TALLY: dict[str, int] = {}

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # children skip JAX


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


class IndexMachine(RuleBasedStateMachine):
  def __init__(self):
    super().__init__()
    self.folder = tempfile.mkdtemp(prefix="stateful-index-")
    self.path = os.path.join(self.folder, "idx")
    self.idx = Index.create(self.path, dim=D, dtype="float32")
    self.model: dict[str, np.ndarray] = {}  # key -> unit vector, in storage order
    self.rng = np.random.default_rng(0)

  def _count(self, what):
    TALLY[what] = TALLY.get(what, 0) + 1

  def teardown(self):
    self.idx.close()
    shutil.rmtree(self.folder, ignore_errors=True)

  def _vectors(self, n):
    return self.rng.standard_normal((n, D)).astype(np.float32)

  def _apply_add(self, keys, x):
    for k in keys:
      self.model.pop(k, None)  # a re-added key moves to the end of storage order
    self.model.update(zip(keys, _unit(x), strict=True))

  @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True))
  def add(self, keys):
    self._count("add")
    x = self._vectors(len(keys))
    self.idx.add(x, keys)
    self._apply_add(keys, x)

  @rule(keys=st.lists(st.sampled_from(KEYS), max_size=6, unique=True))
  def delete(self, keys):
    self._count("delete")
    n = self.idx.delete(keys)
    assert n == sum(k in self.model for k in keys)
    for k in keys:
      self.model.pop(k, None)

  @rule()
  def compact(self):
    self._count("compact")
    self.idx.compact(max_segment_rows=5)

  @rule()
  def reopen(self):
    self._count("reopen")
    self.idx.close()
    self.idx = Index.open(self.path, verify=True)

  @precondition(lambda self: self.model)
  @rule(k=st.integers(1, 8), data=st.data())
  def search(self, k, data):
    self._count("search")
    q = self._vectors(2)
    allowed = None
    if data.draw(st.booleans()):
      allowed = data.draw(st.lists(st.sampled_from(KEYS), max_size=10, unique=True))
    scores, got = self.idx.search(q, k=k, allowed_keys=allowed)
    keys = [key for key in self.model if allowed is None or key in allowed]
    m = min(k, len(keys))
    assert scores.shape == (2, m) and got.shape == (2, m)
    if not m:
      return
    mat = np.stack([self.model[key] for key in keys])
    ref = _unit(q.astype(np.float64)) @ mat.T.astype(np.float64)
    for i in range(2):
      want = np.sort(ref[i])[::-1][:m]
      np.testing.assert_allclose(scores[i], want, atol=1e-5)  # the same best scores
      rescored = [ref[i][keys.index(key)] for key in got[i]]
      np.testing.assert_allclose(rescored, scores[i], atol=1e-5)  # ids re-score to their scores

  @rule(
    op=st.sampled_from(["add", "delete", "compact"]),
    point=st.sampled_from(faults.POINTS),
    n=st.integers(1, 3),
    keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True),
  )
  def killed(self, op, point, n, keys):
    """The op runs in a forked child killed at the n-th arrival at `point` (if it gets there)."""
    x = self._vectors(len(keys))
    before = dict(self.model)
    after_model = dict(self.model)
    if op == "add":
      for key in keys:
        after_model.pop(key, None)
      after_model.update(zip(keys, _unit(x), strict=True))
    elif op == "delete":
      for key in keys:
        after_model.pop(key, None)
    self.idx.close()
    pid = os.fork()
    if pid == 0:
      code = 0
      try:
        faults.kill_at(point, n)
        with Index.open(self.path) as idx:
          if op == "add":
            idx.add(x, keys)
          elif op == "delete":
            idx.delete(keys)
          else:
            idx.compact(max_segment_rows=5)
      except BaseException:  # noqa: BLE001 - reported through the exit code
        code = 3
      os._exit(code)
    _, status = os.waitpid(pid, 0)
    self._count("killed" if os.WIFSIGNALED(status) else "crash point not reached")
    assert (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL) or (
      os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    ), status
    self.idx = Index.open(self.path)  # the writer open undoes an interrupted commit
    live = self.idx.keys()
    if live == list(before) and self._same_vectors(before):
      self.model = before
      self._count("killed: state before")
    else:
      assert live == list(after_model), "a killed operation left a state between before and after"
      self.model = after_model
      self._count("killed: state after")

  def _same_vectors(self, model):
    if not model:
      return True
    got = self.idx.get_vectors(list(model))
    return np.allclose(got, np.stack(list(model.values())), atol=1e-6)

  @invariant()
  def matches_the_model(self):
    assert self.idx.keys() == list(self.model)
    assert len(self.idx) == len(self.model)
    assert self._same_vectors(self.model)
    assert len(self.idx.segments) <= 12  # merging keeps the segment count small


@pytest.fixture
def small_merge_floor(monkeypatch):
  monkeypatch.setattr(segments, "MERGE_FLOOR", 3 * D * 4)  # merges happen within a few steps


def test_index_against_a_dict_model(small_merge_floor):
  run_state_machine_as_test(
    IndexMachine,
    settings=settings(
      max_examples=_EXAMPLES,
      stateful_step_count=max(1, STEPS // _EXAMPLES),
      deadline=None,
      suppress_health_check=list(HealthCheck),
      derandomize=True,
    ),
  )
  print(f"stateful index steps: {TALLY}")
  assert sum(v for k, v in TALLY.items() if not k.startswith("killed:")) >= 0.8 * STEPS
