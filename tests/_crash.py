"""Helpers for crash-and-resume tests: their small workload and a plugin that kills a run at a given step."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from contlearn import hookimpl

#: The crash-and-resume tests' workload: three experiences (4, 3 and 3 classes) of
#: 20 samples per class, a 16-unit MLP, two epochs of batches of 16 (a few steps
#: per epoch, so a crash can fall inside an experience), on the CPU, where
#: resuming is exact.
SMALL_RUN = [
    "device=cpu",
    "scenario.n_experiences=3",
    "scenario.classes_per_experience=[4,3,3]",
    "scenario.samples_per_class=20",
    "model.hidden=[16]",
    "train.epochs=2",
    "train.batch_size=16",
]


class SimulatedCrash(BaseException):
    """Stands for the process dying: nothing of the run's memory survives it
    (a BaseException, so no ``except Exception`` in the loop catches it)."""


class CrashAt:
    """Raises :class:`SimulatedCrash` right after training step ``global_step``."""

    def __init__(self, global_step: int):
        self.global_step = global_step

    @hookimpl
    def after_step(self, run):
        if run.global_step == self.global_step:
            raise SimulatedCrash


def comparable(run_dir: Path) -> dict:
    """``results.json`` without what may differ between two sessions."""
    data = json.loads((Path(run_dir) / "results.json").read_text())
    del data["timings"], data["versions"]
    return data


def assert_resume_is_exact(config: str, overrides: list[str], tmp_path: Path, crash_at: int) -> None:
    """A run of ``config`` killed after global step ``crash_at``, inside an
    experience, and resumed from its newest checkpoint ends as the run that was
    never killed (``results.json`` alike)."""
    from contlearn import Experiment, load_config

    Experiment(load_config(config, overrides), out_dir=tmp_path / "whole").run()
    try:
        Experiment(load_config(config, overrides), out_dir=tmp_path / "run", plugins={"crash": CrashAt(crash_at)}).run()
    except SimulatedCrash:
        pass
    else:
        raise AssertionError(f"the run ended before step {crash_at}")
    resumed = Experiment.resume(tmp_path / "run")
    assert resumed._resume_from[1]["position"]["inside_experience"], "the checkpoint is not inside an experience"
    resumed.run()
    assert comparable(tmp_path / "run") == comparable(tmp_path / "whole")
    assert_same_final_weights(tmp_path / "run", tmp_path / "whole")


def assert_same_final_weights(run_dir: Path, other_dir: Path) -> None:
    """The models of the two runs' newest checkpoints are bitwise equal (results
    alone can hide a difference that moves no test prediction)."""
    from contlearn import checkpoint

    _, ours = checkpoint.latest(Path(run_dir) / "checkpoints")
    _, theirs = checkpoint.latest(Path(other_dir) / "checkpoints")
    assert ours["model"].keys() == theirs["model"].keys()
    different = [k for k, v in ours["model"].items() if not torch.equal(v, theirs["model"][k])]
    assert not different, f"the resumed run's final weights differ: {different[:5]}"
