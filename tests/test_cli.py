"""The command line: exit codes, messages, output files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from contlearn import hookimpl
from contlearn.cli import main


def test_run_default_with_overrides(tmp_path, capsys):
    assert main(["run", "train.epochs=1", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Accuracy matrix" in out and "average accuracy" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["train"]["epochs"] == 1


def test_ctrl_c_while_the_report_is_written_says_the_run_finished(tmp_path, capsys, monkeypatch):
    import contlearn.report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(contlearn.report, "write_report", interrupted)
    assert main(["run", "train.epochs=1", "--out", str(tmp_path), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"error: the run finished and its results are in {tmp_path}, but the report was interrupted; "
                   f"write it with: contlearn report {tmp_path}")
    assert (tmp_path / "results.json").is_file()


def test_a_report_that_cannot_be_written_says_the_run_finished(tmp_path, capsys):
    (tmp_path / "accuracy.png").mkdir()  # the report's plot cannot be written there
    assert main(["run", "train.epochs=1", "scenario.n_experiences=2", "--out", str(tmp_path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "Accuracy matrix" in captured.out  # the finished run's table is still shown
    err = captured.err.strip()
    assert err.startswith(f"error: the run finished and its results are in {tmp_path}, but its report could not be written")
    assert err.endswith(f"write it with: contlearn report {tmp_path}") and "accuracy.png" in err and "\n" not in err
    assert (tmp_path / "results.json").is_file()


def test_ctrl_c_in_a_plugins_teardown_after_the_results_says_the_run_finished(tmp_path, capsys, monkeypatch):
    from contlearn.loggers import JSONLLogger

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(JSONLLogger, "teardown", hookimpl(interrupted))
    assert main(["run", "train.epochs=1", "scenario.n_experiences=2", "--out", str(tmp_path), "--quiet"]) == 130
    assert capsys.readouterr().err.strip().startswith(f"error: the run finished and its results are in {tmp_path}")
    assert (tmp_path / "results.json").is_file()


def test_run_by_name_prints_progress(tmp_path, capsys):
    assert main(["run", "split-digits", "train.epochs=1", "eval.fwt=false", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "experience 4 (5/5)" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "no-such-config"], "shipped experiments"),
        (["run", "train.epochz=1"], "valid keys here"),
        (["run", "plugins.nope.x=1"], "available plugins"),
        (["show-config", "split-digits", "train.lr=fast"], "train.lr"),
        (["frobnicate"], "invalid choice"),
        (["resume"], "the following arguments are required: RUN_DIR\n"),  # not the optional overrides
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_plugins_lists_builtins_with_fields(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "finetune  [builtin]" in out


def test_show_config_prints_merged_yaml(capsys):
    assert main(["show-config", "split-digits", "train.lr=0.3"]) == 0
    assert "lr: 0.3" in capsys.readouterr().out


def test_configs_lists_shipped_names(capsys):
    assert main(["configs"]) == 0
    assert "split-digits" in capsys.readouterr().out.split()


def test_python_dash_m_and_exit_code_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "contlearn", "run", "train.epochz=1"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "error: unknown config key 'train.epochz'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_reader_that_went_away_is_no_traceback():
    """``contlearn plugins | head -1``: the pipe's reader is gone before the listing is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "contlearn", "plugins"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""


