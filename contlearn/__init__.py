"""contlearn: a plugin-based continual-learning framework.

A stream of experiences drives the training loop; strategies are pluggy
plugins that hook into it. ``from contlearn import Experiment, hookimpl,
load_config`` is all a user needs to run an experiment or write a strategy.

The names below torch are imported when first used (PEP 562), so that
``import contlearn.errors`` or ``contlearn --help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from contlearn.errors import (
    ConfigError,
    ContlearnError,
    DataError,
    MissingDependencyError,
    PluginError,
    TrainingError,
)
from contlearn.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

#: exported names that need torch, by the module that defines them
_LAZY = {
    "Experiment": "contlearn.experiment",
    "Results": "contlearn.results",
    "Run": "contlearn.run",
    "StashKey": "contlearn.run",
    "load_config": "contlearn.config",
}

if TYPE_CHECKING:
    from contlearn.config import load_config
    from contlearn.experiment import Experiment
    from contlearn.results import Results
    from contlearn.run import Run, StashKey


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'contlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ConfigError",
    "ContlearnError",
    "DataError",
    "Experiment",
    "MissingDependencyError",
    "PluginError",
    "Results",
    "Run",
    "StashKey",
    "TrainingError",
    "__version__",
    "hookimpl",
    "hookspec",
    "load_config",
]
