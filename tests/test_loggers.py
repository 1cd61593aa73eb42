"""Loggers and progress displays: plugins on on_metrics."""

from __future__ import annotations

import io

import pytest
from _crash import SMALL_RUN, CrashAt, SimulatedCrash

from contlearn import Experiment, hookimpl, load_config
from contlearn.loggers import JSONLLogger, TensorBoardLogger, read_events
from contlearn.reporting import ConsoleProgress, TqdmProgress, progress_plugins


def quick_cfg(quick, *extra):
    return load_config(None, [*quick, "scenario.n_experiences=2", "train.epochs=2", *extra])


def test_jsonl_logs_every_epoch_and_evaluation_of_one_run(quick, tmp_path):
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
    assert len(read_events(path)) == 6, "a new run starts the log afresh"


def without_times(path):
    return [{k: v for k, v in e.items() if k != "time"} for e in read_events(path)]


class Notes:
    """Reports events of its own: one per experience before it trains, one of no
    experience after it trains, and one every third step (events that a resume
    does not report again)."""

    @hookimpl
    def before_experience(self, run, exp):
        run.hook.on_metrics(run=run, metrics={"kind": "note", "experience": exp.index, "epoch": None})

    @hookimpl
    def after_experience(self, run):
        run.hook.on_metrics(run=run, metrics={"kind": "memo", "experience": None, "epoch": None})

    @hookimpl
    def after_step(self, run):
        if run.global_step % 3 == 0:
            run.hook.on_metrics(run=run, metrics={"kind": "step", "experience": run.experience.index, "epoch": run.epoch})


@pytest.fixture(scope="module")
def uninterrupted_events(tmp_path_factory):
    path = tmp_path_factory.mktemp("whole") / "events.jsonl"
    cfg = load_config(None, [*SMALL_RUN, "plugins.ewc.lam=1"])
    Experiment(cfg, plugins={"events": JSONLLogger(path), "notes": Notes()}).run()
    return without_times(path)


