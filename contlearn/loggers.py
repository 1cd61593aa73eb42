"""Loggers: plugins on ``on_metrics`` that record a run's metrics as it goes.

* :class:`JSONLLogger` writes one JSON object per report to a file, the log of
  one run, continued on resume (the CLI always writes ``RUN_DIR/events.jsonl``);
* :class:`TensorBoardLogger` writes TensorBoard scalars (needs the
  ``tensorboard`` extra: ``pip install 'contlearn[tensorboard]'``).

The loop reports once per training epoch (``kind: "epoch"``, mean losses by
name) and once per evaluation (``kind: "eval"``, the accuracy row), so a logger
never reads a tensor back from the device. Only the main process writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from contlearn.errors import ContlearnError, optional_import
from contlearn.hookspecs import hookimpl
from contlearn.results import make_writable_dir, write_atomic


def _plain(value: Any) -> Any:
    """JSON-safe: NumPy scalars and one-element tensors become Python numbers,
    non-finite floats strings (``"nan"``, ``"inf"``); anything else JSON cannot
    write is written as its ``str`` (see :meth:`JSONLLogger.on_metrics`)."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class JSONLLogger:
    """One JSON object per line for every ``on_metrics`` report, written to ``path``.

    Each line is the reported mapping plus ``time`` (seconds since the epoch) and
    ``global_step``; ``kind`` is ``epoch``, ``eval`` or a plugin's own (SSD's
    ``unlearn``). The file is the log of one run: a new run starts it afresh, and
    a resumed run keeps the events of what its checkpoint holds (see
    :func:`before_position`) and appends from there, so that its log reads as
    the uninterrupted run's would, with no event twice and no line cut by a crash.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[str] | None = None

    @hookimpl
    def setup(self, run: Any) -> None:
        if not run.dist.is_main or self._file is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = _events_before(self.path, run) if self.path.is_file() else []
            write_atomic(self.path, "".join(kept))  # the old log stays whole if this fails
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in teardown
        except OSError as exc:
            raise ContlearnError(f"cannot open the event log '{self.path}': {exc.strerror or exc}") from None

    @hookimpl
    def on_metrics(self, run: Any, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        event = {**_plain(metrics), "time": time.time(), "global_step": run.global_step}
        try:
            self._file.write(json.dumps(event, default=str) + "\n")
            self._file.flush()
        except OSError as exc:
            raise ContlearnError(f"cannot write the event log '{self.path}': {exc.strerror or exc}") from None

    @hookimpl
    def teardown(self) -> None:
        if self._file is not None:
            # every event was flushed: what is left is the line whose write failed,
            # and that failure is the error being reported
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def before_position(event: dict[str, Any], run: Any) -> bool:
    """Whether ``event`` was reported before the position ``run`` starts from (a
    checkpoint's, or the start for a new run): every event of the experiences it
    completed; in the experience under way (and for events of no experience),
    those reported before its last step (an epoch's report follows the
    checkpoint of the epoch's last step, and is made again on resume)."""
    exp = event.get("experience")
    if isinstance(exp, int):
        if exp < len(run.accuracy_rows):
            return True
        if run.experience is None or exp != run.experience.index:
            return False
    step = event.get("global_step")
    return isinstance(step, int) and step < run.global_step


def _events_before(path: Path, run: Any) -> list[str]:
    """The lines of the log at ``path`` reported before the position ``run`` starts
    from; a line a crash cut short is dropped. Inside an experience, the events
    :func:`before_position` keeps. Between experiences, the lines up to the
    evaluation of the last experience completed: its checkpoint is written right
    after it (events of no experience, at the same step, are told apart by that)."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and line.endswith("\n"):
                events.append((line, event))
    if run.experience is None:
        last = len(run.accuracy_rows) - 1
        ends = [k for k, (_, e) in enumerate(events) if e.get("kind") == "eval" and e.get("experience") == last]
        if last < 0:
            return []
        if ends:
            return [line for line, _ in events[: ends[-1] + 1]]
        # that evaluation's line is lost (flushed, not synced, before the checkpoint): keep every event of the
        # experiences completed, and of no experience before the checkpoint's step
    return [line for line, event in events if before_position(event, run)]


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of a JSONL log, in order; a last line a crash cut short is left out.

    :raises ContlearnError: a line before the last is not JSON (not a contlearn log).
    """
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    events = []
    for k, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except ValueError:
            if k == len(lines) - 1 and not line.endswith("\n"):
                break
            raise ContlearnError(f"'{path}' line {k + 1} is not a JSON event") from None
    return events


class TensorBoardLogger:
    """TensorBoard scalars in ``log_dir``: ``train/<loss>`` per epoch (x: global
    step), ``eval/average_accuracy`` and ``eval/accuracy/exp<j>`` per evaluation
    (x: the experience just trained)."""

    def __init__(self, log_dir: str | Path):
        tensorboard = optional_import(
            "torch.utils.tensorboard", package="tensorboard", extra="tensorboard", needed_for="the TensorBoard logger"
        )
        self._writer_cls = tensorboard.SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer: Any = None
        self._excepthook: Any = None

    @hookimpl
    def setup(self, run: Any) -> None:
        # purge_step: TensorBoard hides what an earlier writer logged at this step or
        # later, so a resumed run shows no point twice and a new run in a reused
        # directory (step 0) none of a failed run's. Between experiences the last
        # epoch's point, at the checkpoint's own step, is not logged again: kept.
        if run.dist.is_main and self.writer is None:
            between = run.experience is None and run.global_step > 0
            try:  # checked here: TensorBoard's writer thread would fail on its own, with its traceback
                make_writable_dir(self.log_dir)
                _wait_for_a_later_second(self.log_dir)
                self._excepthook = threading.excepthook
                threading.excepthook = _quiet_writer_threads(self._excepthook)
                self.writer = self._writer_cls(log_dir=str(self.log_dir), purge_step=run.global_step + between)
            except OSError as exc:
                self.teardown()
                raise ContlearnError(f"cannot open the TensorBoard log '{self.log_dir}': {exc.strerror or exc}") from None

    @hookimpl
    def on_metrics(self, run: Any, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        try:
            if metrics["kind"] == "epoch":
                for name, value in metrics.items():
                    if name == "loss" or name.startswith("loss/"):
                        tag = "train/loss" if name == "loss" else f"train/{name}"
                        self.writer.add_scalar(tag, value, run.global_step)
            elif metrics["kind"] == "eval":
                step = metrics["experience"]
                self.writer.add_scalar("eval/average_accuracy", metrics["average_accuracy"], step)
                for j, acc in enumerate(metrics["accuracy"]):
                    self.writer.add_scalar(f"eval/accuracy/exp{j}", acc, step)
            self.writer.flush()
        except OSError as exc:  # a full disk: raised here, or by the writer's thread and passed on here
            raise ContlearnError(f"cannot write the TensorBoard log '{self.log_dir}': {exc.strerror or exc}") from None

    @hookimpl
    def teardown(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError):  # a write failure is the error being reported
                self.writer.close()
            self.writer = None
        if self._excepthook is not None:
            threading.excepthook = self._excepthook
            self._excepthook = None


def _wait_for_a_later_second(log_dir: Path) -> None:
    """TensorBoard reads a directory's event files in name order and names them by
    the second a writer opened them in, then a counter that sorts 10 before 9: a
    writer opened in the second of an earlier one (a run resumed in the process
    that crashed) waits for the next second, so that its purge applies after."""
    stamps = []
    for path in log_dir.glob("events.out.tfevents.*"):
        with contextlib.suppress(IndexError, ValueError):
            stamps.append(int(path.name.split(".")[3]))
    now = time.time()
    if int(now) in stamps:
        time.sleep(int(now) + 1 - now)


def _quiet_writer_threads(previous: Any) -> Any:
    """A ``threading.excepthook`` that leaves out the OSError of TensorBoard's
    writer thread (the logger reports it, once, from the main thread) and passes
    every other exception to ``previous``."""

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    return hook
