"""Helpers the built-in strategies share: seeds for their own generators, checks of
their config fields (their model copies come from :mod:`contlearn.snapshots`)."""

from __future__ import annotations

import re
import zlib
from typing import Any

from contlearn.errors import ConfigError, PluginError


def plugin_generator(seed: int, name: str) -> int:
    """A seed for a plugin's own CPU generator, derived from the run seed and the
    plugin's name, so plugins do not share (or shift) the loop's random stream."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def check_pattern(key: str, pattern: str | None) -> None:
    """:raises ConfigError: when ``pattern`` (the config field ``key``) is not a regular expression."""
    try:
        re.compile(pattern or "")
    except re.error as exc:
        raise ConfigError(f"{key} {pattern!r} is not a regular expression: {exc}") from None


DROP_ONE = "drop one of the two plugins"


def declaring(run: Any, attribute: str) -> list[str]:
    """The names of the run's plugins that declare ``attribute`` (a true value of
    the plugin attribute protocol: ``builds_model``, ``freezes_model``,
    ``logits_without_gradient``, ``predicts_from_after_experience``, ``cannot_unlearn``)."""
    return [name for name, plugin in run.plugins.items() if getattr(plugin, attribute, False)]


def require_trainable(run: Any, plugin: str, work: str, advice: str = DROP_ONE) -> None:
    """:raises PluginError: the model has no trainable parameter after the
    plugins' ``setup`` (a plugin that freezes the model, as ``dmn`` with
    ``train_clip=false``), so that ``plugin``'s ``work`` on them would do nothing."""
    if any(p.requires_grad for p in run.model.parameters()):
        return
    frozen = declaring(run, "freezes_model")
    by = f" (plugin {frozen[0]!r} freezes it)" if frozen else ""
    raise PluginError(f"plugin {plugin} {work}, but the model has no trainable parameters{by}: "
                      f"{plugin} would do nothing; {advice}")


def refuse_model_builders(run: Any, plugin: str, why: str) -> None:
    """:raises PluginError: another plugin builds the run's model (``builds_model``),
    which ``plugin`` cannot be combined with (``why``), whatever their order."""
    builders = declaring(run, "builds_model")
    if builders:
        raise PluginError(f"plugin {plugin} {why}, and plugin {builders[0]!r} builds a model of its own: "
                          f"{plugin} cannot be combined with it")


def refuse_logits_without_gradient(run: Any, plugin: str, work: str, advice: str = DROP_ONE) -> None:
    """:raises PluginError: another plugin makes the run's logits without gradient
    (``logits_without_gradient``: it predicts another way, as PRD by prototypes),
    so that ``plugin``'s ``work`` on the model's logits would act on a head that
    does not train (LwF would train nothing, EWC and SSD weigh parameters through
    a random head)."""
    voiding = declaring(run, "logits_without_gradient")
    if voiding:
        raise PluginError(f"plugin {plugin} {work}, but plugin {voiding[0]!r} makes them without gradient (it "
                          f"predicts another way): {plugin} would act on a head that does not train; {advice}")