# SMALL_RUN trains steps 1-10 on experience 0 (5 per epoch) and 11-18 on experience 1
# (4 per epoch). With a checkpoint after every step, CrashAt(n) crashes in step n + 1
# and the run resumes after n steps: 5 is the last step of an epoch (its event
# follows the checkpoint), 10 and 18 end experiences (the newest checkpoint follows
# their evaluation: between experiences), 12 and 14 are inside experience 1.
@pytest.mark.parametrize("crash_at", [5, 10, 12, 14, 18])
def test_a_resumed_log_reads_as_the_uninterrupted_one(tmp_path, uninterrupted_events, crash_at):
    out, path = tmp_path / "run", tmp_path / "run" / "events.jsonl"
    cfg = load_config(None, [*SMALL_RUN, "plugins.ewc.lam=1", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2"])
    with pytest.raises(SimulatedCrash):
        Experiment(cfg, out_dir=out, plugins={"events": JSONLLogger(path), "notes": Notes(), "crash": CrashAt(crash_at)}).run()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"kind": "epoch", "experience": 0, "ep')  # a line the crash cut short
    Experiment.resume(out, plugins={"events": JSONLLogger(path), "notes": Notes()}).run()
    assert without_times(path) == uninterrupted_events


def test_a_new_run_in_a_failed_start_directory_starts_a_new_log(tmp_path, uninterrupted_events):
    out, path = tmp_path / "run", tmp_path / "run" / "events.jsonl"
    cfg = load_config(None, [*SMALL_RUN, "plugins.ewc.lam=1"])
    with pytest.raises(SimulatedCrash):  # before the first checkpoint (the end of experience 0)
        Experiment(cfg, out_dir=out, plugins={"events": JSONLLogger(path), "notes": Notes(), "crash": CrashAt(8)}).run()
    assert [e["kind"] for e in read_events(path)] == ["note", "step", "step", "epoch", "step"]
    Experiment(cfg, out_dir=out, plugins={"events": JSONLLogger(path), "notes": Notes()}).run()
    assert without_times(path) == uninterrupted_events


def test_tensorboard_scalars(quick, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Experiment(quick_cfg(quick, "plugins.ewc.lam=1"), plugins={"tb": TensorBoardLogger(tmp_path / "tb")}).run()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss/ewc", "eval/average_accuracy", "eval/accuracy/exp0", "eval/accuracy/exp1"} <= tags
    assert [e.step for e in acc.Scalars("eval/average_accuracy")] == [0, 1]
    assert len(acc.Scalars("train/loss")) == 4


def test_tensorboard_write_failures_are_one_message(quick, tmp_path, monkeypatch, capsys):
    """A full disk under the log (its writer thread fails) or a log directory that
    cannot be made: one ContlearnError, no thread's traceback, the hook restored."""
    pytest.importorskip("tensorboard")
    import errno
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    from contlearn.errors import ContlearnError

    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    hook = threading.excepthook
    write = RecordWriter.write
    records = []

    def fills_the_disk(self, data):
        records.append(data)
        if len(records) > 1:  # the file's header gets written
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, data)

    monkeypatch.setattr(RecordWriter, "write", fills_the_disk)
    with pytest.raises(ContlearnError, match=r"cannot write the TensorBoard log '.*tb': No space left on device"):
        Experiment(quick_cfg(quick), plugins={"tb": TensorBoardLogger(tmp_path / "tb")}).run()
    assert threading.excepthook is hook and uncaught == [] and "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(RecordWriter, "write", write)

    (tmp_path / "file").write_text("")
    with pytest.raises(ContlearnError, match=r"cannot open the TensorBoard log '.*file'"):
        Experiment(quick_cfg(quick), plugins={"tb": TensorBoardLogger(tmp_path / "file")}).run()
    assert threading.excepthook is hook


def _tensorboard_points(log_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))  # the directory: every event file, purges applied
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("crash_at", [7, 12, 10], ids=["failed-start", "resumed", "resumed-between-experiences"])
def test_tensorboard_shows_each_point_once_after_a_crash(tmp_path, crash_at):
    """Crashing in step 8 leaves no checkpoint (the first is at the end of
    experience 0): a new run reuses the directory. Crashing in step 13 with a
    checkpoint every step resumes after step 12, and reports its epoch again;
    crashing in step 11 resumes between experiences, after the evaluation."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    every_step = [] if crash_at == 7 else ["checkpoint.every_n_steps=1", "checkpoint.keep_last=2"]
    cfg = load_config(None, [*SMALL_RUN, *every_step])
    whole = tmp_path / "whole"
    Experiment(cfg, plugins={"tb": TensorBoardLogger(whole)}).run()
    with pytest.raises(SimulatedCrash):
        Experiment(cfg, out_dir=out, plugins={"tb": TensorBoardLogger(out / "tb"), "crash": CrashAt(crash_at)}).run()
    if crash_at == 7:
        Experiment(cfg, out_dir=out, plugins={"tb": TensorBoardLogger(out / "tb")}).run()
    else:
        Experiment.resume(out, plugins={"tb": TensorBoardLogger(out / "tb")}).run()
    for tag in ("train/loss", "eval/average_accuracy"):
        assert _tensorboard_points(out / "tb", tag) == _tensorboard_points(whole, tag)


def test_jsonl_writes_numpy_and_tensor_scalars(tmp_path):
    import numpy as np
    import torch

    class Reports:
        @hookimpl
        def after_experience(self, run):
            metrics = {"kind": "mine", "experience": None, "epoch": None, "a": np.float32(0.5),
                       "b": torch.tensor(2), "c": [np.int64(3), torch.tensor([float("nan")])], "d": object}
            run.hook.on_metrics(run=run, metrics=metrics)

    path = tmp_path / "events.jsonl"
    Experiment(load_config(None, SMALL_RUN), plugins={"events": JSONLLogger(path), "reports": Reports()}).run()
    mine = [e for e in read_events(path) if e["kind"] == "mine"]
    assert len(mine) == 3 and mine[0]["a"] == 0.5 and mine[0]["b"] == 2 and mine[0]["c"] == [3, "nan"]
    assert mine[0]["d"] == "<class 'object'>"


def test_a_resume_that_cannot_rewrite_the_log_leaves_it_whole(tmp_path, monkeypatch):
    from contlearn import ContlearnError, loggers

    out, path = tmp_path / "run", tmp_path / "run" / "events.jsonl"
    cfg = load_config(None, [*SMALL_RUN, "checkpoint.every_n_steps=1", "checkpoint.keep_last=2"])
    with pytest.raises(SimulatedCrash):
        Experiment(cfg, out_dir=out, plugins={"events": JSONLLogger(path), "crash": CrashAt(12)}).run()
    before = path.read_text()

    def full_disk(path, text):
        raise ContlearnError(f"cannot write '{path}': No space left on device")

    monkeypatch.setattr(loggers, "write_atomic", full_disk)
    with pytest.raises(ContlearnError, match="No space left"):
        Experiment.resume(out, plugins={"events": JSONLLogger(path)}).run()
    assert path.read_text() == before


def test_read_events_leaves_out_a_cut_last_line_and_refuses_other_garbage(tmp_path):
    from contlearn import ContlearnError

    path = tmp_path / "events.jsonl"
    path.write_text('{"kind": "epoch"}\n{"kind": "ev')
    assert read_events(path) == [{"kind": "epoch"}]
    path.write_text('{"kind": "epoch"}\nnot json\n{"kind": "eval"}\n')
    with pytest.raises(ContlearnError, match="line 2 is not a JSON event"):
        read_events(path)


def test_progress_bars_show_experiences_epochs_and_loss(quick):
    out = io.StringIO()
    bars = TqdmProgress(file=out, disable=False)
    Experiment(quick_cfg(quick), plugins={"progress": bars}).run()
    text = out.getvalue()
    assert "experiences" in text and "2/2" in text and "avg_acc=" in text
    assert "experience 1 (2/2)" in text and "loss=" in text
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
    assert [line.split(":")[0] for line in lines] == ["experience 0 (1/2)", "after experience 1", "experience 1 (2/2)"]
    assert lines[1].startswith("after experience 1: forgot (SSD alpha ") and "% of parameters dampened" in lines[1]


def test_a_lost_evaluation_line_keeps_the_events_of_the_experiences_completed(tmp_path, uninterrupted_events):
    """The evaluation's line is flushed, not synced, before the checkpoint between
    experiences: an OS crash can lose it. The log then keeps every event of the
    completed experiences (it used to be emptied)."""
    out, path = tmp_path / "run", tmp_path / "run" / "events.jsonl"
    cfg = load_config(None, [*SMALL_RUN, "plugins.ewc.lam=1", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2"])
    with pytest.raises(SimulatedCrash):  # resumes between experiences 0 and 1
        Experiment(cfg, out_dir=out, plugins={"events": JSONLLogger(path), "notes": Notes(), "crash": CrashAt(10)}).run()
    lines = path.read_text().splitlines(keepends=True)
    last_eval = max(k for k, line in enumerate(lines) if '"kind": "eval"' in line and '"experience": 0' in line)
    path.write_text("".join(lines[:last_eval]))
    Experiment.resume(out, plugins={"events": JSONLLogger(path), "notes": Notes()}).run()
    lost = [e for e in uninterrupted_events if (e["kind"] == "eval" and e["experience"] == 0)
            or (e["experience"] is None and e["global_step"] == 10)]  # fmt: skip
    assert [e for e in uninterrupted_events if e not in lost] == without_times(path)
    assert [e["kind"] for e in lost] == ["memo", "eval"]


def test_a_full_disk_under_the_event_log_is_one_error(tmp_path):
    from contlearn import ContlearnError

    class FullDisk:
        def write(self, text=""):
            raise OSError(28, "No space left on device")

        flush = close = write  # closing flushes the line that failed, and fails again

    path = tmp_path / "events.jsonl"
    logger = JSONLLogger(path)

    class Fill:
        @hookimpl
        def after_step(self, run):
            if run.global_step == 3:
                logger._file.close()
                logger._file = FullDisk()

    with pytest.raises(ContlearnError, match=f"cannot write the event log '{path}': No space left on device"):
        Experiment(load_config(None, SMALL_RUN), plugins={"events": logger, "fill": Fill()}).run()


@pytest.mark.parametrize("failing_eval, checkpoint, finished", [(0, "ckpt-001-", False), (2, "ckpt-003-", True)])
def test_a_logger_failing_on_an_evaluation_costs_neither_the_experience_nor_the_results(
    tmp_path, failing_eval, checkpoint, finished
):
    from contlearn import ContlearnError
    from contlearn.checkpoint import list_checkpoints

    class FailsOnEvaluation:
        @hookimpl
        def on_metrics(self, run, metrics):
            if metrics["kind"] == "eval" and metrics["experience"] == failing_eval:
                raise ContlearnError("cannot write the event log: No space left on device")

    out = tmp_path / "run"
    with pytest.raises(ContlearnError, match="No space left on device"):
        Experiment(load_config(None, SMALL_RUN), out_dir=out, plugins={"log": FailsOnEvaluation()}).run()
    assert list_checkpoints(out / "checkpoints")[-1].name.startswith(checkpoint)  # the experience trained is kept
    assert (out / "results.json").is_file() == finished
    if not finished:
        assert len(Experiment.resume(out).run().accuracy_matrix) == 3


def test_a_jsonl_logger_writes_nothing_on_a_process_other_than_0(tmp_path):
    """Under torchrun a logger given in Python runs on every process; process 0
    alone writes the file (the CLI adds it there only, Python users everywhere)."""
    from types import SimpleNamespace

    path = tmp_path / "logs" / "events.jsonl"
    logger = JSONLLogger(path)
    run = SimpleNamespace(dist=SimpleNamespace(is_main=False))
    logger.setup(run=run)
    logger.on_metrics(run=run, metrics={"kind": "epoch", "experience": 0, "epoch": 0, "loss": 1.0})
    logger.teardown()
    assert not path.exists() and not path.parent.exists()


def test_a_log_line_cut_short_is_dropped_on_resume_even_when_it_parses(tmp_path):
    """A crash can cut the last line where it still parses as JSON (after a closing
    brace); kept, the next event appended would share its line."""
    import json
    from types import SimpleNamespace

    from contlearn.loggers import _events_before

    kept = json.dumps({"kind": "step", "experience": 1, "global_step": 2}) + "\n"
    cut = json.dumps({"kind": "step", "experience": 1, "global_step": 3})  # no newline: the crash came first
    path = tmp_path / "events.jsonl"
    path.write_text(kept + cut)
    run = SimpleNamespace(accuracy_rows=[[1.0]], experience=SimpleNamespace(index=1), global_step=10)
    assert _events_before(path, run) == [kept]
