"""Duplicate groups: complete linkage never chains, every pair re-scores above the threshold."""

from __future__ import annotations

import itertools
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.app import grouping
from engine.store import Index


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _index(folder, vecs, keys=None):
  keys = keys or [f"img{i:03d}" for i in range(len(vecs))]
  idx = Index.create(folder, dim=vecs.shape[1], dtype="float32")
  idx.add(vecs, keys)
  return idx, keys


def _clustered(seed: int, n: int, dim: int, clusters: int, spread: float) -> np.ndarray:
  """Points around a few centres, each spread differently: dense spots, chains and loners."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, dim))
  which = rng.integers(0, clusters, n)
  scale = spread * rng.uniform(0.2, 2.0, (n, 1))
  return _unit(centres[which] + scale * rng.standard_normal((n, dim)))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
  seed=st.integers(0, 2**31 - 1),
  n=st.integers(2, 60),
  dim=st.sampled_from([4, 8, 32]),
  clusters=st.integers(1, 6),
  spread=st.floats(0.05, 0.8),
  threshold=st.floats(0.3, 0.99),
  k=st.integers(1, 12),
)
def test_every_pair_in_every_group_scores_above_the_threshold(
  seed, n, dim, clusters, spread, threshold, k
):
  vecs = _clustered(seed, n, dim, clusters, spread)
  with tempfile.TemporaryDirectory() as tmp:
    idx, keys = _index(tmp, vecs)
    with idx:
      groups = grouping.find_groups(idx, threshold, k=k, chunk=7)
      again = grouping.find_groups(idx, threshold, k=k, chunk=50)
      single = grouping.find_groups(idx, threshold, k=k, linkage="single")
      rep = grouping.find_groups(idx, threshold, k=k, linkage="representative")
  # The groups depend on the contents only, not on the chunking; scores up to float32 rounding
  # (query batches of another size take another compiled product).
  assert [g.keys for g in groups] == [g.keys for g in again]
  for g, h in zip(groups, again, strict=True):
    np.testing.assert_allclose(g.scores, h.scores, rtol=0, atol=1e-6)
  row = {key: i for i, key in enumerate(keys)}
  seen = set()
  for g in groups:
    assert 2 <= len(g) <= k + 1 and list(g.keys) == sorted(g.keys)
    assert not seen & set(g.keys), "groups are disjoint"
    seen |= set(g.keys)
    x = vecs[[row[key] for key in g.keys]]
    s = x @ x.T  # recomputed from the vectors, not taken from the search
    pairs = s[np.triu_indices(len(g), 1)]
    assert pairs.min() >= threshold - 1e-5, (g, pairs.min())
    assert abs(g.min_pair - pairs.min()) < 1e-4
  for g in rep:  # every member within the radius of the representative, listed first
    x = vecs[[row[key] for key in g.keys]]
    assert (x[1:] @ x[0] >= threshold - 1e-5).all()
  # Single linkage is the transitive closure: every complete group lies inside one of its groups.
  comp = {key: i for i, g in enumerate(single) for key in g.keys}
  for g in groups:
    assert len({comp[key] for key in g.keys}) == 1


def _arc(n: int, step_deg: float) -> np.ndarray:
  """Points on a circle `step_deg` apart, embedded in 8 dimensions: a chain."""
  a = np.deg2rad(step_deg) * np.arange(n)
  x = np.zeros((n, 8), np.float32)
  x[:, 0], x[:, 1] = np.cos(a), np.sin(a)
  return x


def test_a_chain_does_not_become_one_group(tmp_path):
  # A~B and B~C at cos 18 deg = 0.951, but A and C at cos 36 deg = 0.809 < 0.9.
  vecs = _arc(3, 18.0)
  with _index(tmp_path / "i", vecs, ["A", "B", "C"])[0] as idx:
    complete = grouping.find_groups(idx, 0.9)
    single = grouping.find_groups(idx, 0.9, linkage="single")
    rep = grouping.find_groups(idx, 0.9, linkage="representative")
  assert [g.keys for g in single] == [("A", "B", "C")], "the transitive option still chains"
  assert len(complete) == 1 and len(complete[0]) == 2
  assert set(complete[0].keys) in ({"A", "B"}, {"B", "C"})
  assert [g.keys for g in rep] == [("B", "A", "C")], "B is within the radius of both"


def test_a_long_chain_splits_into_tight_groups(tmp_path):
  vecs = _arc(40, 6.0)  # neighbours at cos 6 deg, the ends 234 deg apart
  threshold = float(np.cos(np.deg2rad(13.0)))  # at most three consecutive points per group
  with _index(tmp_path / "i", vecs)[0] as idx:
    complete = grouping.find_groups(idx, threshold, k=5)
    single = grouping.find_groups(idx, threshold, k=5, linkage="single")
  assert len(single) == 1 and len(single[0]) == 40
  assert all(2 <= len(g) <= 3 for g in complete)
  for g in complete:
    ids = [int(key[3:]) for key in g.keys]
    assert max(ids) - min(ids) == len(ids) - 1, "only consecutive points belong together"


def test_distinct_images_make_no_group(tmp_path):
  vecs = _unit(np.random.default_rng(0).standard_normal((50, 64)))
  with _index(tmp_path / "i", vecs)[0] as idx:
    assert grouping.find_groups(idx, 0.9) == []
    assert grouping.find_groups(idx, 0.9, linkage="single") == []


def test_rule_is_stated_for_every_linkage():
  for linkage in grouping.LINKAGES:
    assert "0.9000" in grouping.rule(linkage, 0.9)
  assert "every pair" in grouping.rule("complete", 0.9)
  with pytest.raises(ValueError):
    grouping.group_graph(grouping.Graph(), "average")


def test_graph_keeps_the_lower_of_two_directions():
  g = grouping.Graph()
  g.add("b", "a", 0.95)
  g.add("a", "b", 0.93)
  g.add("a", "a", 1.0)
  assert g.score("a", "b") == g.score("b", "a") == 0.93
  assert list(itertools.chain.from_iterable(g.edges)) == ["a", "b"]
