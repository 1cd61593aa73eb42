"""Avalanche benchmarks named by a config: ``scenario.source: avalanche`` with a
``factory`` and its ``args`` (see docs/avalanche.md, "In a config")."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from contlearn.errors import ConfigError, ContlearnError, DataError, choices, one_line
from contlearn.interop._avalanche_stream import require_avalanche, stream_from_avalanche
from contlearn.scenarios import Stream


def tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> Any:
    """Tensors as an Avalanche classification dataset."""
    require_avalanche()
    from avalanche.benchmarks.utils import as_classification_dataset
    from torch.utils.data import TensorDataset

    data = TensorDataset(x, y)
    data.targets = y.tolist()  # type: ignore[attr-defined]
    return as_classification_dataset(data)


def _generator(name: str) -> Callable[..., Any]:
    return getattr(importlib.import_module("avalanche.benchmarks"), name)


#: Short names for ``scenario.factory``: Avalanche generators applied to the train
#: and test sets of a contlearn data source (``args.dataset``, default ``digits``);
#: the other args go to the generator. Each entry: (takes a dict of datasets,
#: the args that fix the class order, so that no seed is passed with them).
ALIASES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "nc_benchmark": (False, ("fixed_class_order",)),
    "ni_benchmark": (False, ()),
    "class_incremental_benchmark": (True, ("class_order",)),
    "new_instances_benchmark": (False, ()),
}


def split_tensors(split: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of a contlearn data source's split."""
    if hasattr(split, "x_train"):
        return split.x_train, split.y_train, split.x_test, split.y_test
    out = []
    for part in (split.train, split.test):
        x = part.load() if hasattr(part, "load") else part.x
        y = part.targets if hasattr(part, "targets") else part.y
        out += [x, torch.as_tensor(y).long()]
    return out[0], out[1], out[2], out[3]


def _load_source(name: str, scenario_cfg: Any, seed: int) -> Any:
    from contlearn.scenarios import sources

    if hasattr(sources, "load_source"):
        return sources.load_source(name, scenario_cfg, seed)
    from contlearn.scenarios import SOURCES

    if name not in SOURCES:
        raise ConfigError(f"unknown data source '{name}'; valid sources: {choices(SOURCES)}")
    return SOURCES[name](scenario_cfg, seed)


def _source_config(scenario_cfg: Any) -> Any:
    """The section as a full ``scenario`` config (schema defaults for the keys it
    lacks), which contlearn's data sources read."""
    from omegaconf import OmegaConf

    from contlearn.config import ScenarioConfig

    known = {f.name for f in dataclasses.fields(ScenarioConfig)}
    values = _plain(scenario_cfg)
    if not isinstance(values, dict):
        if dataclasses.is_dataclass(values) and not isinstance(values, type):  # an instance, not the class
            values = dataclasses.asdict(values)
        else:
            values = vars(values)
    return OmegaConf.merge(
        OmegaConf.structured(ScenarioConfig), {k: v for k, v in values.items() if k in known}
    )


def _alias_benchmark(factory: str, scenario_cfg: Any, seed: int, args: dict[str, Any]) -> tuple[Any, Any]:
    """The benchmark an alias makes, and the class names of its data source."""
    as_dict, fixed = ALIASES[factory]
    generator = _generator(factory)
    source = str(args.pop("dataset", "digits"))
    if _wants_seed(generator, args, fixed):
        args["seed"] = seed
    split = _load_source(source, _source_config(scenario_cfg), seed)
    x_train, y_train, x_test, y_test = split_tensors(split)
    train, test = tensor_dataset(x_train, y_train), tensor_dataset(x_test, y_test)
    benchmark = generator({"train": train, "test": test}, **args) if as_dict else generator(train, test, **args)
    return benchmark, getattr(split, "class_names", None)


def _resolve_factory(factory: str) -> Callable[..., Any]:
    module_name, _, attr = factory.rpartition(".")
    if not module_name:
        raise ConfigError(
            f"unknown scenario.factory '{factory}'; use a short name ({choices(ALIASES)}) "
            f"or a dotted name such as 'avalanche.benchmarks.classic.SplitMNIST'"
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"scenario.factory '{factory}' cannot be imported: {exc}") from None


def _wants_seed(fn: Callable[..., Any], args: Mapping[str, Any], fixed_order_keys: Iterable[str]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in params and "seed" not in args and not any(args.get(k) is not None for k in fixed_order_keys)


def stream_from_config(scenario_cfg: Any, seed: int) -> Stream:
    """The stream of an Avalanche benchmark that a config section names.

    :param scenario_cfg: a section with ``factory`` (a short name in
        :data:`ALIASES`, or the dotted name of any callable that returns an
        Avalanche benchmark, e.g. ``avalanche.benchmarks.classic.SplitMNIST``) and
        ``args`` (its keyword arguments). A short name builds the benchmark from a
        contlearn data source: ``args.dataset`` (default ``digits``, split with the
        section's ``test_fraction``).
    :param seed: the experiment's seed, passed as ``seed`` to a factory that takes
        one when ``args`` sets neither a seed nor a fixed class order.
    :return: ``stream_from_avalanche(benchmark)``: the setting is detected, labels
        are renumbered in class order when needed, eval transforms are applied.
    :raises ConfigError: an unknown factory or arguments it rejects.
    """
    require_avalanche()
    factory = _get(scenario_cfg, "factory")
    if not factory:
        raise ConfigError(
            f"scenario.source=avalanche needs scenario.factory: a short name ({choices(ALIASES)}) "
            f"or the dotted name of a benchmark factory"
        )
    raw_args = _get(scenario_cfg, "args") or {}
    args = _plain(raw_args)
    if not isinstance(args, dict):
        raise ConfigError(f"scenario.args must be a mapping of keyword arguments, got {raw_args!r}")
    factory, given = str(factory), dict(args)  # given: for messages, without the seed added below
    if factory in ALIASES:
        call = lambda: _alias_benchmark(factory, scenario_cfg, seed, args)  # noqa: E731
    else:
        fn = _resolve_factory(factory)
        if _wants_seed(fn, args, ("fixed_class_order", "class_order")):
            args["seed"] = seed
        call = lambda: (fn(**args), None)  # noqa: E731
    try:
        benchmark, class_names = call()
    except ContlearnError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"scenario.factory '{factory}' rejected scenario.args {given}: {exc}") from None
    except (RuntimeError, OSError) as exc:  # a download that failed, a missing dataset_root
        raise DataError(
            f"scenario.factory '{factory}' could not load its data ({one_line(exc)}); put the data under the "
            f"benchmark's dataset_root (scenario.args.dataset_root) or connect once to download it"
        ) from None
    empty = [k for k, exp in enumerate(getattr(benchmark, "train_stream", ())) if len(exp.dataset) == 0]
    if empty:
        raise ConfigError(
            f"scenario.factory '{factory}' with scenario.args {given} makes train experience {empty[0]} without "
            f"samples (more experiences than classes?)"
        )
    return stream_from_avalanche(benchmark, name=factory, class_names=class_names)


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(value) if isinstance(value, Mapping) else value
