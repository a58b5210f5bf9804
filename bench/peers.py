"""Peer models shared by the extraction benchmarks."""


def torch_vgg16_to_fc2():
  """torchvision's VGG-16 layout (features, avgpool, classifier) cut after fc2's ReLU."""
  import torch
  from torch import nn

  layers, in_ch = [], 3
  for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
    if v == "M":
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
      in_ch = v
  model = nn.Sequential(
    nn.Sequential(*layers),
    nn.AdaptiveAvgPool2d((7, 7)),
    nn.Flatten(),
    nn.Linear(512 * 7 * 7, 4096),
    nn.ReLU(inplace=True),
    nn.Dropout(),
    nn.Linear(4096, 4096),
    nn.ReLU(inplace=True),
  )
  torch.manual_seed(0)
  return model.eval()


def native_openvino_fc2(batch: int, precision: str, workdir: str):
  """One call of plain OpenVINO on a torch-exported VGG-16 to fc2 (model only), batch `batch` of
  float32 NCHW at 224: the native peer of the extraction benchmarks. Returns the call."""
  import os

  import numpy as np
  import torch

  from engine.features.backends import import_openvino

  ov = import_openvino()
  path = os.path.join(workdir, f"torch_vgg16_fc2_b{batch}.onnx")
  if not os.path.exists(path):
    torch.onnx.export(
      torch_vgg16_to_fc2(), torch.rand(batch, 3, 224, 224), path, input_names=["x"], dynamo=False
    )
  core = ov.Core()
  hint = {"fp32": "f32", "bf16": "bf16"}[precision]
  compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
  request = compiled.create_infer_request()
  x = np.random.default_rng(0).random((batch, 3, 224, 224), np.float32)
  return lambda: request.infer({0: x}, share_inputs=True)[0]
