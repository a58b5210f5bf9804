"""weights.convert without torch or keras: strictness, config inference, the CLI, safe loading."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.features import checkpoint
from engine.features import model as model_lib
from weights import convert

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = model_lib.ModelConfig.tiny()


def _arrays(source: str, config=TINY, seed: int = 0) -> dict[str, np.ndarray]:
  """Random arrays with exactly the keys and shapes of `source`'s layout for `config`."""
  rng = np.random.default_rng(seed)
  shapes = convert._expected_shapes(convert.TABLES[source](config), config)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in sorted(shapes.items())}


def _param(model, module: str, role: str) -> np.ndarray:
  return np.asarray(getattr(getattr(model, module), role)[...])


def test_missing_extra_and_wrong_shape_reported_together(tmp_path):
  arrays = _arrays("timm")
  del arrays["features.2.bias"]
  arrays["features.99.weight"] = np.zeros((3,), np.float32)
  arrays["head.fc.weight"] = np.zeros((7, 5), np.float32)
  path = tmp_path / "broken.safetensors"
  save_file(arrays, str(path))
  with pytest.raises(convert.ConvertError) as e:
    convert.convert("timm", path, tmp_path / "out", config="tiny")
  msg = str(e.value)
  assert "\n" not in msg
  assert "1 missing: features.2.bias" in msg
  assert "1 unused: features.99.weight" in msg
  assert "head.fc.weight [7, 5] (want [10, 32])" in msg
  assert not (tmp_path / "out").exists()


def test_every_problem_is_listed_not_just_the_first():
  arrays = _arrays("torchvision")
  for key in ("features.0.weight", "features.5.bias", "classifier.6.bias"):
    del arrays[key]
  with pytest.raises(convert.ConvertError, match="3 missing: classifier.6.bias, features.0.weight"):
    convert.to_model("torchvision", arrays, TINY)


def test_wrong_source_for_the_file_is_refused():
  with pytest.raises(convert.ConvertError, match="32 missing.*32 unused"):
    convert.to_model("keras_h5", _arrays("torchvision"))


def test_tiny_round_trip(tmp_path):
  arrays = _arrays("timm", seed=1)
  path = tmp_path / "model.safetensors"
  save_file(arrays, str(path))
  info = convert.convert("timm", path, tmp_path / "out")  # config inferred from the shapes
  assert (info.config, info.source, info.convention) == ("tiny", "timm", "torch")
  assert info.source_file == "model.safetensors"
  import hashlib

  assert info.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
  model, loaded = checkpoint.load(tmp_path / "out")
  assert loaded == info
  np.testing.assert_array_equal(
    _param(model, "conv1_1", "kernel"), arrays["features.0.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(_param(model, "conv5_3", "bias"), arrays["features.28.bias"])
  np.testing.assert_array_equal(_param(model, "logits", "kernel"), arrays["head.fc.weight"].T)
  np.testing.assert_array_equal(
    _param(model, "fc2", "kernel"), arrays["pre_logits.fc2.weight"][:, :, 0, 0].T
  )
  with pytest.raises(convert.ConvertError, match="already exists"):
    convert.convert("timm", path, tmp_path / "out")
  again = convert.convert("timm", path, tmp_path / "out", overwrite=True)
  assert again.fingerprint == info.fingerprint


def test_fc1_permutation_is_chw_to_hwc():
  """Row (c, h, w) of torchvision's fc1 lands on row (h, w, c) of ours; timm's conv matches too."""
  arrays = _arrays("torchvision", seed=2)
  model = convert.to_model("torchvision", arrays, TINY)
  side, channels = TINY.image_size // 32, TINY.last_channels
  ours = _param(model, "fc1", "kernel")
  theirs = arrays["classifier.0.weight"]
  for c, h, w in [(0, 0, 0), (channels - 1, 0, 1), (5, 1, 0), (channels - 1, side - 1, side - 1)]:
    np.testing.assert_array_equal(
      ours[(h * side + w) * channels + c], theirs[:, (c * side + h) * side + w]
    )
  timm = _arrays("timm", seed=2)
  timm["pre_logits.fc1.weight"] = theirs.reshape(-1, channels, side, side)
  timm_model = convert.to_model("timm", {**timm}, TINY)
  np.testing.assert_array_equal(_param(timm_model, "fc1", "kernel"), ours)


def test_explicit_config_that_does_not_fit(tmp_path):
  with pytest.raises(convert.ConvertError, match=r"layout of vgg16: .*shape mismatches"):
    convert.to_model("timm", _arrays("timm"), model_lib.ModelConfig.vgg16())


def test_torch_missing_gives_install_hint(tmp_path, monkeypatch):
  path = tmp_path / "vgg16.pth"
  path.write_bytes(b"PK\x03\x04 not really a zip")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(convert.ConvertError, match="pip install torch"):
    convert.read_file(str(path))


def test_unknown_format(tmp_path):
  path = tmp_path / "weights.bin"
  path.write_bytes(b"hello world, not weights")
  with pytest.raises(convert.ConvertError, match="unknown file format"):
    convert.read_file(str(path))


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "weights.convert", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=120,
  )


def test_cli(tmp_path):
  good = tmp_path / "model.safetensors"
  save_file(_arrays("timm"), str(good))
  bad_arrays = _arrays("timm")
  del bad_arrays["features.0.bias"]
  bad_arrays["extra"] = np.zeros((1,), np.float32)
  bad = tmp_path / "bad.safetensors"
  save_file(bad_arrays, str(bad))

  ok = _cli("--source=timm", f"--input={good}", f"--output={tmp_path / 'out'}")
  assert ok.returncode == 0, ok.stderr
  assert "wrote" in ok.stdout and "tiny" in ok.stdout
  assert checkpoint.read_info(tmp_path / "out").source == "timm"

  failed = _cli("--source=timm", f"--input={bad}", f"--output={tmp_path / 'out2'}")
  assert failed.returncode != 0
  lines = failed.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), failed.stderr
  assert "features.0.bias" in lines[0] and "extra" in lines[0]
  assert "Traceback" not in failed.stderr

  usage = _cli("--source=timm", f"--input={good}", f"--output={tmp_path / 'o'}", "stray")
  assert usage.returncode != 0 and "unexpected arguments: stray" in usage.stderr
  missing = _cli("--source=timm")
  assert missing.returncode != 0 and "--input" in missing.stderr
