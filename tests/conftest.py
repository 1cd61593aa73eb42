"""Shared fixtures: tiny configs that keep end-to-end runs to a fraction of a second."""

from __future__ import annotations

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
