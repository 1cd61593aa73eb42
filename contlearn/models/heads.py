"""Classifier heads: map features to class logits, and grow as classes arrive."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class IncrementalLinear(nn.Module):
    """A linear classifier whose output grows with the classes seen so far.

    Growing keeps the rows of the old classes and initialises new rows as
    ``nn.Linear`` does. The parameters are replaced on growth, so an optimizer
    must be built after it (the run loop builds one per experience).
    """

    def __init__(self, in_features: int, out_features: int = 0, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._init_rows(0)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def _init_rows(self, start: int) -> None:
        with torch.no_grad():
            if self.weight.shape[0] > start:
                nn.init.kaiming_uniform_(self.weight[start:], a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1 / math.sqrt(self.in_features)
                    nn.init.uniform_(self.bias[start:], -bound, bound)

    def grow(self, out_features: int) -> bool:
        """Grow to ``out_features`` outputs; returns whether it grew."""
        old = self.out_features
        if out_features <= old:
            return False
        weight = torch.empty(out_features, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        weight[:old] = self.weight.data
        self.weight = nn.Parameter(weight)
        if self.bias is not None:
            bias = torch.empty(out_features, device=self.bias.device, dtype=self.bias.dtype)
            bias[:old] = self.bias.data
            self.bias = nn.Parameter(bias)
        self._init_rows(old)
        return True

    def forward(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
