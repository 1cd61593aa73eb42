"""Low-rank adapters on a network's linear layers, merged into the weights between tasks.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)
freezes a linear layer's weight ``W`` [out, in] and learns ``delta = B @ A`` with
``A`` [r, in] and ``B`` [out, r]::

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

``A`` starts Kaiming-uniform and ``B`` at zero (peft's default), so a fresh
adapter changes nothing. :meth:`LoRALinear.merge_` adds ``(alpha / r) B @ A`` to
``W`` and starts a fresh adapter: what SEFE's scripts do after every task
(peft's ``merge_and_unload``, then a new adapter on the merged model).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from contlearn.errors import ConfigError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base``) plus a trainable low-rank update.

    ``lora_A`` [rank, in] and ``lora_B`` [out, rank] are the adapter's factors;
    ``scaling`` is ``alpha / rank``. :meth:`delta` is the unscaled ``B @ A``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device, dtype=dtype))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def reset_adapter(self) -> None:
        """A fresh adapter: ``A`` Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear``
        and peft), ``B`` zero, so that the layer computes ``base`` alone."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta(self) -> torch.Tensor:
        """The unscaled update ``B @ A`` [out, in]."""
        return self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge_(self) -> None:
        """Add ``scaling * B @ A`` to the base weight and start a fresh adapter."""
        self.base.weight.add_(self.delta().to(self.base.weight.dtype), alpha=self.scaling)
        self.reset_adapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


#: torch modules that use their linear children's weights directly (fused attention, fast paths)
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: the same, by module and class name, from libraries that need not be installed
_READS_WEIGHTS_BY_NAME = {("open_clip.modified_resnet", "AttentionPool2d")}  # its q/k/v_proj.weight


def _reads_weights(module: nn.Module) -> bool:
    kind = type(module)
    return isinstance(module, _READS_WEIGHTS) or (kind.__module__, kind.__name__) in _READS_WEIGHTS_BY_NAME


def insert_lora(
    module: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    pattern: str | None = None,
    root: nn.Module | None = None,
) -> list[str]:
    """Wrap every ``nn.Linear`` of ``module`` whose name ``pattern`` matches
    (``re.search``; ``None``: all) in a :class:`LoRALinear`, in place; returns
    the names of all adapted layers, those adapted before included (a second
    call wraps nothing twice).

    A layer reached under several names (reused) gets one adapter, in every
    place, when any of its names matches; it is named by the first. The linear
    layers of torch's ``nn.MultiheadAttention`` and ``nn.Transformer*Layer``
    are left alone: those read their weights directly, not through the layers'
    forward.

    :raises ConfigError: before anything is wrapped: when no linear layer is
        selected, naming those there are; when a selected layer shares its
        weight with another module of ``root`` (default: ``module``; a merge
        would change what both compute), or its weight is computed (a
        parametrization, weight norm: a merge would be lost).
    """
    selector = re.compile(pattern) if pattern is not None else None
    places: dict[int, list[tuple[nn.Module, str, str]]] = {}  # by id of the layer: (parent, attribute, name)
    layers: dict[int, nn.Module] = {}
    skipped: list[str] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}{attr}"
            if _reads_weights(child):
                skipped.append(f"{name} ({type(child).__name__})")
            elif isinstance(child, (nn.Linear, LoRALinear)):
                places.setdefault(id(child), []).append((parent, attr, name))
                layers[id(child)] = child
            else:
                walk(child, f"{name}.")

    if _reads_weights(module):
        skipped.append(f"the module itself ({type(module).__name__})")
    else:
        walk(module, "")
    chosen = [
        key for key, where in places.items()
        if isinstance(layers[key], LoRALinear) or selector is None or any(selector.search(n) for _, _, n in where)
    ]
    if not chosen:
        if not places:
            beside = f" (left alone: {', '.join(skipped[:5])}, which read their weights directly)" if skipped else ""
            raise ConfigError(
                f"no nn.Linear layer to adapt in {type(module).__name__}{beside}; LoRA needs linear layers "
                "(e.g. model.backbone=mlp or a timm: vision transformer)"
            )
        names = [where[0][2] for where in places.values()]
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise ConfigError(f"pattern {pattern!r} matches no linear layer; linear layers: {shown}")
    owners: dict[int, set[int]] = {}
    for m in (root or module).modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    for key in chosen:
        layer = layers[key]
        base = layer.base if isinstance(layer, LoRALinear) else layer
        weight = base._parameters.get("weight")
        if not isinstance(weight, nn.Parameter):
            raise ConfigError(
                f"linear layer {places[key][0][2]} computes its weight (a parametrization or weight norm); "
                "LoRA merges into a stored weight, and this merge would be lost"
            )
        if len(owners.get(id(weight), ())) > 1:
            raise ConfigError(
                f"linear layer {places[key][0][2]} shares its weight with another module; "
                "LoRA adapts layers with a weight of their own (a merge would change both)"
            )
    for key in chosen:
        layer = layers[key]
        wrapper = layer if isinstance(layer, LoRALinear) else LoRALinear(layer, rank, alpha, dropout)  # type: ignore[arg-type]
        for parent, attr, _ in places[key]:
            setattr(parent, attr, wrapper)
    return [places[key][0][2] for key in chosen]


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of ``module``, by name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every adapter factor (``lora_A``, ``lora_B``) of ``module``."""
    return [p for m in lora_layers(module).values() for p in (m.lora_A, m.lora_B)]
