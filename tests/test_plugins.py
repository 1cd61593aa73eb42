"""Every built-in plugin loads, validates its default config, and runs end to end.

A plugin that needs a particular setting (task labels, a backbone) names the
overrides for a short run in a class attribute ``smoke_overrides``.
"""

from __future__ import annotations

import pytest
from _crash import assert_resume_is_exact

from contlearn import Experiment, hookimpl, load_config
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


class ExperienceSteps:
    """Records the global steps of each experience."""

    def __init__(self):
        self.steps: dict[int, list[int]] = {}

    @hookimpl
    def after_step(self, run):
        self.steps.setdefault(run.experience.index, []).append(run.global_step)


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_builtin_plugin_resumes_exactly_inside_an_experience(name, quick, tmp_path):
    """Killed in the middle of experience 1 and resumed from the checkpoint of
    the step before, every built-in plugin ends its run as if never killed."""
    cls = PluginRegistry.load(autoload=False).get(name).load()
    overrides = [*quick, "scenario.n_experiences=2", "plugins={}", f"plugins.{name}={{}}",
                 *getattr(cls, "smoke_overrides", []), "train.epochs=2", "scenario.samples_per_class=30",
                 "checkpoint.every_n_steps=1"]  # fmt: skip
    probe = ExperienceSteps()
    Experiment(load_config(None, overrides), plugins={"steps": probe}).run()
    steps = probe.steps.get(1, [])
    if len(steps) < 2:
        pytest.fail(f"plugin {name} trains fewer than 2 steps in experience 1: no step inside it to crash at")
    assert_resume_is_exact(None, overrides, tmp_path, crash_at=steps[len(steps) // 2])


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_builtin_plugin_annotations_resolve(name):
    """Type checkers and documentation tools read them: a nested ``Config`` is
    named through its class (``Replay.Config``), which resolves at module level."""
    import typing

    cls = PluginRegistry.load(autoload=False).get(name).load()
    for method in (cls.__init__, *(getattr(cls, n) for n in dir(cls) if not n.startswith("_"))):
        if callable(method) and hasattr(method, "__annotations__"):
            typing.get_type_hints(method)
