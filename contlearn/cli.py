"""The ``contlearn`` command.

``contlearn run [CONFIG_OR_NAME] [key=value ...] [--out DIR] [--quiet] [-p NAME=FILE.py:CLASS ...]``,
``contlearn plugins [NAME ...]``, ``contlearn show-config CONFIG_OR_NAME [key=value ...]``,
``contlearn report RUN_DIR [RUN_DIR ...] [--out DIR]``,
``contlearn resume RUN_DIR [key=value ...] [--quiet]``,
``contlearn unlearn RUN_DIR (--classes C ... | --samples I ...) [--alpha A --lam L | --auto [--target T]]``.
Errors meant for the user print one line to stderr and exit with 2 (usage and
config) or 1 (run time), without a traceback. ``-p NAME=FILE.py:CLASS`` (run,
resume, unlearn, show-config, plugins) gives a plugin class of one's own, as
``Experiment(plugins={NAME: CLASS})`` does. The first Ctrl-C (or SIGTERM)
during a run finishes the current step, writes a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from contlearn.errors import (
    ConfigError,
    ContlearnError,
    Interrupted,
    command,
    one_line,
    raised_in_a_hook,
)

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a shell reports a process SIGPIPE stopped: 128 + 13


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 on usage errors too
        raise ConfigError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    from contlearn import __version__

    parser = _Parser(prog="contlearn", description="A plugin-based continual-learning framework.")
    parser.add_argument("--version", action="version", version=f"contlearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run an experiment")
    run.add_argument(
        "config", nargs="?", default=None,
        help="YAML file or shipped experiment name (default: split-digits; a leading key=value is an override)",
    )
    run.add_argument("overrides", nargs="*", help="key=value overrides")
    run.add_argument("--out", default=None, help="run directory (default runs/<name>-<timestamp>)")
    run.add_argument("--quiet", action="store_true", help="print only the final table")
    run.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard")
    _add_plugin_option(run)

    plugins = sub.add_parser("plugins", help="list available plugins and their config fields")
    plugins.add_argument("names", nargs="*", metavar="NAME", help="plugins to show (default: all)")
    _add_plugin_option(plugins)

    show = sub.add_parser("show-config", help="print the merged config of an experiment")
    show.add_argument("config", nargs="?", default=None, help="YAML file or shipped experiment name (default: split-digits)")
    show.add_argument("overrides", nargs="*", help="key=value overrides")
    _add_plugin_option(show)

    sub.add_parser("configs", help="list the experiments shipped with the package")

    report = sub.add_parser("report", help="plots and Markdown tables of finished runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    report.add_argument("--out", default=None, help="where to compare several runs (default: the first RUN_DIR)")

    resume = sub.add_parser("resume", help="continue a run from its newest checkpoint")
    resume.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    resume.add_argument("overrides", nargs="*", default=[], help="key=value overrides (device, threads, checkpoint.*)")
    resume.add_argument("--quiet", action="store_true", help="print only the final table")
    resume.add_argument("--tensorboard", action="store_true", help="also log to RUN_DIR/tensorboard")
    _add_plugin_option(resume)

    unlearn = sub.add_parser("unlearn", help="make a run's model forget classes or samples (SSD), into a new run dir")
    unlearn.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    what = unlearn.add_mutually_exclusive_group(required=True)
    what.add_argument("--classes", nargs="+", metavar="C", help="class names, as the data set calls them")
    what.add_argument("--samples", nargs="+", type=int, metavar="I", help="indices into the training data seen")
    unlearn.add_argument(
        "--experience", type=int, default=None,
        help="with --samples: the indices count within this experience's training data (default: all data seen)",
    )
    unlearn.add_argument("--alpha", type=float, default=None, help="selection threshold (default: plugins.ssd.alpha)")
    unlearn.add_argument("--lam", type=float, default=None, help="dampening constant (default: plugins.ssd.lam)")
    unlearn.add_argument("--auto", action="store_true", help="choose alpha and lambda until the target is met")
    unlearn.add_argument(
        "--target", type=float, default=None,
        help="--auto: accuracy on the forget set's training samples to reach (default: plugins.ssd.target)",
    )
    unlearn.add_argument(
        "--fisher", choices=["batch", "per_sample"], default=None,
        help="importance estimator (default: plugins.ssd.fisher)",
    )
    unlearn.add_argument(
        "--batch-size", type=int, default=None, help="batches of the importance passes (default: plugins.ssd.batch_size)"
    )
    unlearn.add_argument(
        "--fisher-d-order", choices=["class", "data"], default=None,
        help="F_D's batches grouped by class, or in the data's order (default: plugins.ssd.fisher_d_order)",
    )
    unlearn.add_argument("--recompute-fisher", action="store_true", help="recompute F_D instead of the cached one")
    unlearn.add_argument("--out", default=None, help="new run directory (default RUN_DIR/unlearn-<k>)")
    unlearn.add_argument("--device", default=None, help="where to unlearn: auto, cpu, cuda[:k] (default: the run's device)")
    unlearn.add_argument("--threads", type=int, default=None, help="CPU threads (default: the run's threads setting)")
    _add_plugin_option(unlearn)
    return parser


def _add_plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p", "--plugin", action="append", default=[], metavar="NAME=FILE.py:CLASS",
        help="a plugin class of one's own, active under NAME (also NAME=package.module:CLASS); repeatable",
    )


def _given_classes(args: argparse.Namespace) -> dict[str, type]:
    """The plugin classes ``-p NAME=FILE.py:CLASS`` gives."""
    from contlearn._registry import plugin_classes_from_targets

    return plugin_classes_from_targets(getattr(args, "plugin", []))


def _activated(classes: dict[str, type], overrides: list[str]) -> list[str]:
    """A class given with ``-p`` is active, as one given to ``Experiment(plugins=...)``:
    an empty section keeps what the config and overrides set."""
    return [*overrides, *(f"plugins.{name}={{}}" for name in classes)]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; overrides may also follow options
    (``contlearn run NAME --quiet train.lr=0.1``), which argparse alone refuses."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def _split_config_arg(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``contlearn run train.lr=0.1`` means the default experiment with an override."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def _command_plugins(args: argparse.Namespace, out: str | Path) -> dict:
    """The plugins a command-line run adds: progress display and loggers."""
    from contlearn._environment import environment_rank
    from contlearn.loggers import JSONLLogger, TensorBoardLogger
    from contlearn.reporting import progress_plugins

    if environment_rank() != 0:  # under torchrun, process 0 displays and logs
        return {}
    plugins = progress_plugins(args.quiet)
    plugins["events"] = JSONLLogger(Path(out) / "events.jsonl")
    if args.tensorboard:
        plugins["tensorboard"] = TensorBoardLogger(Path(out) / "tensorboard")
    return plugins


def _run_to_the_end(experiment, out: str | Path) -> int:
    """Run (Ctrl-C: checkpoint and exit 130), then write the report and print the table."""
    from contlearn._environment import environment_rank
    from contlearn.report import write_report

    try:
        with experiment.interruptible():
            experiment.run()
        if environment_rank() != 0:
            return 0
        try:
            write_report([out])
        except ContlearnError as exc:  # a full disk, say: the run itself is finished and its results kept
            print(experiment.summary_text())
            print(f"error: the run finished and its results are in {out}, but its report could not be written "
                  f"({exc}); write it with: {command('contlearn', 'report', out)}", file=sys.stderr)
            return exc.exit_code
    except KeyboardInterrupt:
        if experiment.results is None or not (Path(out) / "results.json").is_file():
            raise
        # the run is finished and its results written (a Ctrl-C in the plugins' teardown, or the report's)
        print(f"error: the run finished and its results are in {out}, but the report was interrupted; "
              f"write it with: {command('contlearn', 'report', out)}", file=sys.stderr)
        return 130
    print(experiment.summary_text())
    print(f"\nrun directory: {out}")
    return 0


def _refuse_empty_out(out: str | None, what: str) -> None:
    """``--out ""`` (an unset shell variable, say) would mean the default or the current directory."""
    if out is not None and not out.strip():
        raise ConfigError(f"--out is empty: give {what}")


def cmd_run(args: argparse.Namespace) -> int:
    from contlearn.config import load_config
    from contlearn.experiment import Experiment
    from contlearn.results import default_run_dir

    _refuse_empty_out(args.out, "the run directory")
    source, overrides = _split_config_arg(args.config, args.overrides)
    classes = _given_classes(args)
    cfg = load_config(source, _activated(classes, overrides), plugins=classes)
    out = args.out = args.out or cfg.out or default_run_dir(cfg.name)  # args.out: where an error says it is
    return _run_to_the_end(Experiment(cfg, out_dir=out, plugins={**classes, **_command_plugins(args, out)}), out)


def cmd_resume(args: argparse.Namespace) -> int:
    from contlearn.experiment import Experiment

    plugins = {**_given_classes(args), **_command_plugins(args, args.run_dir)}
    return _run_to_the_end(Experiment.resume(args.run_dir, args.overrides, plugins=plugins), args.run_dir)


def cmd_unlearn(args: argparse.Namespace) -> int:
    from contlearn.plugins._unlearn_run import summary, unlearn_run_dir

    _refuse_empty_out(args.out, "the directory to write the unlearnt run to")
    if args.auto and (args.alpha is not None or args.lam is not None):
        raise ConfigError("contlearn unlearn: give either --alpha/--lam or --auto, not both")
    if args.target is not None and not args.auto:
        raise ConfigError("contlearn unlearn: --target needs --auto")
    request = {
        "classes": args.classes, "samples": args.samples, "experience": args.experience, "alpha": args.alpha,
        "lam": args.lam, "auto": args.auto or None, "target": args.target, "fisher": args.fisher,
        "batch_size": args.batch_size, "fisher_d_order": args.fisher_d_order, "recompute": args.recompute_fisher or None,
    }  # fmt: skip
    where = [f"{key}={value}" for key, value in (("device", args.device), ("threads", args.threads)) if value is not None]
    report, out = unlearn_run_dir(args.run_dir, {k: v for k, v in request.items() if v is not None}, args.out,
                                  overrides=where, plugins=_given_classes(args))
    print(summary(report))
    print(f"\nnew run directory: {out}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from contlearn._config_merge import field_defaults
    from contlearn._registry import PluginRegistry

    overrides = [name for name in args.names if "=" in name]
    if overrides:
        raise ConfigError(f"contlearn plugins: unrecognized arguments: {' '.join(overrides)} (it takes plugin names)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = PluginRegistry.load(given=_given_classes(args), given_source="given with --plugin")
    for name in args.names:
        registry.get(name)  # an unknown name is refused, with the available ones
    for name in args.names or registry.names():
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
        for field_name, default in field_defaults(config_cls).items():
            print(f"    {field_name} = {'(required)' if default is dataclasses.MISSING else repr(default)}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    from contlearn.config import load_config, to_yaml

    source, overrides = _split_config_arg(args.config, args.overrides)
    classes = _given_classes(args)
    print(to_yaml(load_config(source, _activated(classes, overrides), plugins=classes)), end="")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from contlearn.config import shipped_configs

    print("\n".join(shipped_configs()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from contlearn.report import comparison_markdown, load_runs, write_runs_report

    _refuse_empty_out(args.out, "where to write the comparison")
    runs = load_runs(args.run_dirs)
    for path in write_runs_report(runs, args.out):
        print(f"wrote {path}")
    print()
    print(comparison_markdown(runs), end="")
    return 0


COMMANDS = {"report": cmd_report, "resume": cmd_resume, "unlearn": cmd_unlearn, "run": cmd_run, "plugins": cmd_plugins, "show-config": cmd_show_config, "configs": cmd_configs}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    """contlearn's own warnings (a broken plugin, a skipped checkpoint) as one
    line, each once per command (the plugins are loaded more than once)."""
    if category.__module__.split(".")[0] == "contlearn":
        if category.__name__ == "ConfigWarning" and _process() not in ("", "[rank 0] "):
            return  # every process reads the same config: process 0 says it
        if str(message) not in _shown:
            _shown.add(str(message))
            print(f"{_process()}warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning
_shown: set[str] = set()


def _process() -> str:
    """Under ``torchrun``, which process a line comes from (every one reports its errors)."""
    from contlearn._environment import (  # no torch: an early Ctrl-C
        environment_rank,
        environment_world_size,
    )

    try:
        return f"[rank {environment_rank()}] " if environment_world_size() > 1 else ""
    except ContlearnError:  # a malformed environment: the error being printed says so
        return ""


#: What gloo and NCCL say when another process of the group is gone.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _lost_a_peer(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective that failed because another process of a
    torchrun run stopped (its own error is its to report)."""
    from contlearn._environment import environment_world_size

    backend_error = getattr(getattr(sys.modules.get("torch"), "distributed", None), "DistBackendError", ())
    return environment_world_size() > 1 and (
        isinstance(exc, backend_error) or any(text in str(exc) for text in _PEER_LOST)
    )


