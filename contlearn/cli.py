"""The ``contlearn`` command.

``contlearn run [CONFIG_OR_NAME] [key=value ...] [--out DIR] [--quiet]``,
``contlearn plugins``, ``contlearn show-config CONFIG_OR_NAME [key=value ...]``.
Errors meant for the user print one line to stderr and exit with 2 (usage and
config) or 1 (run time), without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Sequence

from contlearn.errors import ConfigError, ContlearnError

EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors too
        raise ConfigError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="contlearn", description="A plugin-based continual-learning framework.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run an experiment")
    run.add_argument("config", nargs="?", default=None, help="YAML file or shipped experiment name")
    run.add_argument("overrides", nargs="*", help="key=value overrides")
    run.add_argument("--out", default=None, help="run directory (default runs/<name>-<timestamp>)")
    run.add_argument("--quiet", action="store_true", help="print only the final table")

    sub.add_parser("plugins", help="list available plugins and their config fields")

    show = sub.add_parser("show-config", help="print the merged config of an experiment")
    show.add_argument("config", help="YAML file or shipped experiment name")
    show.add_argument("overrides", nargs="*", help="key=value overrides")

    sub.add_parser("configs", help="list the experiments shipped with the package")
    return parser


def _split_config_arg(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``contlearn run train.lr=0.1`` means the default experiment with an override."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def cmd_run(args: argparse.Namespace) -> int:
    from contlearn.config import load_config
    from contlearn.experiment import Experiment
    from contlearn.reporting import ConsoleProgress
    from contlearn.results import default_run_dir

    source, overrides = _split_config_arg(args.config, args.overrides)
    cfg = load_config(source, overrides)
    out = args.out or cfg.out or default_run_dir(cfg.name)
    plugins = {} if args.quiet else {"console": ConsoleProgress()}
    experiment = Experiment(cfg, out_dir=out, plugins=plugins)
    experiment.run()
    print(experiment.summary_text())
    print(f"\nrun directory: {out}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from contlearn._registry import PluginRegistry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = PluginRegistry.load()
    for name in registry.names():
        entry = registry.get(name)
        try:
            cls = entry.load()
        except ContlearnError as exc:
            print(f"{name}  [{entry.source}]  BROKEN: {exc}")
            continue
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name}  [{entry.source}]  {doc[0] if doc else ''}")
        config_cls = getattr(cls, "Config", None)
        if config_cls is None:
            print("    (no config fields)")
            continue
        for f in dataclasses.fields(config_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"    {f.name} = {default!r}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    from contlearn.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from contlearn.config import shipped_configs

    print("\n".join(shipped_configs()))
    return 0


COMMANDS = {"run": cmd_run, "plugins": cmd_plugins, "show-config": cmd_show_config, "configs": cmd_configs}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except ContlearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
