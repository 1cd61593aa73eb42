"""Resuming: a run killed or interrupted at any checkpoint, resumed, gives the
results of the run that was never stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from _crash import SMALL_RUN, CrashAt, SimulatedCrash, assert_same_final_weights, comparable
from torch import nn

from contlearn import Experiment, TrainingError, hookimpl, load_config
from contlearn import checkpoint as ckpt
from contlearn.cli import main
from contlearn.errors import CheckpointError, ConfigError, Interrupted

#: 3 experiences (4, 3, 3 classes; 80, 60, 60 training samples), 2 epochs of
#: batches of 16: 10, 8 and 8 steps, so the run's steps 1-10 train experience 0,
#: 11-18 experience 1 (4 steps per epoch) and 19-26 experience 2.
TINY = [*SMALL_RUN, "train.momentum=0.9"]




@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted command-line run of TINY."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["run", *TINY, "--out", str(out), "--quiet"]) == 0
    return out


def test_sigkill_after_experience_2_then_resume_equals_uninterrupted(tmp_path, reference):
    # the real command, killed by SIGKILL as soon as the checkpoint after the
    # second experience is on disk
    (tmp_path / "killer.py").write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            import contlearn.checkpoint as ckpt

            write = ckpt.write

            def write_then_die(directory, state, keep_last):
                path = write(directory, state, keep_last)
                pos = state["position"]
                if pos["completed"] == 2 and not pos["inside_experience"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return path

            ckpt.write = write_then_die
            from contlearn.cli import main
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "killer.py"), "run", *TINY, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "results.json").exists()
    assert [p.name[:9] for p in ckpt.list_checkpoints(out / "checkpoints")] == ["ckpt-001-", "ckpt-002-"]

    assert main(["resume", str(out), "--quiet"]) == 0
    assert comparable(out) == comparable(reference)
    assert_same_final_weights(out, reference)




def test_resume_inside_an_experience_mid_epoch_is_exact(tmp_path, reference):
    out = tmp_path / "run"
    cfg = load_config(None, [*TINY, "checkpoint.every_n_steps=4", "checkpoint.keep_last=50"])
    with pytest.raises(SimulatedCrash):
        Experiment(cfg, out_dir=out, plugins={"crash": CrashAt(15)}).run()
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names[-1] == "ckpt-001-000000012.pt"  # inside experience 1, in the middle of an epoch
    state = ckpt.load(out / "checkpoints" / names[-1])
    assert state["position"]["inside_experience"] and 0 < state["position"]["batch"]

    Experiment.resume(out).run()
    expected = comparable(reference)
    expected["config"]["checkpoint"] = {"enabled": True, "every_n_steps": 4, "keep_last": 50}
    assert comparable(out) == expected


def test_a_resumed_run_s_timings_count_the_time_before_the_crash(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, [*TINY, "checkpoint.every_n_steps=4"]), out_dir=out, plugins={"crash": CrashAt(15)}).run()
    newest = ckpt.list_checkpoints(out / ckpt.DIRNAME)[-1]
    state = ckpt.load(newest)
    assert state["position"]["inside_experience"]
    metrics = state["metrics"]  # as if the session before the crash had taken hours: no clock can make this flaky
    metrics["elapsed"] += 30000.0
    metrics["timings"] = {k: v + 10000.0 for k, v in metrics["timings"].items()}
    torch.save(state, newest)
    timings = Experiment.resume(out).run().timings
    assert timings["total_seconds"] >= metrics["elapsed"]
    assert timings["train_seconds"] >= metrics["timings"]["train_seconds"]
    assert timings["eval_seconds"] >= metrics["timings"]["eval_seconds"]
    assert timings["total_seconds"] < metrics["elapsed"] + 600  # the resumed session's own time, added once


class OwnSGD:
    """A plugin's optimizer; on resume, by mistake, the optimizer class itself."""

    def __init__(self, wrong: bool = False):
        self.wrong = wrong

    @hookimpl(tryfirst=True)
    def configure_optimizer(self, run):
        return torch.optim.SGD if self.wrong else torch.optim.SGD(run.model.parameters(), lr=0.05)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_resume_inside_an_experience_checks_the_optimizer_as_a_run_does(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [*TINY, "checkpoint.every_n_steps=4"])
    with pytest.raises(SimulatedCrash):
        Experiment(cfg, out_dir=out, plugins={"sgd": OwnSGD(), "crash": CrashAt(15)}).run()
    with pytest.raises(TrainingError, match=r"configure_optimizer must return an optimizer .*got a type"):
        Experiment.resume(out, plugins={"sgd": OwnSGD(wrong=True)}).run()
    Experiment.resume(out, plugins={"sgd": OwnSGD()}).run()  # the checkpoint is still there


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_finishes_the_step_checkpoints_and_exits_130(tmp_path, reference, monkeypatch, capsys,
                                                                       signum):
    import contlearn._loop as loop

    train_step = loop.train_step

    def step_then_signal(run, *args):
        train_step(run, *args)
        if run.global_step == 13:
            signal.raise_signal(signum)

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    handler_before = signal.getsignal(signum)  # SIG_IGN for SIGINT when the suite runs as a background job
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"contlearn resume {out}" in err and "Traceback" not in err
    assert f"{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}: stopping after the current step" in err
    assert "interrupted after step 3 of experience 1 (epoch 0)" in err
    assert ckpt.list_checkpoints(out / "checkpoints")[-1].name == "ckpt-001-000000013.pt"
    assert signal.getsignal(signum) is handler_before

    monkeypatch.setattr(loop, "train_step", train_step)
    assert main(["resume", str(out), "--quiet"]) == 0
    assert comparable(out) == comparable(reference)
    assert_same_final_weights(out, reference)


