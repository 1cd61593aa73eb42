"""Every built-in plugin loads, validates its default config, and runs end to end.

A plugin that needs a particular setting (task labels, a backbone) names the
overrides for a short run in a class attribute ``smoke_overrides``.
"""

from __future__ import annotations

import pytest

from contlearn import Experiment, load_config
from contlearn._registry import BUILTIN_PLUGINS, PluginRegistry


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_builtin_plugin_runs_end_to_end(name, quick):
    cls = PluginRegistry.load(autoload=False).get(name).load()
    assert cls.__doc__, f"plugin {name} needs a docstring"
    overrides = list(getattr(cls, "smoke_overrides", []))
    cfg = load_config(None, [*quick, "scenario.n_experiences=2", "plugins={}", f"plugins.{name}={{}}", *overrides])
    assert list(cfg.plugins) == [name]
    results = Experiment(cfg).run()
    assert len(results.accuracy_matrix) == 2
    assert results.accuracy_matrix[0][0] > 0.3, "the first experience should be learnt at least a little"


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_builtin_plugin_state_round_trips(name):
    registry = PluginRegistry.load(autoload=False)
    cls = registry.get(name).load()
    plugin = registry.create(name, cls.Config() if hasattr(cls, "Config") else None)
    assert hasattr(plugin, "state_dict") and hasattr(plugin, "load_state_dict")
    plugin.load_state_dict(plugin.state_dict())
