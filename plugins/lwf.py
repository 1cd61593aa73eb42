"""Learning without Forgetting: distil the previous model's outputs on the current data.

At the end of each experience a frozen copy of the model is kept (the teacher).
While later experiences are trained, the loss gains, on every training batch,
the cross-entropy between the teacher's and the model's temperature-softened
distributions over the classes the teacher knew (its ``K`` outputs):

    L_lwf = alpha * mean_b [ -sum_{k<K} softmax(z_teacher / T)_k * log softmax(z_model[:K] / T)_k ]

(Li and Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017, eq. 2,
with their ``T = 2``; their loss weight ``lambda_o`` is ``alpha``, 1 in the
paper, 4 by default here, chosen on validation data: docs/results.md). The
term equals the KL divergence plus the teacher's entropy, so its gradient is
that of the KL divergence and its smallest value is that entropy, not 0.

Which outputs are distilled depends on the head. With one head per task
(``model.head=multi``, task-incremental: the paper's setting), every old
task's head is applied to the new data and distilled, and the terms are summed
over the old tasks, as the paper does for several old tasks. With one growing
head (class-incremental) the old outputs are the old classes' logits.

Deviations from the paper, named: no warm-up phase training the new head alone
first; the teacher's outputs are computed on every training batch (as
Avalanche does) rather than recorded once before training, the same targets
unless the data are augmented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from contlearn.plugins._common import refuse_logits_without_gradient
from torch.nn import functional as F

from contlearn.errors import ConfigError, PluginError
from contlearn.hookspecs import hookimpl
from contlearn.models import ContinualModel
from contlearn.models.heads import MultiHead
from contlearn.snapshots import drop_unsaved_entries, frozen_copy, load_tensors, module_tensors


def distillation(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Mean over the batch of the cross-entropy of ``softmax(student / T)``
    against the soft targets ``softmax(teacher / T)`` (same number of columns)."""
    targets = F.softmax(teacher.float() / T, dim=1)
    return -(targets * F.log_softmax(student.float() / T, dim=1)).sum(dim=1).mean()


class LwF:
    """Learning without Forgetting (Li and Hoiem, ECCV 2016): distillation of the old model's outputs."""

    @dataclass
    class Config:
        T: float = 2.0  # distillation temperature
        alpha: float = 4.0  # weight of the distillation term (chosen on validation data, docs/results.md)

        def __post_init__(self) -> None:
            if not (math.isfinite(self.T) and self.T > 0):
                raise ConfigError(f"plugins.lwf.T must be positive and finite, got {self.T}")
            if not (math.isfinite(self.alpha) and self.alpha >= 0):
                raise ConfigError(f"plugins.lwf.alpha must be non-negative and finite, got {self.alpha}")

    def __init__(self, config: LwF.Config):
        self.config = config
        self.teacher: ContinualModel | None = None  # what run.model is (an Avalanche model's view, too)
        self._pending: dict[str, torch.Tensor] | None = None

    @hookimpl
    def setup(self, run: Any) -> None:
        refuse_logits_without_gradient(run, "lwf", "distils the model's logits")
        if self._pending is not None:  # after a resume: the teacher's weights over a copy of the model
            teacher = frozen_copy(run.model)
            drop_unsaved_entries(teacher, self._pending)  # blocks added to the model since (MEMO, surgery)
            load_tensors(teacher, self._pending)
            if isinstance(head := getattr(teacher, "head", None), MultiHead):
                # the copy may already hold the head of the experience under way: not distilled
                saved = {int(name.split(".")[2]) for name in self._pending if name.startswith("head.heads.")}
                head.keep_tasks(sorted(saved))
            self.teacher, self._pending = teacher, None

    @hookimpl
    def after_experience(self, run: Any) -> None:
        self.teacher = frozen_copy(run.model)

    @hookimpl
    def loss_terms(self, run: Any, batch: Any, out: Any) -> dict[str, torch.Tensor] | None:
        if self.teacher is None:
            return None
        T = self.config.T
        teacher_head = getattr(self.teacher, "head", None)
        if isinstance(teacher_head, MultiHead):
            # A task's head masks the other tasks' samples, so the new data's own
            # logits say nothing about the old tasks: apply each old head directly.
            if out.features is None:
                raise PluginError("lwf: a multi-head model must return its features (Output.features)")
            with torch.no_grad():
                features = self.teacher.backbone(batch.x)
            _check_trainable(out.features, "features")
            heads = run.model.head.heads
            terms = []
            for t in teacher_head.tasks:
                old = teacher_head.heads[str(t)](features)
                # a known task's head may have grown since: its old classes come first
                terms.append(distillation(heads[str(t)](out.features)[:, : old.shape[1]], old, T))
            return {"lwf": self.config.alpha * sum(terms[1:], terms[0])} if terms else None
        tasks = getattr(self.teacher, "trained_tasks", None)
        if tasks is not None:
            # an Avalanche multi-task model (contlearn.interop.avalanche), likewise:
            # every old task's classifier on the new data
            view: Any = self.teacher  # an AvalancheModelView: trained_tasks, task_logits
            terms = []
            for t in tasks:
                with torch.no_grad():
                    old = view.task_logits(batch.x, t)
                terms.append(distillation(run.model.task_logits(batch.x, t)[:, : old.shape[1]], old, T))
            return {"lwf": self.config.alpha * sum(terms[1:], terms[0])} if terms else None
        _check_trainable(out.logits, "logits")
        with torch.no_grad():
            old = self.teacher(batch.x, batch.t).logits
        new = out.logits[:, : old.shape[1]]
        known = getattr(self.teacher, "trained_classes", None)
        if known is not None and len(known) < old.shape[1]:
            # an Avalanche model whose class ids have gaps: the columns between are
            # masked units, not old classes (as Avalanche's own LwF reads prev_classes)
            old, new = old[:, known], new[:, known]
        return {"lwf": self.config.alpha * distillation(new, old, T)}

    def state_dict(self) -> dict[str, Any]:
        """The teacher's parameters and buffers by name (empty before the first experience)."""
        if self.teacher is None:
            return {"teacher": dict(self._pending or {})}
        return {"teacher": {k: v.clone() for k, v in module_tensors(self.teacher).items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher = None
        self._pending = dict(state["teacher"]) or None


def _check_trainable(student: torch.Tensor, what: str) -> None:
    """:raises PluginError: the forward pass gave the outputs LwF distils no
    gradient (another plugin's forward made them under ``torch.no_grad``, as
    PRD does with its logits): the distillation would train nothing."""
    if torch.is_grad_enabled() and not student.requires_grad:
        raise PluginError(
            f"lwf distils the model's {what}, but the forward pass made them without gradient (another plugin's "
            f"forward), so lwf would train nothing: drop one of the two plugins"
        )