def _failed_in_a_plugin(exc: Exception, args: argparse.Namespace | None) -> int:
    """An unexpected error (a bug) raised in a plugin's hook: its traceback, then
    which plugin and hook, and what of the run is kept. Any other is raised on
    (a bug of contlearn's, or of the model: the traceback says where)."""
    from contlearn import checkpoint as ckpt
    from contlearn._registry import plugin_options

    where = raised_in_a_hook(exc)
    if where is None:
        raise exc
    traceback.print_exception(exc, file=sys.stderr)
    command_name = getattr(args, "command", None)
    run_dir = getattr(args, "run_dir", None) if command_name == "resume" else getattr(args, "out", None)
    kept = ""
    if command_name == "unlearn" and args is not None:
        kept = f"; the run directory {args.run_dir} is unchanged"
    elif run_dir is not None and ckpt.list_checkpoints(Path(run_dir) / ckpt.DIRNAME):
        again = (plugin_options(_given_classes(args)) or []) if args is not None else []
        kept = (f"; the run's checkpoints are kept: once it is fixed, continue with: "
                f"{command('contlearn', 'resume', run_dir, *again)}")
    print(f"{_process()}error: plugin {where[0]} raised {type(exc).__name__} in its hook '{where[1]}' (above){kept}",
          file=sys.stderr)
    return 1