class AddBlock:
    """Model surgery: a residual block on the features at every experience."""

    class Blocks(nn.Module):
        def __init__(self, backbone: nn.Module):
            super().__init__()
            self.inner, self.out_features = backbone, backbone.out_features
            self.blocks = nn.ModuleList()

        def forward(self, x):
            h = self.inner(x)
            for block in self.blocks:
                h = h + block(h)
            return h

    def __init__(self):
        self.n = 0

    def _graft(self, run, n: int) -> None:
        if not isinstance(run.model.backbone, self.Blocks):
            run.model.backbone = self.Blocks(run.model.backbone)
        d = run.model.out_features
        while len(run.model.backbone.blocks) < n:
            run.model.backbone.blocks.append(nn.Linear(d, d).to(run.device))

    @hookimpl
    def before_experience(self, run):
        self.n += 1
        self._graft(run, self.n)

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]

    def restore(self, run, state):
        self.load_state_dict(state)
        self._graft(run, self.n)


@pytest.mark.parametrize("grows", ["surgery", "memo"])
def test_a_teacher_taken_before_the_model_grew_resumes_exactly(tmp_path, grows):
    """LwF's teacher is rebuilt on resume from a copy of the model, which has since
    gained a block (this experience's): the copy drops it (was a shape error with
    MEMO, and a teacher with the student's new block after surgery)."""
    overrides = [*TINY, "checkpoint.every_n_steps=5", "checkpoint.keep_last=50", "plugins.lwf={}"]
    if grows == "memo":
        overrides.append("plugins.memo.memory_size=20")
    plugins = (lambda: {"blocks": AddBlock()}) if grows == "surgery" else dict
    Experiment(load_config(None, overrides), out_dir=tmp_path / "whole", plugins=plugins()).run()
    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, overrides), out_dir=out, plugins={**plugins(), "crash": CrashAt(16)}).run()
    Experiment.resume(out, plugins=plugins()).run()
    assert comparable(out) == comparable(tmp_path / "whole")
    assert_same_final_weights(out, tmp_path / "whole")


