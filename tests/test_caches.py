"""Caches of derived artefacts (seeded random weights, JAX's compiled executables), the backend
`auto` picks and why, the binaries' XLA flags, and one query image costing one image of compute."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from engine import cli
from engine.app import retrieval
from engine.common import fileio
from engine.features import backends, checkpoint
from engine.features import model as model_lib
from engine.features.extractor import Extractor
from engine.store import Index
from tests.conftest import write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  monkeypatch.setenv(fileio.CACHE_ENV, str(root))
  monkeypatch.delenv(fileio.NO_CACHE_ENV, raising=False)
  return root


def _pixels(n=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 96, 128, 3), dtype=np.uint8)


def _fresh_features(px, seed):
  """Descriptors from weights built afresh, never touching a cache."""
  model, _ = checkpoint.random(model_lib.ModelConfig.tiny(), seed)
  ex = Extractor("random:99", "gem", config="tiny")
  ex._network = nnx.split(model)  # the same extractor, on the freshly built weights
  return ex(px)


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_cached_random_weights_give_the_fresh_descriptors(cache, monkeypatch):
  px = _pixels()
  want = _fresh_features(px, seed=5)
  first = Extractor("random:5", "gem", config="tiny")(px)
  npz, record = checkpoint.random_cache_paths(model_lib.ModelConfig.tiny(), 5)
  assert os.path.isfile(npz) and os.path.isfile(record)

  def no_init(*args, **kwargs):
    raise AssertionError("the cached weights should have been read")

  monkeypatch.setattr(model_lib, "init_random", no_init)
  second = Extractor("random:5", "gem", config="tiny")(px)
  np.testing.assert_array_equal(first, want)
  np.testing.assert_array_equal(second, want)


def test_a_corrupted_cached_file_is_rebuilt_with_one_warning(cache, caplog):
  config = model_lib.ModelConfig.tiny()
  checkpoint.cached_random(config, 6)
  npz, _ = checkpoint.random_cache_paths(config, 6)
  with open(npz, "r+b") as f:  # flip a byte inside the arrays, not the zip structure
    f.seek(os.path.getsize(npz) // 2)
    b = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([b[0] ^ 0xFF]))
  with caplog.at_level(logging.WARNING):
    model, _ = checkpoint.cached_random(config, 6)
  lines = _warnings(caplog)
  assert len(lines) == 1 and "checksum" in lines[0], lines
  fresh, _ = checkpoint.random(config, 6)
  assert checkpoint.params_fingerprint(model) == checkpoint.params_fingerprint(fresh)
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # rewritten: read back without a word
    again, _ = checkpoint.cached_random(config, 6)
  assert not _warnings(caplog)
  assert checkpoint.params_fingerprint(again) == checkpoint.params_fingerprint(fresh)


def test_a_truncated_cached_file_is_rebuilt(cache, caplog):
  config = model_lib.ModelConfig.tiny()
  checkpoint.cached_random(config, 7)
  npz, _ = checkpoint.random_cache_paths(config, 7)
  os.truncate(npz, 100)
  with caplog.at_level(logging.WARNING):
    model, _ = checkpoint.cached_random(config, 7)
  assert len(_warnings(caplog)) == 1
  fresh, _ = checkpoint.random(config, 7)
  assert checkpoint.params_fingerprint(model) == checkpoint.params_fingerprint(fresh)


def test_caches_disabled_build_afresh_and_write_nothing(cache, monkeypatch):
  monkeypatch.setenv(fileio.NO_CACHE_ENV, "1")
  px = _pixels(seed=1)
  got = Extractor("random:8", "gem", config="tiny")(px)
  np.testing.assert_array_equal(got, _fresh_features(px, seed=8))
  assert not os.path.exists(cache / checkpoint.RANDOM_CACHE_DIR)
  assert backends.compiled_cache_dir() is None


def test_auto_falls_back_to_xla_with_one_line_when_openvino_cannot_be_imported(monkeypatch, caplog):
  monkeypatch.setattr(backends, "is_x86", lambda: True)
  monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
  with caplog.at_level(logging.INFO):
    assert backends.resolve("auto") == "xla"
  lines = [r.getMessage() for r in caplog.records if "extraction backend" in r.getMessage()]
  assert len(lines) == 1 and "openvino cannot be imported" in lines[0], lines
  assert _warnings(caplog) == lines
  with pytest.raises(ValueError, match="openvino cannot be imported"):
    backends.resolve("openvino")


def test_binaries_set_xla_flags_only_when_the_user_did_not(monkeypatch):
  monkeypatch.setenv(fileio.NO_CACHE_ENV, "1")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  cli.configure_process()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  monkeypatch.setenv("XLA_FLAGS", "")  # set, even if empty: the user's choice
  cli.configure_process()
  assert os.environ["XLA_FLAGS"] == ""
  monkeypatch.delenv("XLA_FLAGS")
  cli.configure_process()
  assert os.environ["XLA_FLAGS"] == cli.DEFAULT_XLA_FLAGS["extract"] != ""


def test_binaries_cache_compiled_executables_under_the_cache_root(tmp_path):
  code = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from engine import cli
    cli.configure_process()
    print(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.arange(5.0)).sum())
  """)
  env = dict(os.environ, PYTHONPATH=ROOT, **{fileio.CACHE_ENV: str(tmp_path)})
  env.pop(fileio.NO_CACHE_ENV, None)
  subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
  assert os.listdir(tmp_path / cli.JAX_CACHE_DIR)
  env[fileio.NO_CACHE_ENV] = "1"
  other = tmp_path / "other"
  env[fileio.CACHE_ENV] = str(other)
  subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
  assert not (other / cli.JAX_CACHE_DIR).exists()


def test_one_query_image_runs_a_batch_of_one(tmp_path, monkeypatch):
  ex = Extractor("random:1", "gem", config="tiny", batch_size=16)
  idx_path = str(tmp_path / "idx")
  with Index.create(idx_path, dim=ex.dim, metadata=ex.index_metadata()) as idx:
    paths = [write_image(tmp_path / f"p{i}.jpg", seed=i) for i in range(3)]
    idx.add(ex(paths), keys=paths)
  shapes = []
  run_batch = ex.run_batch
  monkeypatch.setattr(ex, "run_batch", lambda b: shapes.append(b.shape) or run_batch(b))
  results = retrieval.query_index(idx_path, paths[1], ex, k=2)
  assert [s[0] for s in shapes] == [1]
  assert results.matches[0][1][0][0] == paths[1]


def test_openvino_compiles_into_its_cache_under_the_cache_root(cache, tiny_weights, tmp_path):
  if not backends.available():
    pytest.skip(f"the OpenVINO backend cannot run here: {backends.unavailable_reason()}")
  ex = Extractor(tiny_weights, "gem", batch_size=2, backend="openvino")
  assert ex._network is None  # nothing loaded until an export needs the parameters
  px = _pixels(2, seed=3)
  got = backends.OpenVINOExtraction(ex, cache_dir=str(tmp_path / "exported"))(px)
  assert os.listdir(cache / backends.OPENVINO_CACHE_DIR)
  want = np.asarray(Extractor(tiny_weights, "gem", batch_size=2).run_batch(px))
  np.testing.assert_allclose(got, want, atol=1e-5)
