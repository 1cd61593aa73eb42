"""Where plugins come from: built-ins by short name, others by entry point.

A plugin is a class with an optional ``Config`` dataclass, built as
``cls(config)`` (or ``cls()`` when it has no ``Config``), whose methods marked
with :data:`contlearn.hookimpl` implement hooks. Built-in strategies are listed
in :data:`BUILTIN_PLUGINS`; third-party packages register theirs in the
entry-point group ``contlearn.plugins`` (``name = "pkg.module:Class"``).
Setting ``CONTLEARN_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from contlearn.errors import ContlearnError, PluginError, choices

ENTRY_POINT_GROUP = "contlearn.plugins"
DISABLE_AUTOLOAD_ENV = "CONTLEARN_DISABLE_PLUGIN_AUTOLOAD"

#: Built-in plugins: short name -> "module:Class".
BUILTIN_PLUGINS: dict[str, str] = {
    "finetune": "contlearn.plugins.finetune:Finetune",
    "dmn": "contlearn.plugins.dmn:DMN",
    "replay": "contlearn.plugins.replay:Replay",
    "ewc": "contlearn.plugins.ewc:EWC",
    "l2": "contlearn.plugins.l2:L2",
    "lwf": "contlearn.plugins.lwf:LwF",
    "joint": "contlearn.plugins.joint:Joint",
    "powerlaw": "contlearn.plugins.powerlaw:PowerLaw",
    "prd": "contlearn.plugins.prd:PRD",
    "memo": "contlearn.plugins.memo:MEMO",
    "ssd": "contlearn.plugins.ssd:SSD",
    "clr": "contlearn.plugins.clr:CLR",
    "reglora": "contlearn.plugins.reglora:RegLoRA",
}


#: what a plugin name may be: it becomes the config key ``plugins.<name>``
_NAME = re.compile(r"[^.\[\]=\s]+")


def given_plugins(plugins: Any, where: str, *, classes_only: bool = False) -> dict[str, Any]:
    """The plugins a script gives by name (``plugins=`` of :class:`~contlearn.Experiment`,
    :func:`~contlearn.load_config`), checked: a mapping of names to plugin classes
    (or objects, unless ``classes_only``).

    :raises PluginError: not a mapping, a name that is not a string, a class under
        a name that cannot be its config key, or an object where a class is needed.
    """
    if plugins is None:
        return {}
    kinds = "plugin classes" if classes_only else "plugin classes or objects"
    if not isinstance(plugins, Mapping):
        raise PluginError(
            f"{where} must map plugin names to {kinds}, e.g. {{'anchor': LogitAnchor}}; got "
            f"{type(plugins).__name__} {plugins!r:.60} (to use an installed plugin, name it in the config instead: 'plugins.<name>={{}}')"
        )
    for name, plugin in plugins.items():
        if not isinstance(name, str) or not name:
            raise PluginError(f"{where}: plugin names are non-empty strings, got {name!r}")
        if isinstance(plugin, type) and not _NAME.fullmatch(name):
            raise PluginError(
                f"{where}: the plugin class {plugin.__name__} is given as {name!r}, which cannot be its config "
                f"key plugins.<name>: give a name without '.', '[', ']', '=' or spaces"
            )
        if classes_only and not isinstance(plugin, type):
            raise PluginError(
                f"{where}: plugin '{name}' is {type(plugin).__name__} {plugin!r:.60}, not a class "
                f"(plugin objects go to Experiment(plugins=...))"
            )
    return dict(plugins)


def plugin_classes_from_targets(targets: Sequence[str], option: str = "--plugin") -> dict[str, type]:
    """The plugin classes a command line names, each ``NAME=path/to/file.py:Class``
    or ``NAME=package.module:Class``: the command-line form of
    ``Experiment(plugins={NAME: Class})``, for a plugin of one's own that no
    distribution installs. A file is imported under its own name, its folder
    last on ``sys.path`` (so it may import its neighbours and shadows nothing).

    :raises PluginError: a malformed target, a missing file, a module that fails to
        import (the message names the file and line), no such class, a name given twice.
    """
    classes: dict[str, type] = {}
    for text in targets:
        name, sep, target = text.partition("=")
        where, _, attr = target.rpartition(":")
        if not sep or not name or not where or not attr:
            raise PluginError(
                f"{option} {text!r}: give NAME=path/to/file.py:Class or NAME=package.module:Class, "
                f"e.g. {option} anchor=anchor.py:LogitAnchor"
            )
        if name in classes:
            raise PluginError(f"{option}: the plugin name '{name}' is given twice")
        module = _import_target(where, f"{option} {name}={target}")
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if not isinstance(obj, type):
            defined = [n for n, c in vars(module).items() if inspect.isclass(c) and c.__module__ == module.__name__]
            what = "no attribute" if obj is None else f"{type(obj).__name__}, not a class, as"
            raise PluginError(
                f"{option} {name}={target}: {where} has {what} '{attr}'; the classes it defines: "
                f"{', '.join(defined) or 'none'}"
            )
        classes[name] = obj
        _TARGETS[obj] = f"{Path(where).expanduser().resolve() if _is_file(where) else where}:{attr}"
    return given_plugins(classes, option, classes_only=True)


#: where the plugin classes a command line named come from (absolute file paths),
#: so that the command that continues a run can name them again
_TARGETS: dict[type, str] = {}


def plugin_options(classes: Mapping[str, type]) -> list[str] | None:
    """The ``-p NAME=TARGET`` arguments that give ``classes`` again, or None
    when one of them was not named on a command line (a script's own)."""
    if not all(cls in _TARGETS for cls in classes.values()):
        return None
    return [arg for name, cls in classes.items() for arg in ("-p", f"{name}={_TARGETS[cls]}")]


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _import_target(where: str, what: str) -> ModuleType:
    """The module a target's part before ':' names: a ``.py`` file or a module."""
    if not _is_file(where):
        return _import(where, what, None)
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise PluginError(f"{what}: no such file {where}")
    try:
        other = importlib.util.find_spec(path.stem)
    except (ImportError, ValueError):
        other = None
    if other is not None and Path(other.origin or "").resolve() != path:
        raise PluginError(
            f"{what}: the file's module name '{path.stem}' is that of {other.origin or 'a built-in module'}; "
            f"rename the file"
        )
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # its neighbours can be imported; nothing installed is shadowed
    return _import(path.stem, what, path)


def _import(module_name: str, what: str, path: Path | None) -> ModuleType:
    """Import ``module_name``; a failure names the line of ``path`` it happened at."""
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if path and Path(f.filename) == path]
        at = f" (at {path}:{lines[-1]})" if lines and not isinstance(exc, SyntaxError) else ""
        raise PluginError(f"{what}: importing {path or module_name} failed: {type(exc).__name__}: {exc}{at}") from exc