def test_plugin_surgery_is_rebuilt_through_restore(tmp_path):
    overrides = [*TINY, "checkpoint.every_n_steps=5", "checkpoint.keep_last=50"]
    whole = Experiment(load_config(None, overrides), out_dir=tmp_path / "whole", plugins={"blocks": AddBlock()}).run()
    assert whole.accuracy_matrix[0][0] > 0.3

    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, overrides), out_dir=out, plugins={"blocks": AddBlock(), "crash": CrashAt(13)}).run()
    Experiment.resume(out, plugins={"blocks": AddBlock()}).run()
    assert comparable(out) == comparable(tmp_path / "whole")
    assert_same_final_weights(out, tmp_path / "whole")

    class NoRestore(AddBlock):
        restore = None

    (out / "results.json").unlink()  # as if the run had stopped after its last checkpoint
    with (
        pytest.warns(ckpt.CheckpointWarning, match=r"this resume has 'blocks' \(.*NoRestore\)"),  # another class
        pytest.raises(CheckpointError, match=r"'backbone\.inner\.net\.1\.weight' not in the model.*restore\(run, state\)"),
    ):
        Experiment.resume(out, plugins={"blocks": NoRestore()}).run()


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path):
    class GoesBad:
        @hookimpl
        def loss_terms(self, run, out):
            bad = run.global_step >= 10  # steps done so far, a host int: no device read
            return {"boom": out.logits.sum() * 0 + (float("nan") if bad else 0.0)}

    out = tmp_path / "run"
    cfg = load_config(None, [*TINY, "checkpoint.every_n_steps=4", "checkpoint.keep_last=50"])
    # the 11th step of the run, step 1 of experience 1, goes bad; the checkpoint due after
    # 12 steps (before the epoch's end) would hold it: it is refused, the earlier ones stay
    with pytest.raises(TrainingError, match=r"non-finite loss at step 1 \(epoch 0\) of experience 1: boom went bad"):
        Experiment(cfg, out_dir=out, plugins={"bad": GoesBad()}).run()
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["ckpt-000-000000004.pt", "ckpt-000-000000008.pt", "ckpt-001-000000010.pt"]
    assert not list((out / "checkpoints").glob(".*"))
    for name in names:
        ckpt.load(out / "checkpoints" / name)


def test_request_stop_without_a_run_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = Experiment(load_config(None, TINY))

    class Stop:
        @hookimpl
        def after_step(self, run):
            if run.global_step == 2:
                experiment.request_stop()

    experiment.extra_plugins["stop"] = Stop()
    with pytest.raises(Interrupted, match="no checkpoint was written"):
        experiment.run()
    assert list(tmp_path.iterdir()) == []


def test_resuming_a_finished_run_rewrites_the_same_results(tmp_path, reference):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text((reference / "config.yaml").read_text())
    last = ckpt.list_checkpoints(reference / "checkpoints")[-1]
    assert last.name.startswith("ckpt-003-")
    (out / "checkpoints" / last.name).write_bytes(last.read_bytes())
    assert main(["resume", str(out), "--quiet"]) == 0
    assert comparable(out) == comparable(reference)
    assert_same_final_weights(out, reference)


def test_resume_with_a_different_config_names_the_difference(reference, capsys):
    assert main(["resume", str(reference), "model.hidden=[32]"]) == 2
    err = capsys.readouterr().err
    assert "different experiment: model.hidden: [16] in the checkpoint, [32] now" in err and err.count("\n") == 1


def test_library_resume_with_other_checkpoint_settings(tmp_path, reference):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text((reference / "config.yaml").read_text())
    (out / "checkpoints").mkdir()
    first = next(p for p in ckpt.list_checkpoints(reference / "checkpoints") if p.name.startswith("ckpt-001-"))
    (out / "checkpoints" / first.name).write_bytes(first.read_bytes())
    results = Experiment.resume(out, ["checkpoint.keep_last=1", "checkpoint.every_n_steps=3"]).run()
    assert results.accuracy_matrix == comparable(reference)["accuracy_matrix"]
    assert len(ckpt.list_checkpoints(out / "checkpoints")) == 1
    assert torch.load(ckpt.list_checkpoints(out / "checkpoints")[0], weights_only=True)["position"]["completed"] == 3


