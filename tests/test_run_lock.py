"""One process at a time in a run directory (contlearn._run_lock): a second run,
resume or unlearning is refused with the first one's process, and a crashed
process leaves nothing that blocks its resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from _crash import SMALL_RUN, CrashAt, SimulatedCrash

from contlearn import Experiment, hookimpl, load_config
from contlearn import checkpoint as ckpt
from contlearn._run_lock import LOCK_NAME, hold
from contlearn.cli import main
from contlearn.errors import ConfigError, ContlearnError

pytest.importorskip("fcntl")

HOLD_AND_WAIT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from contlearn._run_lock import hold
    lock = hold(Path(sys.argv[1]), "a run")
    print("held", flush=True)
    sys.stdin.readline()  # until the test lets go
    """
)


@pytest.fixture
def held_elsewhere(tmp_path):
    """A run directory whose lock another process holds, as a live run does."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def start(path=run_dir):
        proc = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        return proc

    procs = []
    yield run_dir, lambda path=run_dir: procs.append(start(path)) or procs[-1]
    for proc in procs:
        proc.communicate("\n", timeout=30)


def test_a_second_run_in_a_live_run_s_directory_is_refused_and_writes_nothing(held_elsewhere, capsys):
    """Two runs with one --out were both accepted until the first checkpoint: each
    rotated the other's checkpoints away, and one's results replaced the other's."""
    run_dir, start = held_elsewhere
    holder = start()
    assert main(["run", *SMALL_RUN, "--out", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: '{run_dir}' is in use by process {holder.pid} (a run, since {err.split('since ')[1]}")
    assert err.endswith("): wait until it ends (or stop it) before starting another run, resume or unlearning there\n")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]


def test_a_resume_or_an_unlearning_of_a_live_run_is_refused(tmp_path, held_elsewhere, capsys):
    run_dir = tmp_path / "done"
    assert main(["run", *SMALL_RUN, "--out", str(run_dir), "--quiet"]) == 0
    (run_dir / "results.json").unlink()
    newest = ckpt.list_checkpoints(run_dir / ckpt.DIRNAME)[-1]
    newest.unlink()  # unfinished: a resume would go on
    capsys.readouterr()
    _, start = held_elsewhere
    holder = start(run_dir)
    before = sorted(p.name for p in (run_dir / ckpt.DIRNAME).iterdir())
    assert main(["resume", str(run_dir), "--quiet"]) == 2
    assert f"is in use by process {holder.pid} (a run" in capsys.readouterr().err
    assert main(["unlearn", str(run_dir), "--classes", "3"]) == 2
    assert f"is in use by process {holder.pid} (a run" in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / ckpt.DIRNAME).iterdir()) == before
    assert not list(run_dir.glob("unlearn-*"))


def test_only_process_0_checks_the_lock_of_a_run_it_resumes(tmp_path, held_elsewhere, monkeypatch):
    """Under torchrun every process checked the lock by taking it for a moment, so
    two of them at once could refuse each other; process 0 alone holds it."""
    run_dir = tmp_path / "done"
    assert main(["run", *SMALL_RUN, "--out", str(run_dir), "--quiet"]) == 0
    (run_dir / "results.json").unlink()
    ckpt.list_checkpoints(run_dir / ckpt.DIRNAME)[-1].unlink()
    held_elsewhere[1](run_dir)  # as process 0 of the resume holds it
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    Experiment.resume(run_dir)  # not refused: process 1 does not check
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="is in use by process"):
        Experiment.resume(run_dir)


def test_a_crashed_run_resumes_and_the_lock_is_let_go_after_each_session(tmp_path):
    with pytest.raises(SimulatedCrash):
        Experiment(load_config(None, SMALL_RUN), out_dir=tmp_path, plugins={"crash": CrashAt(12)}).run()
    hold(tmp_path, "a check").release()  # free again after the crash
    seen = []

    class Watch:
        @hookimpl
        def after_step(self, run):
            if not seen:
                with pytest.raises(ConfigError, match=r"in use by process \d+ \(a resume, since "):
                    hold(tmp_path, "a check")  # the resume holds it while it trains
                seen.append(True)

    Experiment.resume(tmp_path, plugins={"crash": CrashAt(None), "watch": Watch()}).run()
    assert seen
    hold(tmp_path, "a check").release()


def test_a_run_whose_build_fails_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ContlearnError, match="does not exist"):  # found while the run is built, lock held
        Experiment(load_config(None, [*SMALL_RUN, "scenario.source=npz", f"scenario.path={tmp_path / 'no.npz'}"]),
                   out_dir=out).run()
    assert not out.exists()


def test_an_experiment_built_before_it_runs_keeps_its_own_lock(tmp_path):
    experiment = Experiment(load_config(None, SMALL_RUN), out_dir=tmp_path)
    experiment.build()  # run() builds again, in the directory this experiment holds
    experiment.run()
    hold(tmp_path, "a check").release()  # let go after the run