@contextlib.contextmanager
def classes_given_again(python_call: str) -> Iterator[None]:
    """Reading a run's saved config: a plugin it names that is unknown here was
    likely given as a class (``-p``, or in Python); say how to give it again.
    ``python_call`` holds ``{plugins}`` where the mapping goes."""
    try:
        yield
    except PluginError as exc:
        unknown = re.match(r"unknown plugin '([^']*)'", str(exc))
        if unknown is None:
            raise
        name = unknown[1]
        python = python_call.format(plugins=f"{{'{name}': TheClass}}")
        raise PluginError(
            f"{exc} (if the run was given it as a class, give it again: on the command line "
            f"-p {name}=FILE.py:Class, in Python {python})"
        ) from None


class PluginLoadWarning(UserWarning):
    """A third-party plugin could not be loaded; the others still are."""


#: the entry-point problems reported in this process: a config, a check and a run
#: each load the plugins, and a script should hear of each problem once
_REPORTED: set[str] = set()


def _report(message: str) -> None:
    if message not in _REPORTED:
        _REPORTED.add(message)
        warnings.warn(message, PluginLoadWarning, stacklevel=4)


@dataclass
class PluginEntry:
    """One available plugin: its name, where it comes from, how to import it."""

    name: str
    target: str  # "module:attr"
    source: str  # "builtin" or "<distribution> <version>"
    _loaded: Any = None

    def load(self) -> type:
        """Import the plugin class; a failure names the plugin and its source."""
        if self._loaded is None:
            module_name, _, attr = self.target.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split(".") if attr else ():
                    obj = getattr(obj, part)
            except Exception as exc:
                raise PluginError(
                    f"plugin '{self.name}' ({self.target}, from {self.source}) failed to load: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self._loaded = obj
        return self._loaded

    @property
    def config_class(self) -> type | None:
        return getattr(self.load(), "Config", None)


class PluginRegistry:
    """The plugins a run can name, built-ins first."""

    def __init__(self, entries: dict[str, PluginEntry], broken: dict[str, str] | None = None):
        self.entries = entries
        self.broken = broken or {}

    @classmethod
    def load(
        cls,
        autoload: bool | None = None,
        given: Mapping[str, type] | None = None,
        requested: Collection[str] = (),
        given_source: str = "given in Python",
    ) -> PluginRegistry:
        """Built-ins, plus entry points of the group ``contlearn.plugins`` unless
        autoload is off, plus the plugin classes ``given`` by name in Python (a
        script's own). A third-party plugin that fails to import is reported
        with a :class:`PluginLoadWarning` naming it and its distribution (once per
        process), and left out; the others are still available. A broken plugin
        among the names ``requested`` (a config's plugins) is not warned about:
        :meth:`get` raises its error for the caller to report, once.

        :raises PluginError: a given class under the name of another plugin.
        """
        entries = {name: PluginEntry(name, target, "builtin") for name, target in BUILTIN_PLUGINS.items()}
        broken: dict[str, str] = {}
        if autoload is None:
            autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
        if autoload:
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
                entry = PluginEntry(ep.name, ep.value, dist)
                if not _NAME.fullmatch(ep.name):
                    broken[ep.name] = (
                        f"plugin {ep.name!r} from {dist} has a name that cannot be its config key plugins.<name> "
                        f"(it holds '.', '[', ']', '=' or spaces); it is ignored: rename its entry point"
                    )
                    _report(broken[ep.name])
                    continue
                if ep.name in entries:
                    _report(f"plugin '{ep.name}' from {dist} has the name of a plugin from "
                            f"{entries[ep.name].source}; it is ignored")
                    continue
                try:
                    entry.load()
                except PluginError as exc:
                    broken[ep.name] = str(exc)
                    if ep.name not in requested:
                        _report(str(exc))
                    continue
                entries[ep.name] = entry
        for name, plugin_class in given_plugins(given, "plugins", classes_only=True).items():
            if name in entries and _loads_as(entries[name], plugin_class):
                continue  # the class that name is registered for, given as well (a script written before it was)
            if name in entries:
                raise PluginError(
                    f"the plugin class {plugin_class.__name__} is given as '{name}', the name of a plugin from "
                    f"{entries[name].source}; give it another name"
                )
            target = f"{plugin_class.__module__}:{plugin_class.__qualname__}"
            entries[name] = PluginEntry(name, target, given_source, plugin_class)
        return cls(entries, broken)

    def get(self, name: str) -> PluginEntry:
        """The entry of a plugin; an unknown name lists the available ones."""
        if name in self.entries:
            return self.entries[name]
        if name in self.broken:
            raise PluginError(self.broken[name])
        skipped = f" (installed plugins are not loaded: {DISABLE_AUTOLOAD_ENV} is set)" if os.environ.get(
            DISABLE_AUTOLOAD_ENV) else ""
        raise PluginError(f"unknown plugin '{name}'; available plugins: {choices(self.entries)}{skipped}")

    def names(self) -> list[str]:
        return list(self.entries)

    def create(self, name: str, config: Any) -> Any:
        """Build the plugin ``name`` from its validated config."""
        cls = self.get(name).load()
        try:
            plugin = cls(config) if getattr(cls, "Config", None) is not None else cls()
        except ContlearnError:  # the plugin's own check of its config: its message says it all
            raise
        except Exception as exc:
            raise PluginError(f"plugin '{name}' could not be built: {type(exc).__name__}: {exc}") from exc
        return plugin


def _loads_as(entry: PluginEntry, plugin_class: type) -> bool:
    """Whether ``entry`` is ``plugin_class`` (a broken entry is not)."""
    try:
        return entry.load() is plugin_class
    except PluginError:
        return False
