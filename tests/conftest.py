"""Shared fixtures: tiny configs that keep end-to-end runs to a fraction of a second."""

from __future__ import annotations

import sys

import pytest

#: Overrides that make a split-digits run quick: one epoch, no FWT baseline.
QUICK = ["train.epochs=1", "eval.fwt=false"]


@pytest.fixture
def quick() -> list[str]:
    return list(QUICK)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run faster on one thread, and the suite shares a 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _plugin_problems_unreported(monkeypatch):
    """Each test starts as a fresh process would: a broken entry point is
    reported once per process, and each test installs its own."""
    from contlearn import _registry

    monkeypatch.setattr(_registry, "_REPORTED", set())


ANCHOR_FILE = '''
from dataclasses import dataclass

from contlearn import hookimpl
from {stem}_helpers import squared


class Anchor:
    """Keeps the logits small (a test plugin)."""

    @dataclass
    class Config:
        weight: float = 0.1

    def __init__(self, config):
        self.config = config

    @hookimpl
    def loss_terms(self, batch, out):
        return {{"anchor": self.config.weight * squared(out.logits)}}


NOT_A_CLASS = 3
'''


@pytest.fixture
def plugin_file(tmp_path, monkeypatch):
    """A plugin class in a file of one's own, which imports a neighbour; the
    modules and ``sys.path`` entries the import adds are taken back after."""
    stem = f"cl_anchor_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{stem}_helpers.py").write_text("def squared(x):\n    return x.pow(2).mean()\n")
    (tmp_path / f"{stem}.py").write_text(ANCHOR_FILE.format(stem=stem))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path / f"{stem}.py"
    for name in (stem, f"{stem}_helpers"):
        sys.modules.pop(name, None)
