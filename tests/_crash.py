"""Helpers for crash-and-resume tests: a plugin that kills a run at a given step."""

from __future__ import annotations

import json
from pathlib import Path

from contlearn import hookimpl


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
