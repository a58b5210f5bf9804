"""`sharded_topk` on 8 fake CPU devices (run in a subprocess: the device count is fixed at import)."""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
  """
  import numpy as np, jax
  from engine.kernels import sharded
  from engine.kernels import topk as topk_lib
  from engine.store import quantize_int8
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((8,), ("rows",))
  rng = np.random.default_rng(0)
  m = rng.standard_normal((8 * 1024, 32))
  m = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
  q = rng.standard_normal((5, 32)).astype(np.float32)
  valid = rng.random(8 * 1024) < 0.5
  full = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float64) @ m.T.astype(np.float64)
  for metric in ("cosine", "l2"):
    s, i = sharded.sharded_topk(q, m, 10, mesh=mesh, metric=metric, valid=valid)
    ref_s, ref_i = topk_lib.topk(q, m, 10, metric=metric, valid=valid)
    assert s.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), atol=1e-5)
    assert valid[np.asarray(i)].all()
    if metric == "cosine":
      np.testing.assert_allclose(np.take_along_axis(full, np.asarray(i), 1), s, atol=1e-5)
      want = np.sort(np.where(valid, full, -np.inf), axis=1)[:, ::-1][:, :10]
      np.testing.assert_allclose(np.asarray(s), want, atol=1e-5)
  q8, scale = quantize_int8(m)
  s, i = sharded.sharded_topk(q, q8, 10, mesh=mesh, scales=scale)
  ref_s, ref_i = topk_lib.topk(q, q8, 10, scales=scale)
  np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), atol=1e-5)
  # A second call with the same shapes reuses the compiled program.
  n = sharded._sharded_fn.cache_info().currsize
  sharded.sharded_topk(q + 1.0, q8, 10, mesh=mesh, scales=scale)
  assert sharded._sharded_fn.cache_info().currsize == n
  print("OK")
  """
)


def test_sharded_topk_on_8_cpu_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run(
    [sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stdout + r.stderr
  assert "OK" in r.stdout
