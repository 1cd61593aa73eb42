"""From a ``scenario`` config section to a stream.

The steps: load the source(s) as :class:`~contlearn.scenarios.sources.Samples`;
subsample the training set per class; store the data as tensors or behind a
DataLoader (``scenario.storage``); fit and apply the deterministic transforms;
build the experiences for the setting; attach the training augmentation; carve
validation sets.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch
from contlearn.scenarios import builders
from contlearn.scenarios.loader import LoaderData
from contlearn.scenarios.sources import Samples, Split, load_source
from contlearn.scenarios.stream import Stream, TensorData
from contlearn.scenarios.transforms import (
    Compose,
    Normalize,
    Op,
    TransformWarning,
    parse_transforms,
)
from omegaconf import DictConfig, OmegaConf

from contlearn.errors import ConfigError

#: Batch size used to fit ``normalize`` (the same for both storages, so the sums match).
FIT_BATCH = 4096


def scenario_config(values: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """A full ``scenario`` section: the schema defaults under ``values``."""
    from contlearn._config_merge import merge_checked
    from contlearn.config import ScenarioConfig

    return merge_checked(ScenarioConfig, dict(values or {}), where="scenario.")


def check_scenario(cfg: Any) -> None:
    """:raises ConfigError: a scenario section whose values do not fit together or are out of range."""
    if cfg.setting not in ("class", "task", "domain"):
        raise ConfigError(f"'scenario.setting' must be one of 'class', 'domain', 'task', got {cfg.setting!r}")
    if cfg.storage not in ("auto", "tensor", "loader"):
        raise ConfigError(f"'scenario.storage' must be one of 'auto', 'loader', 'tensor', got {cfg.storage!r}")
    if cfg.transform not in ("none", "permute", "rotate"):
        raise ConfigError(f"'scenario.transform' must be one of 'none', 'permute', 'rotate', got {cfg.transform!r}")
    if cfg.n_experiences < 1:
        raise ConfigError(f"'scenario.n_experiences' must be at least 1, got {cfg.n_experiences}")
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"'scenario.test_fraction' must be in (0, 1), got {cfg.test_fraction}")
    if not 0 <= cfg.validation_fraction < 1:
        raise ConfigError(f"'scenario.validation_fraction' must be in [0, 1), got {cfg.validation_fraction}")
    if cfg.samples_per_class is not None and cfg.samples_per_class < 1:
        raise ConfigError(f"'scenario.samples_per_class' must be at least 1, got {cfg.samples_per_class}")
    if cfg.num_workers < 0:
        raise ConfigError(f"'scenario.num_workers' must be >= 0, got {cfg.num_workers}")
    if cfg.memory_limit_gb <= 0:
        raise ConfigError(f"'scenario.memory_limit_gb' must be positive, got {cfg.memory_limit_gb}")
    if cfg.setting != "domain":
        if cfg.transform != "none" or cfg.domains is not None or cfg.rotations is not None:
            raise ConfigError(
                f"scenario.transform, scenario.rotations and scenario.domains make domain-incremental streams; "
                f"set scenario.setting=domain (it is '{cfg.setting}')"
            )
        return
    if cfg.class_order is not None or cfg.classes_per_experience is not None:
        raise ConfigError("scenario.class_order and classes_per_experience do not apply to setting=domain "
                          "(every experience has all classes)")
    if (cfg.transform == "none") == (cfg.domains is None):
        given = "neither is set" if cfg.domains is None else f"both are set (transform={cfg.transform})"
        raise ConfigError(
            "scenario.setting=domain needs one of scenario.transform=permute|rotate (one data set, shifted) "
            f"and scenario.domains=[SOURCE, ...] (one data set per experience); {given}"
        )
    if cfg.rotations is not None and (cfg.transform != "rotate" or not len(cfg.rotations)):
        raise ConfigError("scenario.rotations needs scenario.transform=rotate and at least one angle")


def _transforms(cfg: Any) -> tuple[list[Op], list[Op], Any]:
    train_ops, augment = parse_transforms(list(cfg.train_transform), "scenario.train_transform")
    eval_ops, eval_augment = parse_transforms(list(cfg.eval_transform), "scenario.eval_transform")
    if eval_augment is not None:
        raise ConfigError("scenario.eval_transform must be deterministic; random transforms "
                          "(random_crop, hflip) belong in scenario.train_transform")
    normalized = [any(isinstance(op, Normalize) for op in ops) for ops in (train_ops, eval_ops)]
    if normalized[0] != normalized[1]:
        warnings.warn(
            f"scenario.train_transform {list(cfg.train_transform)} and eval_transform {list(cfg.eval_transform)}: "
            f"only the {'training' if normalized[0] else 'test'} inputs are normalized, so the model is evaluated "
            f"on inputs of another scale than it trained on; list normalize in both",
            TransformWarning,
            stacklevel=2,
        )
    return train_ops, eval_ops, augment


def _subsample(split: Split, cfg: Any, seed: int) -> Split:
    if cfg.samples_per_class is None:
        return split
    index = builders.subsample_per_class(split.y_train, cfg.samples_per_class, seed)
    return Split(split.train.subset(index), split.test, split.name, split.class_names)


def choose_storage(cfg: Any, splits: list[Split], ops: list[Op], copies: int) -> str:
    """``tensor`` or ``loader``: ``scenario.storage``, or for ``auto`` whether
    the float32 inputs, transformed, fit in ``scenario.memory_limit_gb``."""
    if cfg.storage != "auto":
        return cfg.storage
    total = 0
    for split in splits:
        shape = Compose(ops).out_shape(split.input_shape)
        total += (len(split.train) + len(split.test)) * math.prod(shape) * 4 * copies
    return "tensor" if total <= cfg.memory_limit_gb * 2**30 else "loader"


def store(split: Split, storage: str, num_workers: int = 0) -> Split:
    """The split's Samples as TensorData (``tensor``) or LoaderData (``loader``,
    with at most as many workers as there are CPUs)."""
    num_workers = min(num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    def one(samples: Any) -> Any:
        if not isinstance(samples, Samples):
            return samples
        if storage == "tensor":
            return TensorData(samples.load(num_workers), samples.targets)
        return LoaderData(samples, samples.targets, num_workers=num_workers)

    return Split(one(split.train), one(split.test), split.name, split.class_names)


def fit_ops(ops: list[Op], data: Any) -> None:
    """Fit the unfitted ``normalize`` ops on ``data`` (the training set) seen
    through the ops before them."""
    for k, op in enumerate(ops):
        if isinstance(op, Normalize) and not op.fitted:
            seen = data.map(Compose(ops[:k])) if k else data
            op.fit(b.x for b in seen.batches(FIT_BATCH))


def _apply(data: Any, ops: list[Op]) -> Any:
    return data.map(Compose(ops)) if ops else data


def _prepared(split: Split, cfg: Any, storage: str) -> tuple[Split, list[Op], list[Op], Any]:
    """Stored split with its own (fitted) transforms."""
    train_ops, eval_ops, augment = _transforms(cfg)
    split = store(split, storage, cfg.num_workers)
    fit_ops(train_ops, split.train)
    fit_ops(eval_ops, split.train)
    return split, train_ops, eval_ops, augment


def build_from_split(split: Split, cfg: Any, seed: int, extra: list[Split] | None = None) -> Stream:
    """The stream ``cfg`` (a full scenario section) describes over ``split``
    (and, for ``scenario.domains``, the ``extra`` splits after it)."""
    check_scenario(cfg)
    splits = [_subsample(s, cfg, seed) for s in [split, *(extra or [])]]
    train_ops, _, _ = _transforms(cfg)
    shifted = cfg.setting == "domain" and cfg.transform != "none"
    n_shifted = cfg.n_experiences if cfg.rotations is None else len(cfg.rotations)  # rotations: one experience each
    storage = choose_storage(cfg, splits, train_ops, n_shifted if shifted else 1)

    if cfg.setting in ("class", "task"):
        base, train_ops, eval_ops, augment = _prepared(splits[0], cfg, storage)
        base = Split(_apply(base.train, train_ops), _apply(base.test, eval_ops), base.name, base.class_names)
        stream = builders.class_incremental(
            base, cfg.n_experiences, cfg.class_order, cfg.classes_per_experience, seed,
            task_labels=cfg.setting == "task",
        )
    elif shifted:
        base, train_ops, eval_ops, augment = _prepared(splits[0], cfg, storage)
        if cfg.transform == "permute":
            # the transforms first: a permutation moves features, and their statistics must move with them
            base = Split(_apply(base.train, train_ops), _apply(base.test, eval_ops), base.name, base.class_names)
            stream = builders.permuted(base, cfg.n_experiences, seed, cfg.identity_first)
        else:
            angles = None if cfg.rotations is None else [float(a) for a in cfg.rotations]
            stream = builders.rotated(base, n_shifted, angles)
            for exp in stream:  # after the rotation, which fills the corners with the raw images' 0
                exp.train, exp.test = _apply(exp.train, train_ops), _apply(exp.test, eval_ops)
        if train_ops:
            stream.input_shape = tuple(stream[0].train.input_shape)
    else:
        # one set of transforms, fitted on the first domain's training data: a model
        # does not know which domain a test sample comes from
        first, train_ops, eval_ops, augment = _prepared(splits[0], cfg, storage)
        prepared = [first, *(store(s, storage, cfg.num_workers) for s in splits[1:])]
        prepared = [Split(_apply(s.train, train_ops), _apply(s.test, eval_ops), s.name, s.class_names) for s in prepared]
        stream = builders.one_dataset_per_experience(prepared)

    return _finish(stream, cfg, seed, augment)


def _finish(stream: Stream, cfg: Any, seed: int, augment: Any) -> Stream:
    """Check the test inputs' shape, carve validation sets and attach the training augmentation."""
    _check_eval_shape(stream, cfg)
    for exp in stream:
        if cfg.validation_fraction > 0:
            keep, val = builders.carve_validation(exp.train.y, cfg.validation_fraction, seed + exp.index)
            exp.val = exp.train.subset(val)
            exp.train = exp.train.subset(keep)
        if augment is not None:
            exp.train = exp.train.with_augment(augment)
    return stream


