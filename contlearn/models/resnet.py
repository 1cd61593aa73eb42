"""ResNets for small images, as continual-learning papers use them.

- ``resnet20/32/44/56``: the CIFAR ResNets of He et al. (CVPR 2016, section
  4.2): a 3x3 stem of 16 channels, three stages of ``n`` basic blocks with
  16/32/64 channels, parameter-free "option A" shortcuts (subsample and pad
  with zero channels), global average pooling. ``resnet32`` is the backbone
  of iCaRL, PyCIL and MEMO (Zhou et al., ICLR 2023) on CIFAR-100: 463,504
  parameters, split by MEMO into generalized blocks (stem + stages 1-2,
  112,016) and specialized blocks (stage 3, 351,488).
- ``resnet18``: ResNet-18 with a 3x3 stride-1 stem and no max-pool (the
  CIFAR variant of PyCIL, SupCon and PRD, Asadi et al., ICML 2023); 11,168,832
  parameters (conv1..layer3 2,775,104; layer4 8,393,728).
- ``resnet18-imagenet``: the ImageNet ResNet-18 (7x7 stride-2 stem, max-pool)
  that MEMO splits for ImageNet-100 (``get_resnet18_imagenet``):
  conv1..layer3 2,782,784 and layer4 8,393,728 parameters.

Every model has ``out_features`` and :meth:`split` (MEMO's generalized /
specialized parts).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ShortcutA(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and append zero channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_planes - in_planes

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = ShortcutA(in_planes, planes, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride, shortcut)]
    layers += [BasicBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """A ResNet of basic blocks: ``stem`` -> ``layer1..layerN`` -> global pool.

    :param widths: channels of each stage; stage ``i > 0`` halves the resolution.
    :param blocks: basic blocks per stage.
    :param stem: ``"3x3"`` (stride 1, no pooling) or ``"7x7"`` (stride 2 and a
        3x3 max-pool, ImageNet style).
    :param shortcut: ``"A"`` (parameter-free) or ``"B"`` (1x1 conv + BN).
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        in_channels: int = 3,
        stem: str = "3x3",
        shortcut: str = "B",
    ):
        super().__init__()
        if stem == "7x7":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        planes = widths[0]
        self.stages: list[str] = []
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            name = f"layer{i + 1}"
            setattr(self, name, _stage(planes, width, n, 1 if i == 0 else 2, shortcut))
            self.stages.append(name)
            planes = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = planes
        _init(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stages:
            x = getattr(self, name)(x)
        return torch.flatten(self.pool(x), 1)

    def split(self) -> tuple[nn.Module, nn.Module]:
        """MEMO's split (Zhou et al., ICLR 2023): the *generalized* blocks (stem
        and every stage but the last) and the *specialized* blocks (last stage
        and pooling). The parts share this model's modules, and
        ``specialized(generalized(x)) == self(x)``."""
        generalized = nn.Sequential(
            self.conv1, self.bn1, nn.ReLU(), self.maxpool, *(getattr(self, n) for n in self.stages[:-1])
        )
        specialized = nn.Sequential(getattr(self, self.stages[-1]), self.pool, nn.Flatten())
        return generalized, specialized


def cifar_resnet(depth: int, in_channels: int = 3) -> ResNet:
    """The CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet((16, 32, 64), (n, n, n), in_channels, stem="3x3", shortcut="A")


def resnet18(in_channels: int = 3, stem: str = "3x3") -> ResNet:
    """ResNet-18 (64/128/256/512 channels, two blocks per stage)."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), in_channels, stem=stem, shortcut="B")
