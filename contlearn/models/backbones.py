"""Backbones: networks from inputs to feature vectors, built by name.

Every backbone exposes ``out_features``, the size of the features it returns.
Built in: ``mlp``, ``cnn``, ``cnn-bn`` (small nets for vectors and small
images), CIFAR ResNets (:mod:`contlearn.models.resnet`); by prefix: ``timm:``,
``tv:``, ``clip:`` (:mod:`contlearn.models.external`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from contlearn.errors import ConfigError, choices
from contlearn.models import resnet
from contlearn.models.external import EXTERNAL, check_input_shape


class MLP(nn.Module):
    """A fully connected network on flattened inputs, ReLU between layers."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (256, 256)):
        super().__init__()
        if not hidden:
            raise ConfigError("model.hidden must list at least one layer width for backbone 'mlp'")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 convolution blocks and global pooling, for small images such as
    8x8 digits or 28x28 MNIST."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (32, 64), batch_norm: bool = False):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"backbone 'cnn' needs image inputs [C, H, W], got shape {tuple(input_shape)}")
        channels = input_shape[0]
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_features = channels

    def forward(self, x):
        return self.net(x)


BackboneFactory = Callable[..., nn.Module]


def _image_shape(name: str, shape: Sequence[int]) -> int:
    if len(shape) != 3:
        raise ConfigError(f"backbone '{name}' needs image inputs [C, H, W], got shape {tuple(shape)}")
    return int(shape[0])


def _cifar_resnet(depth: int) -> BackboneFactory:
    return lambda shape, cfg: resnet.cifar_resnet(depth, _image_shape(f"resnet{depth}", shape))


#: Backbones by name: factory(input_shape, model_cfg) -> module with ``out_features``.
#: Names with a prefix (``timm:``, ``tv:``, ``clip:``) come from other libraries
#: (:mod:`contlearn.models.external`).
BACKBONES: dict[str, BackboneFactory] = {
    "mlp": lambda shape, cfg: MLP(shape, cfg.hidden),
    "cnn": lambda shape, cfg: SmallCNN(shape, cfg.hidden if len(cfg.hidden) else (32, 64)),
    "cnn-bn": lambda shape, cfg: SmallCNN(shape, cfg.hidden if len(cfg.hidden) else (32, 64), batch_norm=True),
    "resnet18": lambda shape, cfg: resnet.resnet18(_image_shape("resnet18", shape), stem="3x3"),
    "resnet18-imagenet": lambda shape, cfg: resnet.resnet18(_image_shape("resnet18-imagenet", shape), stem="7x7"),
    **{f"resnet{d}": _cifar_resnet(d) for d in (20, 32, 44, 56)},
}


def create_backbone(name: str, input_shape: Sequence[int], cfg) -> nn.Module:
    """Build the backbone ``name`` for inputs of ``input_shape``."""
    pretrained = bool(getattr(cfg, "pretrained", False))
    prefix, sep, arch = name.partition(":")
    if sep:
        if prefix not in EXTERNAL:
            raise ConfigError(f"unknown backbone prefix '{prefix}:' in model.backbone '{name}'; valid: "
                              f"{', '.join(f'{p}:<name>' for p in EXTERNAL)}")
        net = EXTERNAL[prefix](arch, tuple(input_shape), pretrained, getattr(cfg, "weights", None))
        check_input_shape(net, tuple(input_shape), name)
        return net
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown model.backbone '{name}'; valid backbones: {choices(BACKBONES)}, "
            f"or timm:<name>, tv:<name>, clip:<arch>"
        )
    if pretrained:
        raise ConfigError(
            f"backbone '{name}' has no pretrained weights; model.pretrained works with "
            f"timm:<name>, tv:<name> and clip:<arch> backbones"
        )
    return BACKBONES[name](tuple(input_shape), cfg)