def _check_eval_shape(stream: Stream, cfg: Any) -> None:
    """:raises ConfigError: when ``eval_transform`` makes test inputs of another
    shape than ``train_transform`` makes training inputs (the model could not
    take both)."""
    for exp in stream:
        train, test = tuple(exp.train.input_shape), tuple(exp.test.input_shape)
        if len(exp.train) and len(exp.test) and train != test:
            raise ConfigError(
                f"scenario.train_transform {list(cfg.train_transform)} makes training inputs of shape {train} but "
                f"scenario.eval_transform {list(cfg.eval_transform)} makes test inputs of shape {test}: list the "
                f"deterministic transforms (resize, center_crop, rgb, grayscale, normalize) in both"
            )


def build_stream(scenario: Any, seed: int) -> Stream:
    """The stream a ``scenario`` config section describes."""
    if not isinstance(scenario, DictConfig):
        if not isinstance(scenario, Mapping):  # a ScenarioConfig: a structured config's container is a dict
            scenario = cast("dict[str, Any]", OmegaConf.to_container(OmegaConf.structured(scenario)))
        scenario = scenario_config(scenario)
    if scenario.source == "avalanche":
        return _build_avalanche(scenario, seed)
    check_scenario(scenario)
    if scenario.setting == "domain" and scenario.domains is not None:
        if not len(scenario.domains):
            raise ConfigError("scenario.domains must list at least one source")
        splits = [load_source(str(name), scenario, seed) for name in scenario.domains]
        return build_from_split(splits[0], scenario, seed, splits[1:])
    return build_from_split(load_source(str(scenario.source), scenario, seed), scenario, seed)


