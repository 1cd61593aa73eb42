"""Every Python code block in the README and docs runs, and meta-checks that
every hook and every built-in plugin is documented."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest

from contlearn import hookspecs
from contlearn._registry import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
HOOKS = sorted(n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "contlearn_spec"))


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_fences_open_with_a_language_and_close_alone(path):
    """A fence closed with text after it (CommonMark) runs on, swallowing what follows."""
    fences = [(k + 1, line) for k, line in enumerate(path.read_text(encoding="utf-8").splitlines())
              if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"{path.name}: an unclosed code fence"
    for (n_open, opening), (n_close, closing) in zip(fences[::2], fences[1::2], strict=True):
        assert re.fullmatch(r"\s*```[\w+-]+", opening), f"{path.name}:{n_open}: {opening!r} opens no language"
        assert closing.strip() == "```", f"{path.name}:{n_close}: {closing!r} does not close its fence alone"


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    """The blocks of one page run in order in one module (dataclasses need a real one)."""
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for k, code in enumerate(python_blocks(path)):
        exec(compile(code, f"{path.name}[block {k}]", "exec"), module.__dict__)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_has_a_docstring(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert ":return:" in doc and ":param run:" in doc, f"{hook} must say its parameters and return"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_concepts_table(hook):
    assert f"`{hook}(" in (ROOT / "docs" / "concepts.md").read_text()


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_every_builtin_plugin_has_a_docs_page(name):
    page = ROOT / "docs" / "plugins" / f"{name}.md"
    assert page.is_file(), f"docs/plugins/{name}.md is missing"
    text = page.read_text()
    assert "## Config" in text and "## Result" in text, f"{page.name} needs Config and Result sections"


def config_table(name: str) -> dict[str, str | None]:
    """Field -> documented default (backticked, as YAML) of the "## Config" table of a
    plugin's page; a row may list several fields, with one default each or one for all."""
    section = (ROOT / "docs" / "plugins" / f"{name}.md").read_text().split("## Config", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]
    documented: dict[str, str | None] = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        names, defaults = re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]*)`", cells[1])
        for k, field in enumerate(names):
            documented[field] = defaults[k] if len(defaults) == len(names) else defaults[0] if len(defaults) == 1 else None
    return documented


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_every_plugin_config_field_is_documented_with_its_default(name):
    import dataclasses

    from omegaconf import OmegaConf

    from contlearn._registry import PluginRegistry

    config = PluginRegistry.load(autoload=False).get(name).config_class
    fields = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
              for f in dataclasses.fields(config)} if config is not None else {}
    documented = config_table(name)
    assert set(documented) == set(fields), f"docs/plugins/{name}.md's Config table vs {name}.Config"
    for field, default in fields.items():
        text = documented[field]
        if text is None or "..." in text:  # no default given for this field, or an abbreviated list
            continue
        assert OmegaConf.to_container(OmegaConf.create(f"v: {text}"))["v"] == default, f"{name}.{field}"


def test_the_configuration_reference_lists_every_option_with_its_default():
    """docs/configuration.md's YAML block is the schema: every option, every default."""
    from omegaconf import OmegaConf

    from contlearn.config import ExperimentConfig

    text = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(r"^```yaml\n(.*?)^```", text, re.S | re.M).group(1)
    documented = OmegaConf.to_container(OmegaConf.create(block))
    schema = OmegaConf.to_container(OmegaConf.structured(ExperimentConfig))
    documented.pop("base")
    assert documented.pop("name") == "my-experiment"  # an example value
    schema.pop("name")
    assert documented == schema
