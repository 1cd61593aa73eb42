"""Reporters: plugins on ``on_metrics`` that show a run's progress."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from contlearn.hookspecs import hookimpl


class ConsoleProgress:
    """One line per evaluated experience (and per epoch with ``epochs=True``)."""

    def __init__(self, stream: TextIO | None = None, epochs: bool = False):
        self.stream = stream or sys.stdout
        self.epochs = epochs

    @hookimpl
    def on_metrics(self, run: Any, metrics: dict[str, Any]) -> None:
        n = len(run.stream)
        if metrics["kind"] == "epoch" and self.epochs:
            print(
                f"experience {metrics['experience'] + 1}/{n} epoch {metrics['epoch'] + 1}: loss {metrics['loss']:.4f}",
                file=self.stream,
            )
        elif metrics["kind"] == "eval":
            row = " ".join(f"{a:.3f}" for a in metrics["accuracy"])
            print(
                f"experience {metrics['experience'] + 1}/{n}: average accuracy "
                f"{metrics['average_accuracy']:.4f}  [{row}]",
                file=self.stream,
                flush=True,
            )
