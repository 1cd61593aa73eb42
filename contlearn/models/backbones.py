"""Backbones: networks from inputs to feature vectors, built by name.

Every backbone exposes ``out_features``, the size of the features it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from contlearn.errors import ConfigError, choices


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

#: Backbones by name: factory(input_shape, model_cfg) -> module with ``out_features``.
BACKBONES: dict[str, BackboneFactory] = {
    "mlp": lambda shape, cfg: MLP(shape, cfg.hidden),
    "cnn": lambda shape, cfg: SmallCNN(shape, cfg.hidden if len(cfg.hidden) else (32, 64)),
    "cnn-bn": lambda shape, cfg: SmallCNN(shape, cfg.hidden if len(cfg.hidden) else (32, 64), batch_norm=True),
}


def create_backbone(name: str, input_shape: Sequence[int], cfg) -> nn.Module:
    """Build the backbone ``name`` for inputs of ``input_shape``."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown model.backbone '{name}'; valid backbones: {choices(BACKBONES)}")
    return BACKBONES[name](tuple(input_shape), cfg)
