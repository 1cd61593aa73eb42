"""Finished runs grouped by experiment, for the report's mean ± std over seeds.

Two runs are one experiment when their configs are the same but for the seed
and what does not change what is learnt (:data:`NOT_THE_EXPERIMENT`), and they
were given the same things in Python (plugin objects, a stream). Continual-
learning papers report each method as the mean and the sample standard
deviation (n - 1) over seeds; the report does the same for every group.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from contlearn.config import flatten

if TYPE_CHECKING:
    from contlearn.report import FinishedRun

#: Top-level config keys that do not make another experiment: its seed, its name,
#: and where and how fast it ran.
NOT_THE_EXPERIMENT = ("seed", "name", "out", "device", "threads", "checkpoint")
#: Keys of sections that say how the data were loaded or how fast the run went,
#: not what it learnt.
HOW_IT_RAN = {
    "scenario": ("root", "download", "storage", "memory_limit_gb", "num_workers"),
    "train": ("eval_batch_size", "compile", "compile_mode", "channels_last"),
}


def _what_it_learnt(config: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in config.items() if k not in NOT_THE_EXPERIMENT}
    for section, keys in HOW_IT_RAN.items():
        if isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k not in keys}
    if isinstance(kept.get("plugins"), dict):  # finetune adds nothing: with or without it, one experiment
        kept["plugins"] = {k: v for k, v in kept["plugins"].items() if k != "finetune"}
    return kept


def experiment_key(results: dict[str, Any]) -> str | None:
    """What makes a run's experiment, as text (``None``: a results file without
    its config, which is an experiment of its own)."""
    config = results.get("config")
    if not isinstance(config, dict):
        return None
    return json.dumps([_what_it_learnt(config), results.get("given")], default=str)


def scenario_key(results: dict[str, Any]) -> str | None:
    """What a run was trained and tested on, as text (``None``: not recorded)."""
    config = results.get("config")
    stream = (results.get("given") or {}).get("stream")
    if not isinstance(config, dict) and stream is None:
        return None
    scenario = _what_it_learnt({"scenario": (config or {}).get("scenario")})["scenario"]
    return json.dumps([scenario, stream], sort_keys=True, default=str)


def group_by_experiment(runs: Sequence[FinishedRun]) -> list[list[FinishedRun]]:
    """The runs in groups of one experiment each, in the order each group's first run is given."""
    groups: dict[Any, list[FinishedRun]] = {}
    for k, run in enumerate(runs):
        key = experiment_key(run.results)
        groups.setdefault(key if key is not None else k, []).append(run)
    return list(groups.values())


def group_labels(groups: Sequence[Sequence[FinishedRun]]) -> list[str]:
    """Each group's strategy, with the settings that tell apart groups of the
    same strategy (``replay (train.lr=0.1)``), at most three of them."""
    strategies = [group[0].strategy for group in groups]
    flat = [flatten(_what_it_learnt(group[0].results.get("config") or {})) for group in groups]
    labels = []
    for k, strategy in enumerate(strategies):
        same = [j for j, s in enumerate(strategies) if s == strategy]
        if len(same) == 1:
            labels.append(strategy)
            continue
        keys = sorted({key for j in same for key in flat[j]})
        differing = [key for key in keys if len({json.dumps(flat[j].get(key), default=str) for j in same}) > 1]
        settings = ", ".join(f"{key}={flat[k][key]}" if key in flat[k] else f"without {key}" for key in differing[:3])
        labels.append(f"{strategy} ({settings})" if settings else f"{strategy} (#{same.index(k) + 1})")
    return labels


def repeated_seeds(group: Sequence[FinishedRun]) -> list[Any]:
    """The seeds that more than one run of an experiment has (a copied or rerun
    directory): the same run counted twice in its mean ± std."""
    seeds = [run.results.get("seed") for run in group]
    return sorted({seed for seed in seeds if seeds.count(seed) > 1}, key=str)


def mean_std(values: Sequence[float | None], signed: bool = False) -> str:
    """``mean ± sample std`` to three decimals (the mean with its sign, when
    ``signed``); one value alone; ``n/a`` when any is missing."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return "n/a"
    numbers = [float(v) for v in values if v is not None]
    mean = f"{statistics.mean(numbers):+.3f}" if signed else f"{statistics.mean(numbers):.3f}"
    return mean if len(numbers) == 1 else f"{mean} ± {statistics.stdev(numbers):.3f}"
