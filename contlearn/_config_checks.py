"""Validation of experiment configs: what the schema cannot check (ranges,
enumerations, plugin sections, settings that nothing reads) and what only a
new run's config is held to (:func:`saved_run_config`). Public through
:mod:`contlearn.config`."""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from contlearn._config_merge import first_line, is_structured, merge_checked
from contlearn.errors import ConfigError, PluginError, choices, one_line


def plugin_config(name: str, config_cls: type | None, section: Any) -> Any:
    """Validate one plugin's section and return its ``Config`` instance."""
    if section is None:
        section = {}
    if not isinstance(section, (dict, DictConfig)):
        raise ConfigError(f"plugins.{name} must be a mapping of fields, got {section!r}")
    if config_cls is None:
        if len(section):
            raise ConfigError(f"plugin '{name}' takes no config fields, got {choices(section.keys())}")
        return None
    if not is_structured(config_cls):
        raise PluginError(f"plugin '{name}': its Config must be a @dataclass (or attrs) class, got {config_cls!r:.80}")
    merged = merge_checked(config_cls, section, where=f"plugins.{name}.")
    _check_finite(merged, f"plugins.{name}.", numbers=False)  # lists in lists
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            f"plugins.{name}.{missing[0]} is required (it has no default): set it, "
            f"e.g. plugins.{name}.{missing[0]}=..."
        )
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:  # what the checks above let through
        raise ConfigError(f"wrong value in plugins.{name}: {first_line(str(exc))}") from None
    except (ValueError, TypeError, AssertionError) as exc:  # the Config's own check (__post_init__) refused a value
        raise ConfigError(f"plugins.{name}: {one_line(exc)}") from None
    except ConfigError as exc:  # the same, in contlearn's words: named, unless it names its key itself
        if type(exc) is not ConfigError or str(exc).startswith(f"plugins.{name}"):
            raise
        raise ConfigError(f"plugins.{name}: {exc}") from None


