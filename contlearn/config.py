"""Experiment configuration: OmegaConf structured configs, loading and validation.

One YAML file is one experiment. :func:`load_config` merges, in this order, the
schema's defaults, the file (and the files it names as ``base``), and
``key=value`` overrides, then validates every plugin's section against that
plugin's ``Config`` dataclass. Every mistake becomes a :class:`ConfigError`
that names the key and lists what is valid.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from contlearn._config_checks import AVALANCHE_MAKES as AVALANCHE_MAKES  # the checks: public here
from contlearn._config_checks import ConfigWarning as ConfigWarning
from contlearn._config_checks import check_avalanche_keys as check_avalanche_keys
from contlearn._config_checks import plugin_config as plugin_config
from contlearn._config_checks import saved_run_config as saved_run_config
from contlearn._config_checks import validate as validate
from contlearn._config_merge import (
    container_mismatch_error,
    first_line,
    merge_checked,
)
from contlearn.errors import ConfigError, PluginError

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
    from contlearn._registry import BUILTIN_PLUGINS

    missing = f"no config file or shipped experiment named '{name_or_path}'"
    if name_or_path in BUILTIN_PLUGINS:
        missing += (f" ('{name_or_path}' is a plugin: `contlearn plugins {name_or_path}` lists its fields, and "
                    f"`contlearn run split-digits plugins.{name_or_path}={{}}` adds it to an experiment)")
    return _shipped_path(name_or_path, missing)


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

    registry = PluginRegistry.load(given=plugins, requested=plugin_names)
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


def flatten(container: Any, prefix: str = "") -> dict[str, Any]:
    """A config as plain containers (:func:`to_container`), as dotted keys and
    their values: ``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``. Lists and
    empty mappings are values."""
    if isinstance(container, dict) and container:
        out: dict[str, Any] = {}
        for key, value in container.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: container}
