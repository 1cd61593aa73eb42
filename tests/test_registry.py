"""Plugin discovery: built-ins by short name, third-party plugins through a
real entry point (a dist-info directory on sys.path), broken plugins reported."""

from __future__ import annotations

import re
import sys
import textwrap
import warnings

import pytest

from contlearn import Experiment, PluginError, load_config
from contlearn._registry import (
    BUILTIN_PLUGINS,
    DISABLE_AUTOLOAD_ENV,
    PluginLoadWarning,
    PluginRegistry,
)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Installs, on sys.path, a distribution 'cl-extras' with one working plugin
    ('shout') and one broken one ('broken')."""
    (tmp_path / "cl_extras.py").write_text(
        textwrap.dedent(
            '''
            from dataclasses import dataclass
            from contlearn import hookimpl

            class Shout:
                """Counts training steps."""

                @dataclass
                class Config:
                    volume: int = 3

                def __init__(self, config):
                    self.config = config
                    self.steps = 0

                @hookimpl
                def after_step(self, run):
                    self.steps += 1
            '''
        )
    )
    (tmp_path / "cl_broken.py").write_text("raise ImportError('needs a missing library')\n")
    dist = tmp_path / "cl_extras-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cl-extras\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text(
        "[contlearn.plugins]\nshout = cl_extras:Shout\nbroken = cl_broken:Plugin\nloud.shout = cl_extras:Shout\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("cl_extras", None)


def test_builtins_are_listed_by_short_name():
    registry = PluginRegistry.load(autoload=False)
    assert set(BUILTIN_PLUGINS) <= set(registry.names())
    assert registry.get("finetune").source == "builtin"


def test_entry_point_plugin_is_found_and_runs_and_the_broken_ones_are_reported_once(third_party):
    with pytest.warns(PluginLoadWarning) as caught:
        registry = PluginRegistry.load()
    entry = registry.get("shout")
    assert entry.source == "cl-extras 1.2"
    with warnings.catch_warnings(record=True) as later:  # a config, its check and a run load the plugins again
        warnings.simplefilter("always")
        cfg = load_config(None, ["train.epochs=1", "eval.fwt=false", "plugins.shout.volume=5"])
        exp = Experiment(cfg)
        exp.run()
    assert cfg.plugins.shout.volume == 5
    assert exp.run_state.plugins["shout"].steps > 0
    assert len(caught) == 2  # 'broken' and 'loud.shout'
    assert not [w for w in later if issubclass(w.category, PluginLoadWarning)]
    with pytest.raises(PluginError, match="needs a missing library"):  # still refused by name
        PluginRegistry.load().get("broken")


def test_broken_entry_point_warns_with_name_and_distribution(third_party):
    with pytest.warns(PluginLoadWarning) as caught:
        registry = PluginRegistry.load()
    assert any(re.search(r"'broken'.*cl-extras 1\.2.*needs a missing library", str(w.message)) for w in caught)
    assert "shout" in registry.names() and "broken" not in registry.names()
    with pytest.raises(PluginError, match="broken.*cl-extras"):
        registry.get("broken")


def test_a_broken_plugin_a_run_asks_for_is_one_error_not_a_warning_too(third_party, tmp_path, capsys):
    from contlearn.cli import main

    assert main(["run", "plugins.broken={}", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("needs a missing library") == 1 and "error: plugin 'broken' (cl_broken:Plugin" in err, err
    assert "'loud.shout' from cl-extras 1.2 has a name that cannot be its config key" in err  # not asked for: warned


def test_an_entry_point_whose_name_cannot_be_a_config_key_is_reported_not_listed(third_party):
    with pytest.warns(PluginLoadWarning) as caught:
        registry = PluginRegistry.load()
    assert any("'loud.shout' from cl-extras 1.2 has a name that cannot be its config key" in str(w.message) for w in caught)
    assert "loud.shout" not in registry.names() and "shout" in registry.names()


def test_autoload_can_be_disabled(third_party, monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry = PluginRegistry.load()
    assert "shout" not in registry.names()
    with pytest.raises(PluginError, match="unknown plugin 'shout'"):
        registry.get("shout")


def test_wrong_plugin_field_type(third_party):
    from contlearn import ConfigError

    with pytest.warns(PluginLoadWarning), pytest.raises(ConfigError, match="plugins.shout.volume"):
        load_config(None, ["plugins.shout.volume=loud"])
    with pytest.raises(ConfigError, match="plugins.shout.pitch.*'volume'"):  # the broken one reported already
        load_config(None, ["plugins.shout.pitch=1"])


def test_choices_lists_names_of_any_type_in_order():
    from contlearn.errors import choices

    assert choices(["b", 3, "a"]) == "3, 'a', 'b'"


def test_the_class_an_entry_point_names_may_be_given_under_its_name_too(third_party):
    """A script written before the plugin was installed passes the class by name."""
    import cl_extras

    with pytest.warns(PluginLoadWarning):
        cfg = load_config(None, ["plugins.shout.volume=5"], plugins={"shout": cl_extras.Shout})
    assert cfg.plugins.shout.volume == 5

    class Other(cl_extras.Shout):
        pass

    with pytest.raises(PluginError, match="the plugin class Other is given as 'shout', the name of a plugin from "
                                          "cl-extras"):
        load_config(None, [], plugins={"shout": Other})


# ----------------------------------------------------------------------------- classes a command line names

def test_a_plugin_class_is_named_by_file_or_by_module(plugin_file):
    from contlearn._registry import plugin_classes_from_targets

    by_file = plugin_classes_from_targets([f"anchor={plugin_file}:Anchor"])["anchor"]
    assert by_file.__name__ == "Anchor" and by_file.__module__ == plugin_file.stem
    assert plugin_classes_from_targets([f"a2={plugin_file.stem}:Anchor"]) == {"a2": by_file}  # its folder is on the path now
    cfg = load_config(None, ["plugins.anchor.weight=0.5"], plugins={"anchor": by_file})
    assert cfg.plugins.anchor.weight == 0.5


@pytest.mark.parametrize(
    "target, message",
    [
        ("anchor", "--plugin 'anchor': give NAME=path/to/file.py:Class or NAME=package.module:Class"),
        ("anchor={file}", "give NAME=path/to/file.py:Class"),
        ("={file}:Anchor", "give NAME=path/to/file.py:Class"),
        ("anchor={dir}/missing.py:Anchor", "--plugin anchor={dir}/missing.py:Anchor: no such file {dir}/missing.py"),
        ("anchor={dir}/syntax.py:Anchor", "importing {dir}/syntax.py failed: SyntaxError: "),
        ("anchor={dir}/raises.py:Anchor", "importing {dir}/raises.py failed: RuntimeError: no GPU here (at {dir}/raises.py:2)"),
        ("anchor=no_such_module_here:Anchor", "importing no_such_module_here failed: ModuleNotFoundError"),
        ("anchor={file}:Ancher", "has no attribute 'Ancher'; the classes it defines: Anchor"),
        ("anchor={file}:NOT_A_CLASS", "has int, not a class, as 'NOT_A_CLASS'; the classes it defines: Anchor"),
        ("anchor={dir}/queue.py:Anchor", "the file's module name 'queue' is that of "),
        ("a.b={file}:Anchor", "is given as 'a.b', which cannot be its config key"),
    ],
)
def test_a_bad_plugin_target_is_one_clear_error(plugin_file, target, message):
    from contlearn._registry import plugin_classes_from_targets

    folder = plugin_file.parent
    (folder / "syntax.py").write_text("def f(:\n")
    (folder / "raises.py").write_text("import os\nraise RuntimeError('no GPU here')\n")
    (folder / "queue.py").write_text(plugin_file.read_text())
    fill = {"file": plugin_file, "dir": folder}
    with pytest.raises(PluginError) as caught:
        plugin_classes_from_targets([target.format(**fill)])
    assert message.format(**fill) in str(caught.value)
    assert "queue" not in sys.modules or not sys.modules["queue"].__file__.startswith(str(folder))


def test_a_plugin_name_given_twice_is_refused(plugin_file):
    from contlearn._registry import plugin_classes_from_targets

    with pytest.raises(PluginError, match="the plugin name 'anchor' is given twice"):
        plugin_classes_from_targets([f"anchor={plugin_file}:Anchor", f"anchor={plugin_file}:Anchor"])
