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