def validate(cfg: DictConfig, plugins: Any = None) -> DictConfig:
    """Check what the schema cannot: enumerations, ranges and plugin sections.

    Plugin sections are replaced by their validated values, defaults filled in;
    ``plugins``: plugin classes by name besides the installed ones.
    """
    from contlearn._registry import PluginRegistry  # a plugin may import config
    from contlearn.config import MAX_THREADS

    for section in cfg.keys():  # the plugins' sections once typed, below
        if section != "plugins":
            _check_finite(cfg._get_node(section), f"{section!s}.")
    allowed = {
        "device": None,
        "scenario.setting": ("class", "task", "domain"),
        "scenario.transform": ("none", "permute", "rotate"),
        "scenario.storage": ("auto", "tensor", "loader"),
        "model.head": ("incremental", "multi", "cosine"),
        "train.optimizer": ("sgd", "adam", "adamw"),
        "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        "train.lr_schedule": ("none", "multistep", "cosine"),
        "train.lr_schedule_unit": ("epoch", "step"),
    }
    for key, valid in allowed.items():
        value = OmegaConf.select(cfg, key)
        if valid is not None and value not in valid:
            raise ConfigError(f"'{key}' must be one of {choices(valid)}, got {value!r}")
    device = str(cfg.device)
    if not (device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", device)):
        raise ConfigError(f"'device' must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    for key in ("scenario.n_experiences", "train.epochs", "train.batch_size", "train.eval_batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {OmegaConf.select(cfg, key)}")
    if cfg.threads is not None and not 1 <= cfg.threads <= MAX_THREADS:
        raise ConfigError(f"'threads' must be from 1 to {MAX_THREADS} (or null), got {cfg.threads}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"'train.lr' must be positive, got {cfg.train.lr}")
    if not 0 <= cfg.seed < 2**32:  # what NumPy's and scikit-learn's seeding accept
        raise ConfigError(f"'seed' must be in [0, 2**32), got {cfg.seed}")
    for key in ("train.momentum", "train.weight_decay"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"'{key}' must be at least 0, got {OmegaConf.select(cfg, key)}")
    if any(width < 1 for width in cfg.model.hidden):
        raise ConfigError(f"'model.hidden' widths must be at least 1, got {list(cfg.model.hidden)}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"'checkpoint.keep_last' must be at least 1, got {cfg.checkpoint.keep_last}")
    if cfg.checkpoint.every_n_steps is not None and cfg.checkpoint.every_n_steps < 1:
        raise ConfigError(
            f"'checkpoint.every_n_steps' must be at least 1 (or null), got {cfg.checkpoint.every_n_steps}"
        )
    if cfg.scenario.image_size is not None and cfg.scenario.image_size < 1:
        raise ConfigError(f"'scenario.image_size' must be at least 1 (or null), got {cfg.scenario.image_size}")
    if cfg.model.weights is not None and not cfg.model.pretrained:
        raise ConfigError(
            f"'model.weights' ({cfg.model.weights}) chooses pretrained weights: it needs model.pretrained=true"
        )
    _check_schedule(cfg.train)
    if not _SAVED_RUN.get():
        _check_new_run(cfg)
    if not 0 < cfg.scenario.test_fraction < 1:
        raise ConfigError(f"'scenario.test_fraction' must be in (0, 1), got {cfg.scenario.test_fraction}")

    registry = PluginRegistry.load(given=plugins, requested=list(cfg.plugins.keys()))
    given = {name: list(section.keys()) if isinstance(section, DictConfig) else [] for name, section in cfg.plugins.items()}
    for name in list(cfg.plugins.keys()):
        entry = registry.get(name)
        section = cfg.plugins[name]
        plugin_cfg = plugin_config(name, getattr(entry.load(), "Config", None), section)
        cfg.plugins[name] = OmegaConf.structured(plugin_cfg) if plugin_cfg is not None else {}
    if not _SAVED_RUN.get():
        _check_strategy_combinations({name: registry.get(name).load() for name in cfg.plugins})
    for name, keys in given.items():  # the values a user set, typed by now (a plugin's defaults are its own)
        section = cfg.plugins[name]
        for field in keys:
            if isinstance(section, DictConfig) and field in section:
                # infinity: a plugin may give it a meaning, and older runs were made with it
                _check_finite(section._get_node(field), f"plugins.{name}.{field!s}.", infinity=_SAVED_RUN.get())
    return cfg


_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch

#: settings where infinity means "no limit"
_UNBOUNDED = ("scenario.memory_limit_gb",)


def _check_finite(node: Any, key: str = "", numbers: bool = True, infinity: bool = False) -> None:
    """:raises ConfigError: naming a NaN or (unless ``infinity``) an infinity,
    except where it means "no limit" (:data:`_UNBOUNDED`), unless ``numbers`` is
    false (a plugin's defaults are its own); or a list or mapping in a list of
    numbers, strings or booleans."""
    if isinstance(node, DictConfig):
        for name in node.keys():
            _check_finite(node._get_node(name), f"{key}{name!s}.", numbers, infinity)
    elif isinstance(node, ListConfig):
        kind = node._metadata.element_type
        for i in range(len(node)):
            item = node._get_node(i)
            if kind in (int, float, str, bool) and isinstance(item, (DictConfig, ListConfig)):
                # OmegaConf types a list's plain elements but lets a container through
                raise ConfigError(f"wrong value for '{key[:-1]}[{i}]': expected {kind.__name__}, got "
                                  f"{OmegaConf.to_container(item)!r}")
            _check_finite(item, f"{key[:-1]}[{i}].", numbers, infinity)
    else:
        value = node._value() if hasattr(node, "_value") else node
        if numbers and isinstance(value, float) and not abs(value) <= _FLOAT32_MAX:
            if math.isnan(value) or not (infinity or (value > 0 and key[:-1] in _UNBOUNDED)):
                # the run computes in float32: a larger number is an infinity there
                size = "" if not math.isfinite(value) else f" of size at most {_FLOAT32_MAX:.4g} (fp32's largest)"
                raise ConfigError(f"'{key[:-1]}' must be a finite number{size}, got {value}")


def _sources_read(scenario: DictConfig) -> list[str]:
    """The data sources a scenario reads (``npz:FILE`` as given); none for an
    Avalanche factory given by its dotted name."""
    if scenario.source == "avalanche":
        factory = scenario.factory
        return [] if factory is None or "." in str(factory) else [str((scenario.args or {}).get("dataset", "digits"))]
    if scenario.setting == "domain" and scenario.domains is not None:
        return [str(name) for name in scenario.domains]
    return [str(scenario.source)]


#: Keys that shape a stream's experiences, which an Avalanche benchmark makes itself.
AVALANCHE_MAKES = ("setting", "n_experiences", "class_order", "classes_per_experience", "transform", "rotations",
                   "domains", "identity_first", "storage")


def check_avalanche_keys(scenario: Any) -> None:
    """:raises ConfigError: with ``source: avalanche``, a key that shapes
    experiences set away from its default (the benchmark makes them)."""
    from contlearn.config import ScenarioConfig

    if scenario.source != "avalanche":
        return
    defaults = ScenarioConfig()
    given = [key for key in AVALANCHE_MAKES if scenario[key] != getattr(defaults, key)]
    if given:
        raise ConfigError(
            f"scenario.{given[0]} does not apply to scenario.source=avalanche: the benchmark makes the "
            f"experiences (its setting is detected; give the factory's own arguments in scenario.args)"
        )


class ConfigWarning(UserWarning):
    """A setting the config gives that nothing reads (one a base file set, say)."""


def _check_new_run(cfg: DictConfig) -> None:
    """What only a new run's config is held to (a saved run's was made without
    these checks: :func:`saved_run_config`).

    :raises ConfigError: a data setting that nothing reads (a path given while
        another source is read would train on the wrong data unseen), or a name
        that is no folder name.
    """
    import warnings

    from contlearn.config import TrainConfig
    from contlearn.scenarios.sources import BUILTIN_SOURCES

    if not cfg.model.cosine_scale > 0:
        raise ConfigError(f"'model.cosine_scale' must be positive, got {cfg.model.cosine_scale}")
    if cfg.train.optimizer == "sgd" and cfg.train.momentum >= 1:
        raise ConfigError(f"'train.momentum' must be below 1, got {cfg.train.momentum}")
    if cfg.out is not None and not str(cfg.out).strip():
        raise ConfigError("'out' is empty: give the run directory, or null for runs/<name>-<time>")
    name = str(cfg.name)
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\"):
        raise ConfigError(f"'name' names the run and its default directory runs/<name>-<time>: give a name without "
                          f"'/' or '\\', got {name!r}")
    sc, train = cfg.scenario, cfg.train
    check_avalanche_keys(sc)
    kinds = [source.partition(":") for source in _sources_read(sc)]
    builtin = all(kind in BUILTIN_SOURCES for kind, _, _ in kinds)  # a source of one's own may read any key
    torchvision = any(kind not in _LOCAL_SOURCES for kind, _, _ in kinds)
    refused = [
        ("scenario.path", sc.path is not None, any(k in ("npz", "folder") and not own for k, own, _ in kinds),
         "the npz or folder source (scenario.source=npz|folder)"),
        ("scenario.root", sc.root is not None, torchvision, "a torchvision source (mnist, cifar10...)"),
        ("scenario.download", bool(sc.download), torchvision, "a torchvision source (mnist, cifar10...)"),
        ("scenario.image_size", sc.image_size is not None, any(k == "folder" for k, _, _ in kinds),
         "the folder source"),
    ] if builtin else []  # fmt: skip
    refused += [
        ("scenario.factory", sc.factory is not None, sc.source == "avalanche", "scenario.source=avalanche"),
        ("scenario.args", bool(sc.args), sc.source == "avalanche", "scenario.source=avalanche"),
        ("scenario.identity_first", bool(sc.identity_first), sc.transform == "permute", "scenario.transform=permute"),
        ("scenario.domains", sc.domains is not None, sc.setting == "domain", "scenario.setting=domain"),
    ]
    for key, given, read, what in refused:
        if given and not read:
            raise ConfigError(f"'{key}' is set ({OmegaConf.select(cfg, key)!r}) but only {what} reads it")
    ignored = [  # often from a base file when one switches the optimizer or the schedule: said, not refused
        ("train.momentum", train.momentum != 0, train.optimizer == "sgd", "train.optimizer=sgd"),
        ("train.min_lr", train.min_lr != 0, train.lr_schedule == "cosine", "train.lr_schedule=cosine"),
        ("train.gamma", train.gamma != TrainConfig.gamma, train.lr_schedule == "multistep",
         "train.lr_schedule=multistep"),
        ("train.compile_mode", train.compile_mode != "default", bool(train.compile), "train.compile=true"),
        ("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps is not None, bool(cfg.checkpoint.enabled),
         "checkpoint.enabled=true"),
    ]  # fmt: skip
    for key, given, read, what in ignored:
        if given and not read:
            # attributed here, not to a caller: a config validated twice (load_config, then Experiment) says it once
            warnings.warn(f"'{key}' is set ({OmegaConf.select(cfg, key)!r}) but only {what} reads it: it is not used",
                          ConfigWarning, stacklevel=1)


def _check_strategy_combinations(plugins: dict[str, type]) -> None:
    """Said, not refused: strategies that run together but make a run that
    compares with nothing (``plugins``: the config's plugin classes by name).
    Joint training is the upper bound every method is compared with, and
    another built-in strategy beside it makes a run that is neither (a plugin of
    one's own, a logger say, is not counted); two plugins that declare
    ``keeps_rehearsal_memory`` rehearse from two memories, whose budget is their sum."""
    import warnings

    from contlearn._registry import BUILTIN_PLUGINS

    others = [name for name in plugins if name in BUILTIN_PLUGINS and name not in ("joint", "finetune")]
    if "joint" in plugins and others:
        warnings.warn(f"plugins.joint trains on all the data seen so far, the upper bound methods are compared "
                      f"with; with {' and '.join(repr(n) for n in others)} beside it, the run is neither",
                      ConfigWarning, stacklevel=1)
    memories = [name for name, cls in plugins.items() if getattr(cls, "keeps_rehearsal_memory", False)]
    if len(memories) > 1:
        warnings.warn(f"plugins {' and '.join(repr(n) for n in memories)} each rehearse samples from a memory of "
                      f"their own: the run holds {len(memories)} memories, and its memory budget is their sum",
                      ConfigWarning, stacklevel=1)


#: Sources that read no torchvision root.
_LOCAL_SOURCES = ("digits", "npz", "folder", "avalanche")

_SAVED_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("contlearn_saved_run_config", default=False)


@contextlib.contextmanager
def saved_run_config() -> Iterator[None]:
    """Validate configs as the saved config of an existing run (a resume,
    unlearning): without the checks a new run's config is held to, which the
    run may have been made without."""
    token = _SAVED_RUN.set(True)
    try:
        yield
    finally:
        _SAVED_RUN.reset(token)


def _check_schedule(train: DictConfig) -> None:
    milestones = list(train.milestones)
    if milestones and train.lr_schedule != "multistep":
        raise ConfigError(
            f"'train.milestones' is set ({milestones}) but 'train.lr_schedule' is {train.lr_schedule!r}; "
            "milestones need lr_schedule=multistep"
        )
    if train.lr_schedule == "multistep":
        if not milestones:
            raise ConfigError("'train.lr_schedule' is multistep but 'train.milestones' is empty, e.g. [10, 15]")
        if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
            raise ConfigError(
                f"'train.milestones' must be increasing {train.lr_schedule_unit}s of at least 1, got {milestones}"
            )
    if train.gamma <= 0:
        raise ConfigError(f"'train.gamma' must be positive, got {train.gamma}")
    last_lr = math.log(train.lr) + len(milestones) * math.log(train.gamma)  # in logs: no overflow here
    if train.lr_schedule == "multistep" and last_lr > math.log(_FLOAT32_MAX):
        raise ConfigError(f"'train.gamma' {train.gamma} raises train.lr {train.lr} past fp32's largest number "
                          f"({_FLOAT32_MAX:.4g}) at the last of the milestones {milestones}")
    if not 0 <= train.min_lr < train.lr:
        raise ConfigError(f"'train.min_lr' must be in [0, train.lr), got {train.min_lr}")
    if not 0 <= train.warmup < 1:
        raise ConfigError(f"'train.warmup' must be a fraction of an experience's steps in [0, 1), got {train.warmup}")
