"""Experiment configuration: OmegaConf structured configs, loading and validation.

One YAML file is one experiment. :func:`load_config` merges, in this order, the
schema's defaults, the file (and the files it names as ``base``), and
``key=value`` overrides, then validates every plugin's section against that
plugin's ``Config`` dataclass. Every mistake becomes a :class:`ConfigError`
that names the key and lists what is valid.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from contlearn._config_merge import (
    container_mismatch_error,
    first_line,
    is_structured,
    merge_checked,
)
from contlearn.errors import ConfigError, PluginError, choices

DEFAULT_EXPERIMENT = "split-digits"
MAX_THREADS = 4096  # torch's thread pool crashed the process (segfault) at 100,000

#: Plugin classes by name that a config may configure besides the installed ones.
PluginClasses = Optional[typing.Mapping[str, type]]


@dataclass
class ScenarioConfig:
    """What the stream of experiences is made of (see docs/scenarios.md)."""

    source: str = "digits"  # digits | npz | mnist | fashion_mnist | cifar10 | cifar100 | svhn | folder | avalanche
    setting: str = "class"  # class | task | domain
    n_experiences: int = 5
    class_order: Optional[List[int]] = None  # explicit order; None: shuffled by seed
    classes_per_experience: Optional[List[int]] = None  # None: equal split
    test_fraction: float = 0.2  # stratified split when the source has no test set
    path: Optional[str] = None  # file for source=npz, folder for source=folder
    root: Optional[str] = None  # torchvision root
    download: bool = False  # let torchvision download into root
    transform: str = "none"  # domain shift for setting=domain: none | permute | rotate
    validation_fraction: float = 0.0  # carved from each experience's train, stratified
    samples_per_class: Optional[int] = None  # subsample the training set for quick runs
    domains: Optional[List[str]] = None  # setting=domain: one source per experience (npz:FILE, mnist...)
    rotations: Optional[List[float]] = None  # transform=rotate: one experience per angle; None: i*180/n
    identity_first: bool = False  # transform=permute: experience 0 keeps the original inputs
    train_transform: List[str] = field(default_factory=list)  # e.g. [normalize, random_crop:4, hflip]
    eval_transform: List[str] = field(default_factory=list)  # deterministic only, e.g. [normalize]
    image_size: Optional[int] = None  # source=folder: resize images to this square size
    storage: str = "auto"  # auto | tensor (in memory, batched by index) | loader (DataLoader)
    memory_limit_gb: float = 4.0  # storage=auto: tensors when the inputs fit in this
    num_workers: int = 4  # DataLoader workers for storage=loader
    factory: Optional[str] = None  # source=avalanche: nc_benchmark, ni_benchmark, class_incremental_benchmark... or a dotted name
    args: Dict[str, Any] = field(default_factory=dict)  # source=avalanche: the factory's keyword arguments


@dataclass
class ModelConfig:
    """Backbone and head (see docs/models.md)."""

    backbone: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [256, 256])
    head: str = "incremental"  # incremental | multi | cosine
    pretrained: bool = False  # load weights for timm:/tv:/clip: backbones through their library
    weights: Optional[str] = None  # which weights: timm tag, torchvision enum name, open_clip tag
    cosine_scale: float = 16.0  # head=cosine: initial (learnable) scale of the cosine logits


@dataclass
class TrainConfig:
    """How each experience is trained."""

    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_batch_size: int = 512
    amp: bool = False  # bf16 autocast of forward and loss (CUDA or CPU)
    compile: bool = False  # torch.compile the backbone (nn.Module.compile, in place)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | ...
    channels_last: bool = False  # model and 4-d inputs in channels-last memory format
    lr_schedule: str = "none"  # restarting each experience: none | multistep | cosine
    lr_schedule_unit: str = "epoch"  # the schedule moves once per epoch or at every step: epoch | step
    milestones: List[int] = field(default_factory=list)  # multistep: epochs (steps, by step) at which lr *= gamma
    gamma: float = 0.1  # multistep: the factor at each milestone
    min_lr: float = 0.0  # cosine: the learning rate the schedule decays towards
    warmup: float = 0.0  # fraction of each experience's steps over which the rate rises linearly from 0


@dataclass
class EvalConfig:
    """What is measured after each experience."""

    fwt: bool = True  # evaluate the initial model too, for forward transfer


@dataclass
class CheckpointConfig:
    """When the run writes checkpoints into ``RUN_DIR/checkpoints`` (see docs/reliability.md)."""

    enabled: bool = True  # after every experience (needs a run directory)
    every_n_steps: Optional[int] = None  # also every N training steps inside an experience
    keep_last: int = 3  # checkpoint files kept; older ones are deleted


@dataclass
class ExperimentConfig:
    """One experiment. ``plugins`` maps plugin names to their config sections, in
    the order in which they are registered."""

    name: str = DEFAULT_EXPERIMENT
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: Optional[int] = None  # torch's CPU threads during the run; None: torch's default
    out: Optional[str] = None  # run directory; None: runs/<name>-<timestamp>
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plugins: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ resolution


def shipped_configs() -> list[str]:
    """Names of the experiments shipped with the package (``contlearn run NAME``)."""
    folder = resources.files("contlearn.configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A path to an existing YAML file, or the shipped config of that name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config '{name_or_path}' is a directory, not a YAML file")
    if _names_a_file(path):
        raise ConfigError(f"config file '{name_or_path}' does not exist")
    return _shipped_path(name_or_path, f"no config file or shipped experiment named '{name_or_path}'")


def _names_a_file(path: Path) -> bool:
    """Whether ``path`` can only be a file: a YAML suffix or a folder in it (else it may name an experiment)."""
    return path.suffix in {".yaml", ".yml"} or path.parent != Path(".")


def _shipped_path(name: str, missing: str) -> Path:
    shipped = resources.files("contlearn.configs") / f"{name}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"{missing}; shipped experiments: {', '.join(shipped_configs())}")


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load one file, merged over the file its ``base`` key names."""
    if path.resolve() in seen:
        raise ConfigError(f"config '{path}' includes itself through 'base'")
    try:
        data = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError...
        raise ConfigError(f"cannot read config '{path}': {_yaml_problem(exc)}") from None
    if not isinstance(data, DictConfig) or _is_scalar_yaml(path):
        raise ConfigError(f"config '{path}' must be a mapping of keys to values")
    _check_plugins_section(data, f"config '{path}'")
    return _over_base(data, path.parent, (*seen, path.resolve()))