def test_resume_cannot_move_the_run(tmp_path):
    out = tmp_path / "run"
    Experiment(load_config(None, TINY), out_dir=out).run()
    with pytest.raises(ConfigError, match="a run resumes in its own directory .*'out' cannot be overridden"):
        Experiment.resume(out, [f"out={tmp_path / 'elsewhere'}"])


def test_a_finished_run_is_not_resumed_and_its_results_stay(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--quiet"]) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert main(["resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: '{out}' is finished: its 3 experiences are trained and its results written (if "
                           f"its report is missing: contlearn report {out})")
    assert (out / "results.json").read_text() == before
    assert main(["resume", str(out), "train.epochs=5"]) == 2
    assert "(a resume may change only device, threads and checkpoint.*)" in capsys.readouterr().err
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # an older checkpoint is resumed from: still finished
    assert main(["resume", str(out), "--quiet"]) == 2
    assert "is finished: its 3 experiences are trained" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_a_run_on_a_given_stream_resumes_on_that_stream_only(tmp_path):
    from contlearn.scenarios import build_stream

    def given(classes):
        return build_stream(load_config(None, [*TINY, "scenario.n_experiences=2", f"scenario.classes_per_experience={classes}"]).scenario, 0)

    class StopAfterTheFirstEpoch:  # only observes: `contlearn resume` could run without it
        def __init__(self, experiment):
            self.experiment = experiment

        @hookimpl
        def on_metrics(self, metrics):
            if metrics["kind"] == "epoch":
                self.experiment.request_stop()

    cfg = load_config(None, TINY)
    Experiment(cfg, out_dir=tmp_path / "whole", stream=given("[5,5]")).run()
    out = tmp_path / "run"
    experiment = Experiment(cfg, out_dir=out, stream=given("[5,5]"))
    experiment.extra_plugins["stop"] = StopAfterTheFirstEpoch(experiment)
    with pytest.raises(Interrupted, match=rf"continue with: Experiment.resume\('{out}', stream=...\) in Python, with the same stream$"):
        experiment.run()

    with pytest.raises(CheckpointError, match=r"another stream \(2 experiences in the checkpoint, 3 here\).*Experiment.resume\(run_dir, stream=...\)"):
        Experiment.resume(out).run()
    with pytest.raises(CheckpointError, match=r"experience 0: classes \[\d(, \d){4}\] in the checkpoint but \[\d(, \d){3}\] here, training samples 100 in the checkpoint but 80 here"):
        Experiment.resume(out, stream=given("[4,6]")).run()
    reordered = given("[5,5]")
    reordered.class_names = list(reversed(reordered.class_names))
    with pytest.raises(CheckpointError, match=r"the classes in order are \['\d+'(, '\d+'){9}\] in the checkpoint but"):
        Experiment.resume(out, stream=reordered).run()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt.CheckpointWarning)  # the same data: no warning
        Experiment.resume(out, stream=given("[5,5]")).run()
    assert comparable(out) == comparable(tmp_path / "whole")
    assert_same_final_weights(out, tmp_path / "whole")


def test_a_resume_without_a_training_plugin_the_run_was_given_warns(tmp_path):
    class Push:  # trains (a loss term), keeps no state
        @hookimpl
        def loss_terms(self, out):
            return {"push": 1e-3 * out.logits.pow(2).mean()}

    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, TINY), out_dir=tmp_path, plugins={"push": Push(), "crash": CrashAt(12)}).run()
    with pytest.warns(ckpt.CheckpointWarning, match=r"given these plugins in Python: 'push' \(.*Push\), 'crash' \(_crash.CrashAt\); this resume has 'push' \(.*Push\)\. A plugin that only watched may be left out"):
        Experiment.resume(tmp_path, plugins={"push": Push()}).run()