def _build_avalanche(cfg: Any, seed: int) -> Stream:
    """The stream of the Avalanche benchmark ``scenario.factory`` makes, then
    what contlearn adds to any stream: ``samples_per_class`` (per class of each
    experience), the transforms (``normalize`` fitted on all training data) and the
    augmentation, validation sets. The keys that shape experiences are refused."""
    from contlearn.config import check_avalanche_keys

    check_avalanche_keys(cfg)
    check_scenario(cfg)
    from contlearn.interop.avalanche import stream_from_config

    stream = stream_from_config(cfg, seed)
    if cfg.samples_per_class is not None:
        for exp in stream:
            exp.train = exp.train.subset(builders.subsample_per_class(exp.train.y, cfg.samples_per_class, seed + exp.index))
    train_ops, eval_ops, augment = _transforms(cfg)
    if train_ops or eval_ops:
        whole = TensorData(torch.cat([exp.train.x for exp in stream]), torch.cat([exp.train.y for exp in stream]))
        fit_ops(train_ops, whole)
        fit_ops(eval_ops, whole)
        for exp in stream:
            exp.train, exp.test = _apply(exp.train, train_ops), _apply(exp.test, eval_ops)
        stream.input_shape = tuple(stream[0].train.input_shape)
    return _finish(stream, cfg, seed, augment)
