"""Reporters: plugins on ``on_metrics`` that show a run's progress (lines, tqdm bars)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from contlearn.hookspecs import hookimpl


def numbered(index: int, total: int) -> str:
    """An index as the config, the results and the errors write it (from 0), with
    its place among ``total``: ``3 (4/5)``."""
    return f"{index} ({index + 1}/{total})"


def fmt(value: float | None) -> str:
    """A measured fraction to three decimals, ``-`` when it was not measured."""
    return "-" if value is None else f"{value:.3f}"


def unlearn_line(metrics: dict[str, Any]) -> str:
    """One line on a forget event (``on_metrics`` with ``kind: "unlearn"``)."""
    setting = "no dampening needed" if metrics["alpha"] is None else f"alpha {metrics['alpha']:g}, lambda {metrics['lam']:g}"
    return (
        f"after experience {metrics['experience']}: forgot (SSD {setting}): "
        f"forget accuracy {fmt(metrics.get('forget_accuracy'))}, "
        f"retain accuracy {fmt(metrics.get('retain_accuracy'))}, "
        f"{100 * (metrics.get('dampened_fraction') or 0.0):.2f}% of parameters dampened"
    )


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
                f"experience {numbered(metrics['experience'], n)} "
                f"epoch {numbered(metrics['epoch'], run.config.train.epochs)}: loss {metrics['loss']:.4f}",
                file=self.stream,
            )
        elif metrics["kind"] == "unlearn":
            print(unlearn_line(metrics), file=self.stream, flush=True)
        elif metrics["kind"] == "eval":
            row = " ".join(f"{a:.3f}" for a in metrics["accuracy"])
            print(
                f"experience {numbered(metrics['experience'], n)}: average accuracy "
                f"{metrics['average_accuracy']:.4f}  [{row}]",
                file=self.stream,
                flush=True,
            )


class TqdmProgress:
    """Progress bars: one over the experiences (with the average accuracy after
    each) and one over the epochs of the current experience (with its mean loss).

    Updated only from ``on_metrics``, which the loop calls once per epoch and per
    evaluation, so it never reads a tensor during training. Bars go to stderr.
    """

    def __init__(self, file: TextIO | None = None, disable: bool | None = None):
        self.file = file
        self.disable = disable
        self.experiences: Any = None
        self.epochs: Any = None
        self._current: int | None = None

    def _bar(self, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        return tqdm(file=self.file or sys.stderr, disable=self.disable, dynamic_ncols=True, **kwargs)

    @hookimpl
    def setup(self, run: Any) -> None:
        if self.experiences is None:
            done = len(run.accuracy_rows)
            self.experiences = self._bar(total=len(run.stream), initial=done, desc="experiences", unit="exp")

    @hookimpl
    def on_metrics(self, run: Any, metrics: dict[str, Any]) -> None:
        if metrics["kind"] == "epoch":
            if self._current != metrics["experience"] or self.epochs is None:
                self._close_epochs()
                self._current = metrics["experience"]
                n = len(run.stream)
                self.epochs = self._bar(
                    total=run.config.train.epochs,
                    initial=metrics["epoch"],
                    desc=f"experience {numbered(metrics['experience'], n)}",
                    unit="epoch",
                    leave=False,
                )
            self.epochs.update(1)
            self.epochs.set_postfix(loss=f"{metrics['loss']:.4f}")  # refreshes: once per epoch
        elif metrics["kind"] == "unlearn" and self.experiences is not None:
            self.experiences.write(unlearn_line(metrics))
        elif metrics["kind"] == "eval" and self.experiences is not None:
            self._close_epochs()
            self.experiences.update(1)
            self.experiences.set_postfix(avg_acc=f"{metrics['average_accuracy']:.4f}")

    def _close_epochs(self) -> None:
        if self.epochs is not None:
            self.epochs.close()
            self.epochs = None

    @hookimpl
    def teardown(self) -> None:
        self._close_epochs()
        if self.experiences is not None:
            self.experiences.close()
            self.experiences = None


def progress_plugins(quiet: bool = False, interactive: bool | None = None) -> dict[str, Any]:
    """The progress display of a command-line run: bars on a terminal, one line
    per experience otherwise (logs, pipes), nothing when ``quiet``."""
    if quiet:
        return {}
    if interactive is None:
        interactive = sys.stderr.isatty()
    return {"progress": TqdmProgress()} if interactive else {"console": ConsoleProgress()}
