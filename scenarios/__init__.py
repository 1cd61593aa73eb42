"""Scenarios: streams of experiences, the builders that make them, and data sources."""

from __future__ import annotations

from typing import Any

from contlearn.scenarios import sources
from contlearn.scenarios.builders import class_incremental
from contlearn.scenarios.stream import Batch, Experience, Stream, TensorData

from contlearn.errors import ConfigError, choices

__all__ = ["Batch", "Experience", "Stream", "TensorData", "build_stream", "class_incremental", "SOURCES"]

#: Data sources by name: ``scenario.source`` -> loader(scenario_cfg, seed) -> Split.
SOURCES: dict[str, Any] = {
    "digits": lambda cfg, seed: sources.digits(cfg.test_fraction, seed),
}


def build_stream(scenario: Any, seed: int) -> Stream:
    """The stream a ``scenario`` config section describes."""
    if scenario.source not in SOURCES:
        raise ConfigError(f"unknown scenario.source '{scenario.source}'; valid sources: {choices(SOURCES)}")
    split = SOURCES[scenario.source](scenario, seed)
    if scenario.setting in ("class", "task"):
        return class_incremental(
            split,
            scenario.n_experiences,
            scenario.class_order,
            scenario.classes_per_experience,
            seed,
            task_labels=scenario.setting == "task",
        )
    raise ConfigError(f"scenario.setting '{scenario.setting}' is not available yet; valid: 'class', 'task'")
