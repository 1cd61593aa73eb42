"""Models: a backbone that makes features and a head that makes logits.

:class:`ContinualModel` is what strategies see. Plugins change it by surgery in
``before_experience`` (adding blocks, heads, reprogramming layers), never by
patching ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from contlearn.models.backbones import BACKBONES, MLP, SmallCNN, create_backbone
from contlearn.models.heads import HEADS, CosineLinear, IncrementalLinear, MultiHead, create_head
from contlearn.models.resnet import ResNet

__all__ = [
    "BACKBONES",
    "HEADS",
    "ContinualModel",
    "CosineLinear",
    "IncrementalLinear",
    "MLP",
    "MultiHead",
    "Output",
    "ResNet",
    "SmallCNN",
    "create_backbone",
    "create_head",
    "create_model",
    "feature_width",
]


@dataclass(slots=True)
class Output:
    """What a model returns: class ``logits``, the ``features`` they were computed
    from, and any ``extras`` a strategy's forward adds (projections, aux logits)."""

    logits: torch.Tensor
    features: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class ContinualModel(nn.Module):
    """``backbone`` (inputs -> features) followed by ``head`` (features -> logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def out_features(self) -> int:
        return feature_width(self.backbone)

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> Output:
        features = self.backbone(x)
        return Output(self.head(features, task), features)

    def adapt(self, classes: Sequence[int], task: int = 0) -> None:
        """Make the head able to predict ``classes`` (of task ``task``)."""
        adapt = getattr(self.head, "adapt", None)
        if adapt is not None:
            adapt(classes, task)
        elif (grow := getattr(self.head, "grow", None)) is not None:
            grow(max(classes) + 1)


def feature_width(backbone: nn.Module) -> int:
    """The size of the features ``backbone`` returns (its ``out_features``)."""
    width = backbone.out_features
    if isinstance(width, nn.Module):
        raise TypeError(f"{type(backbone).__name__}.out_features must be a number of features, not a module")
    return int(width)


def create_model(cfg: Any, input_shape: Sequence[int]) -> ContinualModel:
    """Build the model a ``model`` config section describes (``backbone``,
    ``head``, ``pretrained``...), with an empty head that grows as experiences
    arrive."""
    backbone = create_backbone(cfg.backbone, input_shape, cfg)
    head = create_head(getattr(cfg, "head", "incremental"), feature_width(backbone), cfg)
    return ContinualModel(backbone, head)
