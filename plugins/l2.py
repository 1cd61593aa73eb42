"""L2 regularisation towards earlier weights: a quadratic penalty with unit importance.

While an experience is trained the loss gains

    L_l2 = lam/2 * sum_i (theta_i - theta*_i)^2,   dL_l2/dtheta = lam * (theta - theta*)

with ``theta*`` the weights after the previous experience (``anchor: previous``;
the L2 baseline of Kirkpatrick et al., PNAS 2017, fig. 2: online EWC with the
Fisher replaced by the identity and gamma 0, since only the last anchor pulls)
or the weights the run started from, e.g. pretrained ones (``anchor: initial``; L2-SP, Xuhong Li et al., "Explicit Inductive Bias for
Transfer Learning with Convolutional Networks", ICML 2018). ``pattern``, a
regular expression searched in parameter names, restricts the penalty to some
weights (e.g. ``attn`` for attention projections only).

As with EWC, a parameter that has grown since its anchor (the head) is
penalised only over the part that existed then.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from contlearn.plugins._common import check_pattern, require_trainable
from contlearn.plugins.ewc import quadratic_penalty

from contlearn.errors import ConfigError, PluginError, choices
from contlearn.hookspecs import hookimpl
from contlearn.snapshots import selected_parameters, snapshot

ANCHORS = ("previous", "initial")


class L2:
    """L2 penalty towards the previous experience's or the initial weights."""

    @dataclass
    class Config:
        lam: float = 0.01  # penalty weight: L = lam/2 * sum (theta - theta*)^2 (chosen on validation data, docs/results.md)
        anchor: str = "previous"  # previous (weights after the last experience) | initial
        pattern: Optional[str] = None  # regex searched in parameter names; None: every parameter

        def __post_init__(self) -> None:
            if self.anchor not in ANCHORS:
                raise ConfigError(f"plugins.l2.anchor must be one of {choices(ANCHORS)}, got {self.anchor!r}")
            if not 0 <= self.lam < math.inf:
                raise ConfigError(f"plugins.l2.lam must be a non-negative finite number, got {self.lam}")
            check_pattern("plugins.l2.pattern", self.pattern)

    def __init__(self, config: L2.Config):
        self.pattern = re.compile(config.pattern) if config.pattern is not None else None
        self.config = config
        self.anchor: dict[str, torch.Tensor] = {}

    @hookimpl
    def setup(self, run: Any) -> None:
        require_trainable(run, "l2", "pulls the model's trainable parameters towards an anchor")
        if self.pattern is not None and not any(True for _ in selected_parameters(run.model, self.pattern)):
            names = [n for n, _ in run.model.named_parameters()]
            raise PluginError(
                f"plugins.l2.pattern {self.config.pattern!r} matches no trainable parameter; "
                f"parameter names: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
            )
        if self.anchor:  # after a resume
            self.anchor = {n: t.to(run.device) for n, t in self.anchor.items()}
        elif self.config.anchor == "initial":
            self.anchor = snapshot(run.model, self.pattern)

    @hookimpl
    def after_experience(self, run: Any) -> None:
        if self.config.anchor == "previous":
            self.anchor = snapshot(run.model, self.pattern)

    @hookimpl
    def loss_terms(self, run: Any) -> dict[str, torch.Tensor] | None:
        if not self.anchor:
            return None
        total = quadratic_penalty(dict(run.model.named_parameters()), self.anchor, None)
        if total is None:
            return None
        return {"l2": 0.5 * self.config.lam * total}

    def state_dict(self) -> dict[str, Any]:
        """The anchor weights by parameter name."""
        return {"anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = dict(state["anchor"])
