"""Scenarios: streams of experiences, the builders that make them, and data sources.

See docs/scenarios.md. ``build_stream(scenario_cfg, seed)`` is what an
experiment calls; ``Stream.from_tensors(x, y, ...)`` makes a stream from
in-memory data; ``SOURCES`` maps ``scenario.source`` names to loaders (add an
entry to make a data set of your own available to configs).
"""

from __future__ import annotations

from contlearn.scenarios import sources
from contlearn.scenarios.build import build_from_split, build_stream, scenario_config
from contlearn.scenarios.builders import (
    class_incremental,
    domain_incremental,
    one_dataset_per_experience,
    permuted,
    rotated,
)
from contlearn.scenarios.loader import LoaderData
from contlearn.scenarios.sources import SOURCES, Split
from contlearn.scenarios.stream import Batch, Experience, Stream, TensorData

__all__ = [
    "SOURCES",
    "Batch",
    "Experience",
    "LoaderData",
    "Split",
    "Stream",
    "TensorData",
    "build_from_split",
    "build_stream",
    "class_incremental",
    "domain_incremental",
    "one_dataset_per_experience",
    "permuted",
    "rotated",
    "scenario_config",
    "sources",
]
