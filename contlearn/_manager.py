"""The plugin manager of a run: a pluggy ``PluginManager`` with contlearn's hooks.

There is no global manager: every :class:`~contlearn.Experiment` makes its own
with :func:`make_plugin_manager`, so two experiments in one process never see
each other's plugins.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from typing import Any

import pluggy
import torch
from omegaconf import DictConfig, ListConfig

from contlearn import hookspecs
from contlearn._registry import BUILTIN_PLUGINS
from contlearn.errors import PluginError

DEFAULTS_NAME = "defaults"


def make_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager that knows every hook of :mod:`contlearn.hookspecs`."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _has_hookimpls(plugin: Any) -> bool:
    marker = f"{hookspecs.PROJECT}_impl"
    return any(hasattr(getattr(type(plugin), name, None), marker) for name in dir(type(plugin)))


def register_plugins(pm: pluggy.PluginManager, plugins: dict[str, Any], defaults: Any) -> None:
    """Register the defaults and then ``plugins`` in order, and check them.

    :raises PluginError: a hook implementation that matches no hookspec or has
        arguments the spec lacks (``check_pending``), or two plugins that both
        answer the same ``firstresult`` hook without declaring an order.
    """
    for name, plugin in plugins.items():
        if isinstance(plugin, type):
            raise PluginError(
                f"plugin '{name}' is the class {plugin.__name__}, not a plugin object: pass an instance, "
                f"e.g. {plugin.__name__}(...)"
            )
        if dataclasses.is_dataclass(plugin) and not _has_hookimpls(plugin):
            raise PluginError(
                f"plugin '{name}' is a {type(plugin).__qualname__} instance, a config, not a plugin: give the "
                f"plugin class (configured by plugins.{name}.<field>) or a plugin object built from the config"
            )
        if isinstance(plugin, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            raise PluginError(
                f"plugin '{name}' is the function {getattr(plugin, '__qualname__', plugin)!r}, not a plugin: "
                f"pass an object whose methods are marked @contlearn.hookimpl"
            )
        if plugin is None or isinstance(plugin, (bool, int, float, complex, str, bytes, list, tuple, dict, set,
                                                 DictConfig, ListConfig)):
            raise PluginError(
                f"plugin '{name}' is {type(plugin).__name__} {plugin!r:.60}, not a plugin: pass an object whose "
                f"methods are marked @contlearn.hookimpl (a config section goes under plugins.<name> instead)"
            )
        restores = callable(getattr(plugin, "load_state_dict", None)) or callable(getattr(plugin, "restore", None))
        if callable(getattr(plugin, "state_dict", None)) and not restores:
            raise PluginError(  # found out otherwise at the first resume, when the checkpoints exist
                f"plugin '{name}' saves its state (state_dict) but has no load_state_dict (nor restore) to take it "
                f"back on resume: add one"
            )
    try:
        pm.register(defaults, name=DEFAULTS_NAME)
        for name, plugin in plugins.items():
            same = pm.get_name(plugin)
            if same is not None:  # pluggy's messages dump the whole registry
                raise PluginError(
                    f"plugin '{name}' is the same object as plugin '{same}': a plugin object keeps its own "
                    f"state, so give each name its own object"
                )
            if name == DEFAULTS_NAME:
                raise PluginError(f"'{DEFAULTS_NAME}' names contlearn's built-in behaviour: give plugin "
                                  f"{type(plugin).__name__} another name")
            pm.register(plugin, name=name)
            check_unmarked_hooks(pm, name, plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        unknown = re.match(r"unknown hook '(\w+)'", str(exc))
        if unknown:
            hooks = sorted(hook_names(pm))
            close = difflib.get_close_matches(unknown[1], hooks, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"the hooks are {', '.join(hooks)}"
            raise PluginError(f"plugin '{name}' implements '{unknown[1]}', which is no hook: {hint}") from None
        hook = re.search(r"for hook '(\w+)'", str(exc))
        spec = getattr(getattr(pm.hook, hook[1], None), "spec", None) if hook else None
        takes = f"; '{spec.name}' takes ({', '.join(spec.argnames)})" if spec is not None else ""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise PluginError(f"plugin '{name}' does not fit the hook contract: {'; '.join(lines)}{takes}") from None
    check_firstresult_conflicts(pm)


def check_unmarked_hooks(pm: pluggy.PluginManager, name: str, plugin: Any) -> None:
    """A method named like a hook but not marked ``@hookimpl`` would never be
    called; that is a forgotten decorator, not an intent. (A plugin that is a
    torch module keeps its own ``forward``.)

    :raises PluginError: naming the plugin and the methods.
    """
    marked = {caller.name for caller in pm.get_hookcallers(plugin) or ()}
    if isinstance(plugin, torch.nn.Module):
        marked.add("forward")
    unmarked = sorted(n for n in hook_names(pm) - marked if callable(getattr(plugin, n, None)))
    if unmarked:
        raise PluginError(
            f"plugin '{name}' has methods named like hooks but not marked @hookimpl: {unmarked}; they would "
            f"never be called. Mark them (from contlearn import hookimpl) or rename them."
        )


def hook_names(pm: pluggy.PluginManager) -> set[str]:
    """The names of the hooks ``pm`` has a spec for."""
    return {
        n for n in dir(pm.hook) if isinstance(c := getattr(pm.hook, n), pluggy.HookCaller) and c.spec is not None
    }


def check_firstresult_conflicts(pm: pluggy.PluginManager) -> None:
    """Two strategies implementing one ``firstresult`` hook must say which goes first.

    Only one implementation's result would be used, chosen by registration order;
    that silently disables the other strategy's behaviour. Marking one of them
    ``tryfirst`` or ``trylast`` (or ``wrapper``) states the intent and passes; two
    marked alike (both ``tryfirst``) state nothing between them and are refused.
    """
    for hook_name in sorted(hook_names(pm)):
        caller = getattr(pm.hook, hook_name)
        if not caller.spec.opts.get("firstresult"):
            continue
        tiers: dict[str, list[str]] = {}
        for impl in caller.get_hookimpls():
            if impl.plugin_name == DEFAULTS_NAME or impl.wrapper or impl.hookwrapper:
                continue
            tier = "tryfirst" if impl.tryfirst else "trylast" if impl.trylast else ""
            tiers.setdefault(tier, []).append(impl.plugin_name)
        for tier, names in tiers.items():
            if len(names) > 1:
                listed, every = " and ".join(f"'{name}'" for name in names), "both" if len(names) == 2 else "all"
                if all(name in BUILTIN_PLUGINS for name in names):  # a config's user can only drop one
                    raise PluginError(f"plugins {listed} cannot be combined: {every} decide the run's "
                                      f"'{hook_name}' (a firstresult hook); drop one of them")
                alike = f", {every} marked {tier}" if tier else ""
                mark = f"Unmark one, or mark it {'trylast' if tier == 'tryfirst' else 'tryfirst'}" if tier else (
                    "Mark one implementation tryfirst or trylast")
                raise PluginError(
                    f"plugins {listed} {every} implement the firstresult hook '{hook_name}'{alike}; only one "
                    f"result can be used. {mark}, or drop a plugin."
                )


def implemented(pm: pluggy.PluginManager, hook_name: str, include_defaults: bool = True) -> bool:
    """Whether any registered plugin implements ``hook_name``."""
    caller = getattr(pm.hook, hook_name)
    return any(include_defaults or impl.plugin_name != DEFAULTS_NAME for impl in caller.get_hookimpls())