def test_a_file_the_user_cannot_read_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.read_text", refuse)  # what chmod 000 does, for a user who is not root
    assert main(["report", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == f"error: [Errno 13] Permission denied: '{tmp_path / 'run' / 'results.json'}'\n"


def test_help_and_import_do_not_load_torch():
    """``contlearn --help`` answers at once, and a Ctrl-C while it starts is no traceback."""
    script = (
        "import sys, contlearn, contlearn.cli\n"
        "assert 'torch' not in sys.modules, 'import contlearn loaded torch'\n"
        "try:\n"
        "    contlearn.cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'contlearn --help loaded torch'\n"
        "import os\n"
        "os.environ.update(WORLD_SIZE='2', RANK='1')  # under torchrun, an error line names the process\n"
        "assert contlearn.cli._process() == '[rank 1] ' and 'torch' not in sys.modules\n"
        "assert contlearn.Experiment.__name__ == 'Experiment' and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_config_warning_is_said_by_process_0_only(monkeypatch, capsys):
    from contlearn import cli
    from contlearn.config import ConfigWarning

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        cli._shown.clear()
        cli._show_warning(ConfigWarning("unused"), ConfigWarning, "x.py", 1)
    assert capsys.readouterr().err == "[rank 0] warning: unused\n"


def test_a_failure_is_put_on_the_innermost_plugin_hook_and_never_on_contlearn_s_defaults():
    """A logger failing on SSD's forget report (a hook SSD calls from its own
    after_experience) is the logger's; an error in the model is no plugin's."""
    from contlearn import Experiment, hookimpl, load_config
    from contlearn.errors import raised_in_a_hook

    class Logger:
        @hookimpl
        def on_metrics(self, metrics):
            if metrics["kind"] == "unlearn":
                raise KeyError("alpha")

    small = ["train.epochs=1", "scenario.n_experiences=2", "scenario.samples_per_class=20", "eval.fwt=false"]
    cfg = load_config(None, [*small, "plugins.ssd.forget=[{after: 0, classes: ['4']}]"])
    with pytest.raises(KeyError) as failed:
        Experiment(cfg, plugins={"log": Logger()}).run()
    assert raised_in_a_hook(failed.value) == (f"{__name__}.{Logger.__qualname__}", "on_metrics")

    class BrokenModel:
        @hookimpl(tryfirst=True)
        def setup(self, run):
            run.model.backbone.register_forward_hook(lambda *_: 1 / 0)

    with pytest.raises(ZeroDivisionError) as failed:
        Experiment(load_config(None, small), plugins={"broken": BrokenModel()}).run()
    assert raised_in_a_hook(failed.value) is None  # through contlearn's forward, no plugin's


def test_under_torchrun_a_second_sigterm_is_the_same_stop_request(monkeypatch, capsys):
    """A scheduler signals every process of a job, and torchrun forwards its own
    SIGTERM too: the second must not kill the process before the agreed stop."""
    import signal

    from contlearn import Experiment, load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    experiment = Experiment(load_config(None, ["train.epochs=1"]))
    with experiment.interruptible():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the default action would end this test's process
        assert experiment._stop_requested
    err = capsys.readouterr().err
    assert err.count("SIGTERM: stopping") == 1
    assert "[rank 1] SIGTERM: stopping at the end of the epoch" in err


def test_overrides_only_go_to_commands_that_take_them_and_out_beats_the_configs(tmp_path, capsys):
    assert main(["plugins", "x=1"]) == 2
    assert "unrecognized arguments: x=1" in capsys.readouterr().err
    assert main(["plugins", "lwf", "ewc"]) == 0  # the plugins named, in that order
    out = capsys.readouterr().out
    assert out.startswith("lwf  [builtin]") and "\newc  [builtin]" in out and "replay" not in out and "    T = 2.0" in out
    assert main(["plugins", "ewz"]) == 2 and "unknown plugin 'ewz'; available plugins:" in capsys.readouterr().err
    assert main(["show-config", "ewc"]) == 2
    assert "('ewc' is a plugin: `contlearn plugins ewc` lists its fields" in capsys.readouterr().err
    given = tmp_path / "given"
    tiny = ["scenario.n_experiences=2", "scenario.samples_per_class=10", "train.epochs=1", "model.hidden=[8]"]
    assert main(["run", *tiny, f"out={tmp_path / 'configured'}", "--out", str(given), "--quiet"]) == 0
    assert (given / "results.json").is_file() and not (tmp_path / "configured").exists()


def test_a_second_ctrl_c_while_a_stopped_run_exits_is_ignored(tmp_path):
    """Pressed again to hurry a run that has already stopped, Ctrl-C lands in the
    exit itself (an atexit callback here): the process still exits 130, quietly."""
    script = """
import atexit, signal
import contlearn._loop as loop
from contlearn.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if this suite runs in the background
atexit.register(signal.raise_signal, signal.SIGINT)  # runs last: the second Ctrl-C, during the exit
train_step = loop.train_step

def step_then_ctrl_c(run, *args):
    train_step(run, *args)
    if run.global_step == 2:
        signal.raise_signal(signal.SIGINT)

loop.train_step = step_then_ctrl_c
raise SystemExit(main())
"""
    argv = [sys.executable, "-c", script, "run", "train.epochs=1", "--out", str(tmp_path / "run"), "--quiet"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 130, done.stderr
    assert "interrupted after step 2 of experience 0" in done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr


def test_a_plugin_of_one_s_own_from_a_file_runs_shows_lists_unlearns_and_resumes_with_p(plugin_file, tmp_path, capsys):
    import shutil

    from contlearn import checkpoint as ckpt

    tiny = ["scenario.n_experiences=2", "scenario.samples_per_class=10", "model.hidden=[8]", "train.epochs=2",
            "eval.fwt=false", "checkpoint.every_n_steps=2", "plugins.anchor.weight=0.5"]
    given = ["-p", f"anchor={plugin_file}:Anchor"]
    whole = tmp_path / "whole"
    assert main(["run", *tiny, *given, "--out", str(whole), "--quiet"]) == 0
    assert "anchor:\n    weight: 0.5" in (whole / "config.yaml").read_text()
    assert '"loss/anchor"' in (whole / "events.jsonl").read_text()  # its loss term was logged: it trained
    assert main(["show-config", *given, "train.lr=0.3"]) == 0
    assert "anchor:\n    weight: 0.1" in capsys.readouterr().out  # active, with its default
    assert main(["plugins", "anchor", *given]) == 0
    assert capsys.readouterr().out.startswith("anchor  [given with --plugin]  Keeps the logits small")
    unlearn = ["unlearn", str(whole), "--classes", "0", "--alpha", "10", "--lam", "1"]
    assert main(unlearn) == 2
    assert "unknown plugin 'anchor'" in capsys.readouterr().err
    assert main([*unlearn, *given]) == 0 and (whole / "unlearn-1" / "unlearn.json").is_file()

    stopped = tmp_path / "stopped"  # the run as a crash half-way left it
    shutil.copytree(whole, stopped)
    (stopped / "results.json").unlink()
    saved = ckpt.list_checkpoints(stopped / "checkpoints")
    for path in saved[len(saved) // 2:]:
        path.unlink()
    assert main(["resume", str(stopped), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown plugin 'anchor'" in err and "-p anchor=FILE.py:Class" in err, err
    assert main(["resume", str(stopped), *given, "--quiet"]) == 0
    finished = [json.loads((run / "results.json").read_text())["accuracy_matrix"] for run in (whole, stopped)]
    assert finished[0] == finished[1]


def test_a_stopped_run_s_advice_names_its_p_plugins_again(plugin_file, tmp_path):
    from contlearn import Experiment
    from contlearn._registry import plugin_classes_from_targets
    from contlearn.errors import Interrupted

    class StopAfterTheFirstEpoch:  # only observes: the resume needs not be given it
        def __init__(self, experiment):
            self.experiment = experiment

        @hookimpl
        def on_metrics(self, metrics):
            if metrics["kind"] == "epoch":
                self.experiment.request_stop()

    given = plugin_classes_from_targets([f"anchor={plugin_file.parent}/../{plugin_file.parent.name}/{plugin_file.name}:Anchor"])
    out = tmp_path / "run"
    experiment = Experiment(None, ["train.epochs=2", "eval.fwt=false"], out_dir=out, plugins=given)
    experiment.extra_plugins["stop"] = StopAfterTheFirstEpoch(experiment)
    with pytest.raises(Interrupted, match=rf"continue with: contlearn resume {out} -p anchor={plugin_file}:Anchor$"):
        experiment.run()
    script = Experiment(None, ["train.epochs=2", "eval.fwt=false"], out_dir=tmp_path / "script",
                        plugins={"anchor": type("Anchor", (given["anchor"],), {})})  # a class of the script's own
    script.extra_plugins["stop"] = StopAfterTheFirstEpoch(script)
    with pytest.raises(Interrupted, match=r"continue with: Experiment.resume\(.*plugins=\{'anchor': Anchor\}\) in Python"):
        script.run()