def _is_scalar_yaml(path: Path) -> bool:
    """Whether the file holds one plain value (``just a string``), which OmegaConf
    loads as a mapping with that value as its only key."""
    import yaml

    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # tags OmegaConf reads and safe_load does not: not a scalar
        return False
    return value is not None and not isinstance(value, dict)


def _yaml_problem(exc: Exception) -> str:
    """One line for a YAML error: where it is and what (PyYAML's own message
    takes several lines); the first line of any other error."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return first_line(str(exc))


def _over_base(data: DictConfig, directory: Path | None, seen: tuple[Path, ...] = ()) -> DictConfig:
    """``data`` merged over the config its ``base`` key names (a file, found first
    in ``directory``, the folder of the file that names it, or a shipped
    experiment; never the working directory, which would make a shipped
    config's base depend on where it is run); ``data`` itself without one."""
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = Path(str(base)).expanduser()
    if directory is None or base_path.is_absolute():
        found = resolve_config_path(str(base_path))
    elif (directory / base_path).is_file() or _names_a_file(base_path):
        found = directory / base_path
        if not found.is_file():
            raise ConfigError(f"base config file '{found}' does not exist")
    else:
        found = _shipped_path(str(base), f"base '{base}' is neither a file beside its config nor a shipped experiment")
    parent = _load_yaml(found, seen)
    if "plugins" in data:
        parent.plugins = {}  # a config's plugin list replaces its base's: plugins are a choice, not a default
    try:
        return OmegaConf.merge(parent, data)  # type: ignore[return-value]
    except TypeError as exc:  # a list over a mapping of the base, or the reverse
        raise container_mismatch_error(parent, (data,), exc) from None


def override_list(overrides: Any) -> list[str]:
    """``overrides`` as a list of strings (None: none); anything else is a ConfigError."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    if isinstance(overrides, Mapping):
        example = [f"{k}={_yaml_value(v)}" for k, v in list(overrides.items())[:2]]
        raise ConfigError(f"overrides must be a list of 'key=value' strings, e.g. {example}; got a mapping")
    if not isinstance(overrides, Iterable):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got {type(overrides).__name__} {overrides!r:.60}")
    items = list(overrides)
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise ConfigError(f"overrides must be 'key=value' strings, got {bad[0]!r}")
    return items


def _yaml_value(value: Any) -> str:
    """``value`` as an override writes it (``null``, ``true``, ``0.1``)."""
    try:
        return yaml.safe_dump([_plain_values(value)], default_flow_style=True, width=1 << 30).strip()[1:-1]
    except yaml.YAMLError:  # an object YAML cannot write: the message shows it as Python does
        return str(value)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """``["train.lr=0.1", "plugins.ewc.lam=10"]`` as a config. A ``plugins=``
    override replaces the plugin list, what earlier overrides put in it too."""
    items = override_list(overrides)
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        if "" in re.sub(r"\[\d+\]", "", key.strip()).split("."):
            raise ConfigError(f"override '{item}': the key '{key.strip()}' has an empty part between its dots")
    sections = [re.split(r"[.\[]", item.partition("=")[0].strip())[0] for item in items]
    last_list = max((k for k, item in enumerate(items) if item.partition("=")[0].strip() == "plugins"), default=None)
    if last_list is not None:
        items = [item for k, item in enumerate(items) if k >= last_list or sections[k] != "plugins"]
    try:
        layer = OmegaConf.from_dotlist(items)
    except Exception as exc:  # OmegaConf's errors, yaml.YAMLError
        raise _override_error(items, exc) from None
    _check_plugins_section(layer, "the overrides")
    return layer


def override_keys(overrides: Any) -> set[str]:
    """The keys ``key=value`` overrides set."""
    return {item.partition("=")[0].strip() for item in override_list(overrides)}


def _override_error(items: list[str], exc: Exception) -> ConfigError:
    """The error naming the override that does not parse (a YAML value, say): found
    by parsing them one at a time, only once parsing them together failed."""
    for item in items:
        try:
            OmegaConf.from_dotlist([item])
        except Exception as one:
            hint = " (in YAML, a ':' in a mapping needs a space after it: {a: 1})" if re.search(r"[{,]\s*\w+:\S", item) else ""
            return ConfigError(f"cannot parse override '{item}': {first_line(str(one))}{hint}")
    keys = [item.partition("=")[0].strip() for item in items]
    for key in keys:  # each parses alone: one sets a key inside another's value
        inner = next((other for other in keys if other.startswith((f"{key}.", f"{key}["))), None)
        if inner is not None:
            return ConfigError(f"cannot combine the overrides of '{key}' and '{inner}' (inside it): "
                               f"{first_line(str(exc))}; give the whole value in one override")
    return ConfigError(f"cannot parse overrides {items}: {first_line(str(exc))}")


def _check_plugins_section(layer: DictConfig, where: str) -> None:
    plugins = layer.get("plugins") if isinstance(layer, DictConfig) else None
    if plugins is not None and not isinstance(plugins, DictConfig):
        raise ConfigError(
            f"'plugins' in {where} must be a mapping of plugin names to their fields, "
            f"e.g. {{replay: {{size: 200}}, ewc: {{}}}}; got {OmegaConf.to_container(plugins) if isinstance(plugins, ListConfig) else plugins!r}"
        )


# ------------------------------------------------------------------ validation


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


def validate(cfg: DictConfig, plugins: PluginClasses = None) -> DictConfig:
    """Check what the schema cannot: enumerations, ranges and plugin sections.

    Plugin sections are replaced by their validated values, defaults filled in;
    ``plugins``: plugin classes by name besides the installed ones.
    """
    from contlearn._registry import PluginRegistry  # a plugin may import config

    for section in cfg.keys():  # the plugins' sections once typed, below
        if section != "plugins":
            _check_finite(cfg._get_node(section), f"{section}.")
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

    registry = PluginRegistry.load(given=plugins)
    given = {name: list(section.keys()) if isinstance(section, DictConfig) else [] for name, section in cfg.plugins.items()}
    for name in list(cfg.plugins.keys()):
        entry = registry.get(name)
        section = cfg.plugins[name]
        plugin_cfg = plugin_config(name, getattr(entry.load(), "Config", None), section)
        cfg.plugins[name] = OmegaConf.structured(plugin_cfg) if plugin_cfg is not None else {}
    for name, keys in given.items():  # the values a user set, typed by now (a plugin's defaults are its own)
        section = cfg.plugins[name]
        for key in keys:
            if isinstance(section, DictConfig) and key in section:
                # infinity: a plugin may give it a meaning, and older runs were made with it
                _check_finite(section._get_node(key), f"plugins.{name}.{key}.", infinity=_SAVED_RUN.get())
    return cfg


#: settings where infinity means "no limit"
_UNBOUNDED = ("scenario.memory_limit_gb",)


def _check_finite(node: Any, key: str = "", numbers: bool = True, infinity: bool = False) -> None:
    """:raises ConfigError: naming a NaN or (unless ``infinity``) an infinity,
    except where it means "no limit" (:data:`_UNBOUNDED`), unless ``numbers`` is
    false (a plugin's defaults are its own); or a list or mapping in a list of
    numbers, strings or booleans."""
    if isinstance(node, DictConfig):
        for name in node.keys():
            _check_finite(node._get_node(name), f"{key}{name}.", numbers, infinity)
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
        if numbers and isinstance(value, float) and not math.isfinite(value):
            if math.isnan(value) or not (infinity or (value == math.inf and key[:-1] in _UNBOUNDED)):
                raise ConfigError(f"'{key[:-1]}' must be a finite number, got {value}")


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
            warnings.warn(f"'{key}' is set ({OmegaConf.select(cfg, key)!r}) but only {what} reads it: it is not used",
                          ConfigWarning, stacklevel=3)


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
    if not 0 <= train.min_lr < train.lr:
        raise ConfigError(f"'train.min_lr' must be in [0, train.lr), got {train.min_lr}")
    if not 0 <= train.warmup < 1:
        raise ConfigError(f"'train.warmup' must be a fraction of an experience's steps in [0, 1), got {train.warmup}")


def load_config(
    source: str | Path | dict[str, Any] | DictConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    check: bool = True,
    plugins: PluginClasses = None,
) -> DictConfig:
    """Load an experiment config.

    :param source: a YAML file, the name of a shipped experiment
        (see :func:`shipped_configs`), ``None`` for the default experiment, or a
        config as an object (see :func:`merge_config`).
    :param overrides: ``key=value`` strings, applied last.
    :param check: validate values and plugin sections (needs the plugins).
    :param plugins: plugin classes by name, besides the installed ones (a
        script's own), so that the config can configure them.
    :return: the merged config (an OmegaConf ``DictConfig`` over
        :class:`ExperimentConfig`).
    :raises ConfigError: for a missing file, an unknown key or plugin, a wrong type.
    """
    if isinstance(source, (dict, DictConfig)):
        return merge_config(source, overrides, check=check, plugins=plugins)
    if source is None:
        source = DEFAULT_EXPERIMENT
    return _with_overrides(_load_yaml(resolve_config_path(str(source))), overrides, check, plugins)


def merge_config(
    config: DictConfig | dict[str, Any], overrides: Any = (), *, check: bool = True, plugins: PluginClasses = None
) -> DictConfig:
    """A config given as an object (a loaded config, perhaps edited, or a plain
    mapping of its sections, which may name a ``base`` file or shipped
    experiment as a YAML file can) with ``overrides``, merged over the schema and
    validated as :func:`load_config` validates a file."""
    if not isinstance(config, (DictConfig, dict)):
        raise ConfigError(f"a config must be a mapping of keys to values (or a file or name), got {type(config).__name__}")
    try:
        layer = OmegaConf.create(to_container(config) if isinstance(config, DictConfig) else _plain_values(config))
    except OmegaConfBaseException as exc:
        key = f" '{exc.full_key}'" if getattr(exc, "full_key", None) else ""
        raise ConfigError(
            f"the config's value{key} is not a config value ({first_line(str(exc))}): a config holds numbers, "
            f"strings, booleans, null, lists and mappings"
        ) from None
    _check_plugins_section(layer, "the config")
    return _with_overrides(_over_base(layer, None), overrides, check, plugins)


def _plain_values(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays (``np.logspace(...)``) as Python numbers and lists."""
    if isinstance(value, dict):
        return {k: _plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_values(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # a scalar or an array
        return value.tolist()
    return value


def _with_overrides(base: DictConfig, overrides: Any, check: bool, plugins: PluginClasses = None) -> DictConfig:
    items = override_list(overrides)
    layers = [base, parse_overrides(items)]
    if "plugins" in override_keys(items):
        base.plugins = {}  # `plugins=...` replaces the file's plugin list instead of merging into it
    cfg = merge_checked(ExperimentConfig, *layers)
    try:
        OmegaConf.resolve(cfg)  # ${...} interpolations, once, here
    except OmegaConfBaseException as exc:
        key = f" in '{exc.full_key}'" if getattr(exc, "full_key", None) else ""
        raise ConfigError(f"cannot resolve an interpolation{key}: {first_line(str(exc))}") from None
    return validate(cfg, plugins) if check else cfg


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML text (what ``config.yaml`` in a run directory holds)."""
    return OmegaConf.to_yaml(cfg)


def schema_defaults(plugin_names: list[str], plugins: PluginClasses = None) -> dict[str, Any]:
    """What a config holds when nothing sets it: the schema's defaults, and the
    defaults of each named plugin's ``Config`` (plugins the registry does not
    know, such as objects given to an experiment, get an empty section);
    ``plugins``: plugin classes by name besides the installed ones."""
    from contlearn._registry import PluginRegistry

    registry = PluginRegistry.load(given=plugins)
    out = to_container(OmegaConf.structured(ExperimentConfig))
    for name in plugin_names:
        try:
            cls = getattr(registry.get(name).load(), "Config", None)
        except PluginError:
            cls = None
        out["plugins"][name] = to_container(OmegaConf.structured(cls)) if cls is not None else {}
    return out


def to_container(cfg: DictConfig | ListConfig) -> Any:
    """Plain Python containers, for JSON."""
    return OmegaConf.to_container(cfg, resolve=True)
