"""contlearn: a plugin-based continual-learning framework.

A stream of experiences drives the training loop; strategies are pluggy
plugins that hook into it. ``from contlearn import Experiment, hookimpl,
load_config`` is all a user needs to run an experiment or write a strategy.
"""

from __future__ import annotations

__version__ = "0.1.0"

from contlearn.config import load_config
from contlearn.errors import ConfigError, ContlearnError, DataError, PluginError, TrainingError
from contlearn.experiment import Experiment
from contlearn.hookspecs import hookimpl, hookspec
from contlearn.results import Results
from contlearn.run import Run, StashKey

__all__ = [
    "ConfigError",
    "ContlearnError",
    "DataError",
    "Experiment",
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