def test_a_resume_on_another_number_of_threads_warns_that_it_is_not_bitwise_the_run_s(tmp_path):
    """The CPU's sums run in an order that depends on the thread count: weights
    differed by up to 9e-5 from the uninterrupted run's after a resume on 1
    thread of a run on 2, with no word of it."""
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, [*TINY, "threads=2"]), out_dir=tmp_path, plugins={"crash": CrashAt(12)}).run()
    assert ckpt.load(ckpt.list_checkpoints(tmp_path / ckpt.DIRNAME)[-1])["threads"] == 2
    with pytest.warns(ckpt.CheckpointWarning, match=r"a run on 2 CPU threads and this resume runs on 1: .*resume "
                                                     r"with threads=2 for that\)$"):
        Experiment.resume(tmp_path, ["threads=1"], plugins={"crash": CrashAt(None)}).run()


def test_a_stopped_run_with_plugin_objects_says_to_resume_from_python(tmp_path):
    class Counter:
        def __init__(self):
            self.steps = 0

        @hookimpl
        def after_step(self, run):
            self.steps += 1
            if self.steps == 3:
                experiment.request_stop()

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    experiment = Experiment(load_config(None, TINY), out_dir=tmp_path, plugins={"counter": Counter()})
    with pytest.raises(Interrupted, match=r"continue with: Experiment.resume\('.*', plugins=\{'counter': Counter\(...\)\}\) in Python, with the same plugins \(new objects\)$"):
        experiment.run()


@pytest.mark.parametrize("storage", ["loader", "auto"])
def test_a_run_on_data_read_through_a_dataloader_checkpoints_and_resumes_exactly(tmp_path, storage):
    """Loader data hold no tensors to checksum: the checkpoint leaves their
    checksum out (storage=auto picks the loader above memory_limit_gb)."""
    from _crash import assert_resume_is_exact

    overrides = [*TINY, f"scenario.storage={storage}", "scenario.memory_limit_gb=1e-6", "scenario.num_workers=0",
                 "checkpoint.every_n_steps=4"]
    assert_resume_is_exact(None, overrides, tmp_path, crash_at=15)
    state = ckpt.load(ckpt.list_checkpoints(tmp_path / "run" / ckpt.DIRNAME)[-1])
    assert state["stream"]["data"][0] == [None, None]


def test_a_newer_unreadable_checkpoint_does_not_rotate_out_the_ones_resumed_from(tmp_path):
    out = tmp_path / "run"
    Experiment(load_config(None, TINY), out_dir=out).run()
    (out / "results.json").unlink()
    *_, before, newest = ckpt.list_checkpoints(out / ckpt.DIRNAME)
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short
    with pytest.warns(ckpt.CheckpointWarning, match=f"'{newest.name}' is truncated or corrupt.*'{before.name}'"):
        resumed = Experiment.resume(out, ["checkpoint.keep_last=1", "checkpoint.every_n_steps=2"],
                                    plugins={"crash": CrashAt(21)})
    with pytest.raises(SimulatedCrash):
        resumed.run()
    names = [p.name for p in ckpt.list_checkpoints(out / ckpt.DIRNAME)]
    assert names == ["ckpt-002-000000020.pt", newest.name]  # the newest good one kept, the cut one left alone
    with pytest.warns(ckpt.CheckpointWarning, match="truncated or corrupt"):
        again = Experiment.resume(out, ["checkpoint.keep_last=1", "checkpoint.every_n_steps=2"])
    assert again._resume_from[1]["position"]["global_step"] == 20
    again.run()
    assert [p.name for p in ckpt.list_checkpoints(out / ckpt.DIRNAME)] == [newest.name]  # rewritten, good again
    ckpt.load(out / ckpt.DIRNAME / newest.name)
