"""torchvision and timm layouts -> weights.convert -> the engine, compared tap by tap with torch.

The reference networks are plain `torch.nn` modules with torchvision's and timm's exact module
layout and state-dict keys (neither library is importable here), NCHW, flattening pool5 in (C, H, W)
order as torchvision does: `fc1` agreeing proves the converter's flatten-order permutation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import parity
from torch import nn

from engine.features import (
  checkpoint,
  preprocess,
)
from engine.features import model as model_lib
from weights import convert

CONFIGS = [
  pytest.param("tiny", id="tiny"),
  pytest.param("vgg16", id="vgg16", marks=pytest.mark.slow),
]


def _features(config: model_lib.ModelConfig) -> nn.Sequential:
  """torchvision's `make_layers`: [Conv2d, ReLU] per layer, MaxPool2d per block."""
  layers, in_ch = [], 3
  for widths in config.blocks:
    for width in widths:
      layers += [nn.Conv2d(in_ch, width, kernel_size=3, padding=1), nn.ReLU()]
      in_ch = width
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
  return nn.Sequential(*layers)


def _feature_taps(features: nn.Sequential, x, out: dict) -> torch.Tensor:
  block, i = 1, 1
  for layer in features:
    x = layer(x)
    if isinstance(layer, nn.ReLU):
      out[f"conv{block}_{i}"] = x
      i += 1
    elif isinstance(layer, nn.MaxPool2d):
      out[f"pool{block}"] = x
      block, i = block + 1, 1
  return x


class TorchvisionVGG(nn.Module):
  """torchvision.models.VGG without batch norm: features, avgpool, classifier.{0..6}."""

  def __init__(self, config: model_lib.ModelConfig):
    super().__init__()
    side = config.image_size // 32
    self.features = _features(config)
    self.avgpool = nn.AdaptiveAvgPool2d((side, side))  # (7, 7) for VGG-16
    self.classifier = nn.Sequential(
      nn.Linear(config.last_channels * side * side, config.fc_dim),
      nn.ReLU(),
      nn.Dropout(),
      nn.Linear(config.fc_dim, config.fc_dim),
      nn.ReLU(),
      nn.Dropout(),
      nn.Linear(config.fc_dim, config.num_classes),
    )

  def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    x = _feature_taps(self.features, x, out)
    x = torch.flatten(self.avgpool(x), 1)  # (C, H, W) order
    c = self.classifier
    out["fc1"] = x = c[1](c[0](x))
    out["fc2"] = x = c[4](c[3](c[2](x)))
    out["logits"] = c[6](c[5](x))
    return out


class _ConvMlp(nn.Module):
  def __init__(self, in_ch: int, width: int, kernel: int):
    super().__init__()
    self.fc1 = nn.Conv2d(in_ch, width, kernel, bias=True)
    self.fc2 = nn.Conv2d(width, width, 1, bias=True)


class _Head(nn.Module):
  def __init__(self, width: int, num_classes: int):
    super().__init__()
    self.fc = nn.Linear(width, num_classes)


class TimmVGG(nn.Module):
  """timm's VGG: features, pre_logits (ConvMlp: fc1 a pool5-sized Conv2d, fc2 1x1), head.fc."""

  def __init__(self, config: model_lib.ModelConfig):
    super().__init__()
    self.features = _features(config)
    self.pre_logits = _ConvMlp(config.last_channels, config.fc_dim, config.image_size // 32)
    self.head = _Head(config.fc_dim, config.num_classes)

  def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    x = _feature_taps(self.features, x, out)
    x = torch.relu(self.pre_logits.fc1(x))  # [B, F, 1, 1]
    out["fc1"] = torch.flatten(x, 1)
    x = torch.relu(self.pre_logits.fc2(x))
    out["fc2"] = torch.flatten(x, 1)
    out["logits"] = self.head.fc(torch.flatten(x.mean((2, 3)), 1))  # avg-pool head
    return out


def _randomize(module: nn.Module, seed: int) -> nn.Module:
  """He-normal weights and non-zero biases (so every bias mapping is exercised), seeded."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(module.named_parameters()):
      if p.ndim > 1:
        p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / (p[0].numel())))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
  return module.eval()


def _reference_taps(net: nn.Module, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
  with torch.no_grad():
    out = net.taps(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  return {
    k: (v.numpy().transpose(0, 2, 3, 1) if v.ndim == 4 else v.numpy()) for k, v in out.items()
  }


def _parity(source: str, net: nn.Module, weights_file, out_dir, config: model_lib.ModelConfig):
  info = convert.convert(source, weights_file, out_dir)
  assert info.config == config.name and info.convention == "torch" and info.source == source
  model, loaded = checkpoint.load(out_dir)
  assert loaded == info
  x = np.asarray(preprocess.normalize(parity.random_images(config), "torch"))
  errors = parity.assert_taps_match(parity.engine_taps(model, x), _reference_taps(net, x))
  print(f"\n{source} {config.name} max relative error per tap: {errors}")
  print(f"{source} {config.name} worst: {max(errors.values()):.3g}")
  return errors


@pytest.mark.parametrize("config_name", CONFIGS)
def test_torchvision_parity(config_name, tmp_path):
  config = model_lib.ModelConfig.by_name(config_name)
  net = _randomize(TorchvisionVGG(config), seed=1)
  path = tmp_path / "vgg16-test.pth"
  torch.save(net.state_dict(), path)
  _parity("torchvision", net, path, tmp_path / "converted", config)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_timm_parity(config_name, tmp_path):
  from safetensors.torch import save_file

  config = model_lib.ModelConfig.by_name(config_name)
  net = _randomize(TimmVGG(config), seed=2)
  path = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
  _parity("timm", net, path, tmp_path / "converted", config)


def test_torchvision_keys_match_published_layout():
  """The table's keys are exactly torchvision's VGG-16 state-dict keys."""
  convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
  expected = {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")}
  expected |= {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
  assert set(convert.torchvision_table(model_lib.ModelConfig.vgg16())) == expected
  tiny = model_lib.ModelConfig.tiny()
  assert set(convert.torchvision_table(tiny)) == set(TorchvisionVGG(tiny).state_dict())
  assert set(convert.timm_table(tiny)) == set(TimmVGG(tiny).state_dict())


def test_timm_pth_container_also_works(tmp_path):
  """timm also publishes a pytorch_model.bin; the container is detected from the bytes."""
  config = model_lib.ModelConfig.tiny()
  net = _randomize(TimmVGG(config), seed=3)
  path = tmp_path / "pytorch_model.bin"
  torch.save(net.state_dict(), path)
  model = convert.to_model("timm", convert.read_file(str(path)))
  x = np.asarray(preprocess.normalize(parity.random_images(config, seed=4), "torch"))
  parity.assert_taps_match(parity.engine_taps(model, x), _reference_taps(net, x))


def test_torch_preprocessing_parity():
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (3, 17, 23, 3), dtype=np.uint8)
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  expected = (images.astype(np.float32) / 255.0 - mean) / std
  got = np.asarray(preprocess.normalize(images, "torch"))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  # And the same as torchvision's ToTensor + Normalize, written out in torch.
  t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  t = (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
  np.testing.assert_allclose(got, t.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


def test_pickle_is_never_loaded_unsafely(tmp_path):
  """A .pth holding an arbitrary object is refused by weights_only loading, with one clear line."""
  import pickle

  class Evil:
    def __reduce__(self):
      return (print, ("unpickled!",))

  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"features.0.weight": Evil()}, f, protocol=2)
  with pytest.raises(convert.ConvertError, match="not a loadable PyTorch state dict"):
    convert.read_file(str(path))
