"""Shared fixtures: tiny configs that keep end-to-end runs to a fraction of a second."""

from __future__ import annotations

import pytest

#: Overrides that make a split-digits run quick: one epoch, no FWT baseline.
QUICK = ["train.epochs=1", "eval.fwt=false"]


@pytest.fixture
def quick() -> list[str]:
    return list(QUICK)
