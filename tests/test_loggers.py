"""Loggers and progress displays: plugins on on_metrics."""

from __future__ import annotations

import io

import pytest

from contlearn import Experiment, load_config
from contlearn.loggers import JSONLLogger, TensorBoardLogger, read_events
from contlearn.reporting import ConsoleProgress, TqdmProgress, progress_plugins


def quick_cfg(quick, *extra):
    return load_config(None, [*quick, "scenario.n_experiences=2", "train.epochs=2", *extra])


def test_jsonl_logs_every_epoch_and_evaluation_and_appends(quick, tmp_path):
    path = tmp_path / "events.jsonl"
    Experiment(quick_cfg(quick, "plugins.ewc.lam=1"), plugins={"events": JSONLLogger(path)}).run()
    events = read_events(path)
    assert [(e["kind"], e["experience"], e["epoch"]) for e in events] == [
        ("epoch", 0, 0), ("epoch", 0, 1), ("eval", 0, None), ("epoch", 1, 0), ("epoch", 1, 1), ("eval", 1, None)
    ]
    assert all(isinstance(e["loss"], float) for e in events if e["kind"] == "epoch")
    assert "loss/ewc" in events[3] and len(events[2]["accuracy"]) == 2
    assert events[-1]["global_step"] > events[0]["global_step"] > 0
    Experiment(quick_cfg(quick), plugins={"events": JSONLLogger(path)}).run()
    assert len(read_events(path)) == 12, "a second run appends"


def test_tensorboard_scalars(quick, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Experiment(quick_cfg(quick), plugins={"tb": TensorBoardLogger(tmp_path / "tb")}).run()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/average_accuracy", "eval/accuracy/exp0", "eval/accuracy/exp1"} <= tags
    assert [e.step for e in acc.Scalars("eval/average_accuracy")] == [0, 1]
    assert len(acc.Scalars("train/loss")) == 4


def test_progress_bars_show_experiences_epochs_and_loss(quick):
    out = io.StringIO()
    bars = TqdmProgress(file=out, disable=False)
    Experiment(quick_cfg(quick), plugins={"progress": bars}).run()
    text = out.getvalue()
    assert "experiences" in text and "2/2" in text and "avg_acc=" in text
    assert "experience 2/2" in text and "loss=" in text
    assert bars.experiences is None and bars.epochs is None, "closed at teardown"


def test_progress_choice():
    assert progress_plugins(quiet=True) == {}
    assert isinstance(progress_plugins(interactive=True)["progress"], TqdmProgress)
    assert isinstance(progress_plugins(interactive=False)["console"], ConsoleProgress)


def test_console_progress_reports_a_forget_event(quick):
    import io

    out = io.StringIO()
    overrides = [*quick, "scenario.n_experiences=2", "plugins.ssd.forget=[{after: 1, classes: [0]}]"]
    Experiment(load_config(None, overrides), plugins={"console": ConsoleProgress(out)}).run()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["experience 1/2", "after experience 2", "experience 2/2"]
    assert lines[1].startswith("after experience 2: forgot (SSD alpha ") and "% of parameters dampened" in lines[1]
