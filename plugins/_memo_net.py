"""MEMO's expandable network (Zhou et al., "A Model or 603 Exemplars: Towards
Memory-Efficient Class-Incremental Learning", ICLR 2023; reference code
wangkiw/ICLR23-MEMO ``models/memo.py``, PyCIL ``AdaptiveNet``).

A backbone is split into *generalized* blocks (shallow, shared by all
experiences) and a *specialized* block (deep). :class:`MemoNet` keeps one
specialized block per experience, all fed by the generalized blocks; the
classifier reads their concatenated features and an auxiliary head reads the
newest block's. Blocks that are no longer the newest are frozen and kept in
eval mode (their batch-norm statistics included), whatever ``train()`` says.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from contlearn.errors import ConfigError, PluginError
from contlearn.models import MLP, ContinualModel, IncrementalLinear, Output, ResNet, SmallCNN


def split_backbone(
    backbone: nn.Module, specialized_width: int | None = None, name: str | None = None
) -> tuple[nn.Module, nn.Module, int]:
    """``(generalized, specialized, feature size)`` of a built-in backbone.

    - CIFAR ResNets / ResNet-18: MEMO's split (:meth:`ResNet.split`): stem and
      every stage but the last / last stage and pooling.
    - ``mlp``: every hidden layer but the last / the last hidden layer (Linear + ReLU).
    - ``cnn``, ``cnn-bn``: every conv block but the last / the last conv block and pooling.

    ``specialized_width`` replaces the specialized block by a freshly initialised
    one of that width (units for an MLP, channels for a CNN).
    """
    if isinstance(backbone, ResNet):
        if specialized_width is not None:
            raise ConfigError("plugins.memo.specialized_width applies to the mlp and cnn backbones, not to ResNets")
        generalized, specialized = backbone.split()
        return generalized, specialized, int(backbone.out_features)
    if isinstance(backbone, MLP):
        layers = list(backbone.net)
        last = layers[-2]
        if not isinstance(last, nn.Linear):
            raise PluginError(
                f"plugin memo splits the mlp backbone at its last linear layer, and found a {type(last).__name__} "
                "there: another plugin (reglora, say) changed the backbone, which memo rebuilds as its own network"
            )
        width = last.out_features if specialized_width is None else int(specialized_width)
        if width != last.out_features:
            last = nn.Linear(last.in_features, width)
        return nn.Sequential(*layers[:-2]), nn.Sequential(last, nn.ReLU()), width
    if isinstance(backbone, SmallCNN):
        layers = list(backbone.net)
        start = max(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d))
        block = layers[start:]
        if specialized_width is not None and specialized_width != backbone.out_features:
            conv = block[0]
            assert isinstance(conv, nn.Conv2d)
            width = int(specialized_width)
            block[0] = nn.Conv2d(conv.in_channels, width, 3, padding=1, bias=conv.bias is not None)
            if isinstance(block[1], nn.BatchNorm2d):
                block[1] = nn.BatchNorm2d(width)
        out = next(m.out_channels for m in block if isinstance(m, nn.Conv2d))
        return nn.Sequential(*layers[:start]), nn.Sequential(*block), int(out)
    raise ConfigError(
        f"the memo plugin cannot split {f'model.backbone={name}' if name else f'a {type(backbone).__name__} backbone'}"
        f" into generalized and specialized "
        f"blocks; valid model.backbone: 'mlp', 'cnn', 'cnn-bn', 'resnet20/32/44/56', 'resnet18', 'resnet18-imagenet'"
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ExpandableBackbone(nn.Module):
    """Generalized blocks followed by specialized blocks side by side; the
    features are the specialized blocks' outputs, concatenated in order."""

    generalized: nn.Module
    specialized: nn.ModuleList

    def __init__(self, generalized: nn.Module, specialized: nn.Module, block_features: int):
        super().__init__()
        self.generalized = generalized
        self.specialized = nn.ModuleList([specialized])
        self.block_features = block_features

    @property
    def out_features(self) -> int:
        return self.block_features * len(self.specialized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.generalized(x)
        return torch.cat([block(base) for block in self.specialized], dim=1)


class MemoNet(ContinualModel):
    """MEMO's network: :class:`ExpandableBackbone`, a linear classifier over its
    concatenated features, and an auxiliary head on the newest block's features
    (its logits in ``Output.extras["aux_logits"]``).

    :ivar n_frozen: how many specialized blocks (the oldest) are frozen.
    :ivar generalized_frozen: whether the generalized blocks are frozen too.
    """

    backbone: ExpandableBackbone
    head: IncrementalLinear

    def __init__(self, backbone: ExpandableBackbone, n_classes: int = 0):
        super().__init__(backbone, IncrementalLinear(backbone.out_features, n_classes))
        self.aux_head: IncrementalLinear | None = None
        self.n_frozen = 0
        self.generalized_frozen = False
        self.compile_mode: str | None = None  # set by compile_parts; blocks added later compile too

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.specialized

    def compile_parts(self, mode: str) -> None:
        """``train.compile``: the generalized blocks and each specialized block apart,
        so that adding a block compiles only that block instead of recompiling a
        backbone whose structure changed."""
        self.compile_mode = mode
        self.backbone.generalized.compile(mode=mode)
        for block in self.blocks:
            block.compile(mode=mode)

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> Output:
        features = self.backbone(x)
        out = Output(self.head(features), features)
        if self.aux_head is not None:
            out.extras["aux_logits"] = self.aux_head(features[:, -self.backbone.block_features :])
        return out

    def expand(self, old_classes: Sequence[int]) -> None:
        """Append a specialized block initialised as a copy of the newest one, and
        widen the classifier: a fresh classifier over the new feature size, into
        which the old classes' rows over the old features are copied."""
        old_head = self.head
        block = copy.deepcopy(self.blocks[-1])
        for p in block.parameters():
            p.requires_grad_(True)
        if self.compile_mode is not None:  # a deep copy is not compiled
            block.compile(mode=self.compile_mode)
        self.blocks.append(block)
        head = IncrementalLinear(self.backbone.out_features, old_head.out_features).to(old_head.weight.device)
        rows = torch.as_tensor(list(old_classes), dtype=torch.long, device=old_head.weight.device)
        with torch.no_grad():
            head.weight[rows, : old_head.in_features] = old_head.weight[rows]
            if head.bias is not None and old_head.bias is not None:
                head.bias[rows] = old_head.bias[rows]
        self.head = head

    def set_aux_head(self, n_outputs: int) -> None:
        """A fresh auxiliary head with ``n_outputs`` outputs on the newest block's features."""
        self.aux_head = IncrementalLinear(self.backbone.block_features, n_outputs).to(self.head.weight.device)

    def freeze(self, n_frozen: int, generalized: bool) -> None:
        """Freeze the ``n_frozen`` oldest specialized blocks (and the generalized
        blocks if ``generalized``); the others train."""
        self.n_frozen, self.generalized_frozen = int(n_frozen), bool(generalized)
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                p.requires_grad_(i >= self.n_frozen)
        for p in self.backbone.generalized.parameters():
            p.requires_grad_(not self.generalized_frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> MemoNet:
        super().train(mode)
        for block in list(self.blocks)[: self.n_frozen]:
            block.eval()
        if self.generalized_frozen:
            self.backbone.generalized.eval()
        return self

    @torch.no_grad()
    def weight_align(self, old_classes: Sequence[int], new_classes: Sequence[int]) -> float:
        """Scale the new classes' classifier rows by mean |w_old| / mean |w_new|
        (weight aligning, Zhao et al., CVPR 2020, as MEMO applies it); returns the factor."""
        w = self.head.weight
        dev = w.device
        old = w[torch.as_tensor(list(old_classes), dtype=torch.long, device=dev)]
        new_rows = torch.as_tensor(list(new_classes), dtype=torch.long, device=dev)
        gamma = old.norm(dim=1).mean() / w[new_rows].norm(dim=1).mean()
        w[new_rows] *= gamma
        return float(gamma)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part: generalized, each specialized block, heads."""
        return {
            "generalized": count_parameters(self.backbone.generalized),
            "specialized": sum(count_parameters(b) for b in self.blocks),
            "specialized_block": count_parameters(self.blocks[0]),
            "classifier": count_parameters(self.head),
            "aux_head": 0 if self.aux_head is None else count_parameters(self.aux_head),
        }
