"""Index search with the rows on a mesh of fake CPU devices (4 and 8, each in a subprocess: the
device count is fixed when JAX starts) equals the one-device search, resident and streamed."""

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
  """
  import sys, tempfile
  import numpy as np, jax
  from engine.kernels import sharded as kernels_sharded, topk as topk_lib
  from engine.store import Index
  from engine.store.sharded import ShardedSearcher
  ndev = int(sys.argv[1])
  assert jax.device_count() == ndev, jax.devices()
  rng = np.random.default_rng(ndev)
  d = 48

  def same(a, b, atol):
    (s1, k1), (s2, k2) = a, b
    assert s1.shape == s2.shape and k1.shape == k2.shape, (s1.shape, s2.shape)
    np.testing.assert_allclose(s1, s2, atol=atol)
    # Same keys up to exact ties: where keys differ, the scores must tie.
    diff = k1 != k2
    np.testing.assert_allclose(s1[diff], s2[diff], atol=atol)
    assert (k1 == k2).mean() > 0.98

  # The kernel: any row count (padding masked, never returned).
  mesh = jax.make_mesh((ndev,), ("rows",))
  m = rng.standard_normal((1001, d)).astype(np.float32)
  m /= np.linalg.norm(m, axis=1, keepdims=True)
  q = rng.standard_normal((3, d)).astype(np.float32)
  s, i = kernels_sharded.sharded_topk(q, m, 1001 + 5, mesh=mesh)
  i = np.asarray(i)
  assert ((i >= 0) & (i < 1001)).sum(axis=1).tolist() == [1001] * 3
  assert (np.asarray(s)[i < 0] == -np.inf).all()
  ref_s, _ = topk_lib.topk(q, m, 10)
  np.testing.assert_allclose(np.asarray(s)[:, :10], np.asarray(ref_s), atol=1e-5)

  for dtype in ("int8", "float32"):
    with tempfile.TemporaryDirectory() as tmp:
      idx = Index.create(tmp + "/ix", dim=d, dtype=dtype)
      n = 0
      for rows in (1000, 777, 3, 2049):  # segments, no count divisible by the devices
        x = rng.standard_normal((rows, d)).astype(np.float32)
        idx.add(x, [f"k{n + j}" for j in range(rows)])
        n += rows
      idx.delete([f"k{j}" for j in range(0, n, 7)])
      queries = rng.standard_normal((11, d)).astype(np.float32)
      allowed = [f"k{j}" for j in range(1, n, 3)]
      want = {
        (metric, filt): idx.search(queries, k=12, metric=metric, allowed_keys=filt)
        for metric in ("cosine", "l2")
        for filt in (None, tuple(allowed))
      }
      resident = ShardedSearcher(idx, jax.devices())
      assert resident.resident
      # 8 KiB per device: the rows are streamed in chunks of the budget.
      streamed = ShardedSearcher(idx, jax.devices(), budget=8 << 10)
      assert not streamed.resident
      # Resident, each device's rows scanned in 128-row blocks with a running top-k.
      blocked = ShardedSearcher(idx, jax.devices(), block_rows=128)
      assert blocked.resident and blocked._shard > 128
      for (metric, filt), ref in want.items():
        for searcher in (resident, streamed, blocked):
          got = searcher.search(queries, k=12, metric=metric, allowed_keys=filt)
          same(got, ref, 1e-5)
          assert set(got[1].ravel()) <= set(allowed if filt else idx.keys())
      # One query, k above the live row count, and Index.search(devices=...).
      one = idx.search(queries[0], k=n)
      same(idx.search(queries[0], k=n, devices=jax.devices()), one, 1e-5)
      assert len(one[1]) == len(idx)
      # A new commit is seen: the rows are placed again.
      idx.add(rng.standard_normal((5, d)).astype(np.float32), [f"new{j}" for j in range(5)])
      same(resident.search(queries, k=12), idx.search(queries, k=12), 1e-5)
      idx.close()
  print("OK")
  """
)


@pytest.mark.parametrize("ndev", [4, 8])
def test_index_search_on_cpu_devices(ndev):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ndev}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run(
    [sys.executable, "-c", _SCRIPT, str(ndev)],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  assert "OK" in r.stdout


def test_one_device_mesh(tmp_path):
  import jax
  import numpy as np

  from engine.store import Index
  from engine.store.sharded import ShardedSearcher

  rng = np.random.default_rng(3)
  with Index.create(str(tmp_path / "ix"), dim=24, dtype="int8") as idx:
    idx.add(rng.standard_normal((301, 24)).astype(np.float32), [f"k{i}" for i in range(301)])
    q = rng.standard_normal((4, 24)).astype(np.float32)
    want = idx.search(q, k=7)
    for budget in (None, 4096):  # resident, and streamed in 128-row chunks
      s, k = ShardedSearcher(idx, jax.devices()[:1], budget=budget).search(q, k=7)
      np.testing.assert_allclose(s, want[0], atol=1e-6)
      assert (k == want[1]).all()
