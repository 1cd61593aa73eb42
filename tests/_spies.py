"""Plugins for tests that record what a run did: which parameters train, its epoch events."""

from __future__ import annotations

from contlearn import hookimpl


class TrainedNames:
    """Records, per experience, the names of the parameters that got a gradient."""

    def __init__(self):
        self.grads: dict[int, set[str]] = {}

    @hookimpl
    def after_backward(self, run):
        names = {n for n, p in run.model.named_parameters() if p.grad is not None}
        self.grads.setdefault(run.experience.index, set()).update(names)


class EpochLog:
    """Keeps the epoch events a run reports."""

    def __init__(self):
        self.epochs = []

    @hookimpl
    def on_metrics(self, metrics):
        if metrics["kind"] == "epoch":
            self.epochs.append(metrics)
