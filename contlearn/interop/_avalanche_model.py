"""A contlearn model inside an Avalanche strategy: :func:`logits_model` wraps it
as an Avalanche dynamic module that returns logits and grows the contlearn head
before each training experience (``contlearn.interop.avalanche.as_avalanche_model``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from contlearn.errors import ContlearnError
from contlearn.interop._avalanche_stream import classes_by_task, experience_classes
from contlearn.models import MultiHead
from contlearn.models.heads import MASKED_LOGIT


class LogitsModel(nn.Module):
    """A contlearn model that returns logits, for an Avalanche strategy to train.
    The adapter unwraps it, so contlearn plugins see the model itself.

    :func:`as_avalanche_model` builds one of its Avalanche dynamic-module
    subclasses (:func:`logits_model_class`): Avalanche strategies call
    ``adaptation(experience)`` on every ``DynamicModule`` of their model before
    each training and each evaluation experience (``model_adaptation``). On a
    training experience (module in train mode, as Avalanche's own
    ``IncrementalClassifier`` decides), it grows the contlearn head with
    ``model.adapt(classes, task)``, once per task label of the experience, as
    contlearn's loop does before ``before_experience``. On an evaluation
    experience the head is left as it is: logits for the classes the head does
    not have yet are padded with :data:`~contlearn.models.heads.MASKED_LOGIT`, so
    the strategy's loss on unseen classes is finite and, once the head has a
    class, they are never predicted.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._eval_width = 0

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(x, task_labels)
        self.__dict__["last_output"] = out  # features and extras, for the plugin adapter's loss terms
        logits = out.logits
        if not self.training and logits.shape[1] < self._eval_width:
            logits = F.pad(logits, (0, self._eval_width - logits.shape[1]), value=MASKED_LOGIT)
        return logits

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # copies and pickles leave the last forward's graph out
        state.pop("last_output", None)
        return state

    def adaptation(self, experience: Any) -> None:
        """Avalanche's ``DynamicModule.adaptation``: grow the head from a training
        experience's classes; note an evaluation experience's classes."""
        if not self.training:
            classes = experience_classes(experience)
            self._eval_width = max(classes) + 1 if classes else 0
            return
        self._eval_width = 0
        adapt = getattr(self.model, "adapt", None)
        for task, classes in classes_by_task(experience).items():
            if classes and adapt is not None:
                adapt(classes, task)
            self._note_task(task, classes)

    def _note_task(self, task: int, classes: Sequence[int]) -> None:
        pass


class _MultiTaskLogits(LogitsModel):
    """The task-incremental variant: an Avalanche ``MultiTaskModule``, so that
    strategies pass the mini-batch's task labels to ``forward``; without task
    labels it returns ``{task: logits}`` for every task trained, as Avalanche's
    ``MultiTaskModule.forward_all_tasks`` does."""

    # set by Avalanche's MultiTaskModule.__init__ (the other base of the class made below)
    known_train_tasks_labels: set[int]
    max_class_label: int

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None = None) -> Any:
        if task_labels is None:
            return self.forward_all_tasks(x)
        if isinstance(task_labels, int):
            task_labels = torch.full((x.shape[0],), task_labels, dtype=torch.long, device=x.device)
        return super().forward(x, task_labels)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.forward(x, int(task_label))

    def forward_all_tasks(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        tasks = getattr(getattr(self.model, "head", None), "tasks", None)
        return {t: self.forward_single_task(x, t) for t in (tasks or sorted(self.known_train_tasks_labels))}

    def _note_task(self, task: int, classes: Sequence[int]) -> None:
        self.known_train_tasks_labels = self.known_train_tasks_labels | {int(task)}
        if classes:
            self.max_class_label = max(self.max_class_label, max(classes) + 1)


@functools.cache
def logits_model_class(multi_task: bool) -> type:
    """:class:`LogitsModel` as an Avalanche ``DynamicModule`` (``multi_task``:
    ``MultiTaskModule``), made once. The classes are reachable as this module's
    ``DynamicLogitsModel`` / ``MultiTaskLogitsModel``, so wrapped models pickle."""
    from avalanche.models import DynamicModule, MultiTaskModule

    base = (_MultiTaskLogits, MultiTaskModule) if multi_task else (LogitsModel, DynamicModule)
    name = "MultiTaskLogitsModel" if multi_task else "DynamicLogitsModel"
    return type(name, base, {"__module__": __name__, "__qualname__": name, "__doc__": base[0].__doc__})


def __getattr__(name: str) -> type:
    if name in ("DynamicLogitsModel", "MultiTaskLogitsModel"):
        return logits_model_class(name == "MultiTaskLogitsModel")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def logits_model(model: nn.Module, multi_task: bool | None = None) -> LogitsModel:
    """``model`` wrapped as an Avalanche dynamic module (see :class:`LogitsModel`);
    ``multi_task=None``: a ``MultiTaskModule`` when the model's head is a
    :class:`~contlearn.models.MultiHead`."""
    if not isinstance(model, nn.Module):
        raise ContlearnError(f"as_avalanche_model needs a contlearn model (a torch Module), got {type(model).__name__}")
    if isinstance(model, LogitsModel):
        model = model.model
    if not callable(getattr(model, "adapt", None)):
        raise ContlearnError(
            f"as_avalanche_model wraps a contlearn model (forward(x, task) returning an Output, and adapt(classes, "
            f"task)); {type(model).__name__} has no adapt: give a plain torch model to the Avalanche strategy as it is"
        )
    if multi_task is None:
        multi_task = isinstance(getattr(model, "head", None), MultiHead)
    return logits_model_class(bool(multi_task))(model)
