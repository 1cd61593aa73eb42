"""The defaults every run starts from: cross-entropy, the configured optimizer,
the model's own forward and argmax prediction.

:class:`Defaults` is registered before any strategy and its implementations are
``trylast``: they answer a ``firstresult`` hook only when no strategy does.
Each takes its spec's full signature, because the loop calls it directly (not
through pluggy) when no strategy implements the hook.
"""

from __future__ import annotations

import bisect
import math
from types import SimpleNamespace

import torch
from torch.nn import functional as F

from contlearn.errors import TrainingError
from contlearn.hookspecs import hookimpl
from contlearn.models import Output
from contlearn.run import OptimizerLike, Run
from contlearn.scenarios import Batch, Experience

OPTIMIZERS = {
    "sgd": lambda params, cfg: torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    ),
    "adam": lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def build_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names, over ``params``."""
    return OPTIMIZERS[train_cfg.optimizer](params, train_cfg)


def epoch_lr(base: float, train_cfg, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based, within an experience) under
    ``train.lr_schedule``, for a parameter group whose rate is ``base``.

    ``multistep`` multiplies by ``gamma`` at each milestone epoch reached
    (``torch.optim.lr_scheduler.MultiStepLR`` stepped once per epoch);
    ``cosine`` decays from ``base`` to ``min_lr`` over the experience's epochs
    (``CosineAnnealingLR`` with ``T_max = epochs``, as PyCIL trains).
    """
    if train_cfg.lr_schedule == "multistep":
        return base * train_cfg.gamma ** bisect.bisect_right(list(train_cfg.milestones), epoch)
    if train_cfg.lr_schedule == "cosine":
        low = train_cfg.min_lr
        return low + (base - low) * (1 + math.cos(math.pi * epoch / train_cfg.epochs)) / 2
    return base


def set_epoch_lr(optimizer: OptimizerLike, train_cfg, epoch: int, factor: float = 1.0) -> None:
    """Set every parameter group's rate for ``epoch`` (times ``factor``), from the
    group's rate when it was first scheduled (kept as ``initial_lr``, torch's key,
    so that it is in the optimizer's state dict and a resumed run schedules from
    it too)."""
    if train_cfg.lr_schedule == "none" and not train_cfg.warmup:
        return
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = epoch_lr(group["initial_lr"], train_cfg, epoch) * factor


def warmup_steps(train_cfg, steps_per_epoch: int) -> int:
    """The steps of an experience over which ``train.warmup`` raises the rate:
    ``ceil(steps * warmup)`` of its ``steps = epochs * steps_per_epoch``, as
    Hugging Face's ``warmup_ratio`` (the integers multiplied first, as there: 0.05
    of 3 x 20 steps is 3, where ``0.05 * 3 * 20`` rounds up to 4)."""
    return math.ceil(train_cfg.epochs * steps_per_epoch * train_cfg.warmup)


class ScheduleWarning(UserWarning):
    """A learning-rate schedule with a part that never takes effect."""


def unreached_milestones(train_cfg, steps_per_epoch: int) -> list[int]:
    """The ``multistep`` milestones at or past the end of an experience of
    ``steps_per_epoch`` steps per epoch, in the schedule's unit: they never apply."""
    if train_cfg.lr_schedule != "multistep":
        return []
    end = train_cfg.epochs * (steps_per_epoch if train_cfg.lr_schedule_unit == "step" else 1)
    return [m for m in train_cfg.milestones if m >= end]


def set_step_lr(optimizer: OptimizerLike, train_cfg, epoch: int, step: int, warmup: int) -> None:
    """Before step ``step`` (0-based, within the experience): the scheduled rate
    times ``step / warmup`` while ``step < warmup`` (linear warm-up from 0, as
    Hugging Face's schedules), the scheduled rate itself at ``step == warmup``;
    nothing later (the epoch's rate stands)."""
    if step <= warmup:
        set_epoch_lr(optimizer, train_cfg, epoch, step / warmup if step < warmup else 1.0)


def plain_schedule(train_cfg) -> SimpleNamespace:
    """The schedule's fields of ``train_cfg`` as plain attributes (a config's are
    slow to read at every step)."""
    keys = ("lr_schedule", "lr_schedule_unit", "gamma", "min_lr", "warmup", "epochs")
    return SimpleNamespace(**{k: getattr(train_cfg, k) for k in keys}, milestones=list(train_cfg.milestones))


def step_schedule_lr(base: float, train_cfg, step: int, steps: int, warmup: int) -> float:
    """The rate of step ``step`` (0-based, of the experience's ``steps``) when
    ``train.lr_schedule_unit`` is ``step``, for a group whose rate is ``base``.

    ``multistep`` counts its milestones in steps; ``cosine`` decays from ``base``
    to ``min_lr`` over the steps after the ``warmup`` steps (Hugging Face's
    ``get_cosine_schedule_with_warmup``, with ``min_lr`` as its floor); the
    first ``warmup`` steps take ``step / warmup`` of the scheduled rate.
    """
    if train_cfg.lr_schedule == "multistep":
        rate = base * train_cfg.gamma ** bisect.bisect_right(list(train_cfg.milestones), step)
    elif train_cfg.lr_schedule == "cosine":
        low = train_cfg.min_lr
        progress = max(step - warmup, 0) / max(steps - warmup, 1)
        rate = low + (base - low) * (1 + math.cos(math.pi * progress)) / 2
    else:
        rate = base
    return rate * step / warmup if step < warmup else rate


def set_step_schedule_lr(optimizer: OptimizerLike, train_cfg, step: int, steps: int, warmup: int) -> None:
    """Set every parameter group's rate for step ``step`` (:func:`step_schedule_lr`),
    from the group's ``initial_lr`` (see :func:`set_epoch_lr`)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = step_schedule_lr(group["initial_lr"], train_cfg, step, steps, warmup)


class Defaults:
    """The built-in behaviour of the loop, as the lowest-priority plugin."""

    @hookimpl(trylast=True)
    def configure_optimizer(self, run: Run, exp: Experience) -> torch.optim.Optimizer:
        params = [p for p in run.model.parameters() if p.requires_grad]
        return build_optimizer(params, run.config.train)

    @hookimpl(trylast=True)
    def forward(self, run: Run, batch: Batch) -> Output:
        return run.model(batch.x, batch.t)

    @hookimpl(trylast=True)
    def compute_loss(self, run: Run, batch: Batch, out: Output) -> torch.Tensor:
        try:
            logits = out.logits
        except AttributeError:
            raise TrainingError(
                f"forward returned a {type(out).__name__}: the default loss needs a contlearn.models.Output "
                f"(Output(logits=..., features=...)), or a compute_loss hook for what forward returns"
            ) from None
        return F.cross_entropy(logits, batch.y)

    @hookimpl(trylast=True)
    def predict(self, run: Run, batch: Batch) -> torch.Tensor:
        return run.model(batch.x, batch.t).logits.argmax(dim=1)

    @hookimpl(trylast=True)
    def train_data(self, run: Run, exp: Experience):
        return exp.train