def _silence_stdout() -> None:
    """Point standard output at the null device, so that the interpreter's final
    flush of what is still buffered does not fail on the closed pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured, replaced)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    code = _dispatch(argv)
    if code == EXIT_INTERRUPTED and argv is None:
        _ignore_further_stops()
    return code


def _ignore_further_stops() -> None:
    """The console script stopped on Ctrl-C or SIGTERM and is exiting: the same
    signal again (pressed to hurry it) would land in the exit itself, a
    traceback from an ``atexit`` callback, so the process ignores it now."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def _dispatch(argv: Sequence[str] | None) -> int:
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    _shown.clear()
    args = None
    try:
        if not (sys.argv[1:] if argv is None else list(argv)):
            _parser().print_help()
            return 0
        args = _parse(argv)
        return COMMANDS[args.command](args)
    except Interrupted as exc:
        print(f"{_process()}{exc}", file=sys.stderr)
        return exc.exit_code
    except ContlearnError as exc:
        print(f"{_process()}error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{_process()}interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as exc:
        if not _lost_a_peer(exc):
            return _failed_in_a_plugin(exc, args)
        # the process that failed printed its own error; this one only lost it mid-collective
        print(f"{_process()}error: another process of this run stopped ({one_line(exc)}); stopping too",
              file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of our output went away (``contlearn plugins | head -1``)
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.filename is None or raised_in_a_hook(exc) is not None:  # a bug, or the network: the traceback helps
            return _failed_in_a_plugin(exc, args)
        print(f"{_process()}error: {exc}", file=sys.stderr)  # a file or folder this user cannot read or write
        return 1
    except Exception as exc:
        return _failed_in_a_plugin(exc, args)
    finally:
        warnings.showwarning = previous
