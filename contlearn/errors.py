"""Errors that reach the user as one clear message and an exit code.

The CLI catches :class:`ContlearnError` and prints its message without a
traceback; ``exit_code`` is 2 for usage and configuration errors (and a
missing optional package: nothing ran) and 1 for failures at run time.
"""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Iterable
from types import ModuleType


class ContlearnError(Exception):
    """Base class: an error whose message is meant for the user."""

    exit_code = 1


class ConfigError(ContlearnError):
    """A configuration, a command-line override or a name is wrong."""

    exit_code = 2


class PluginError(ContlearnError):
    """A plugin cannot be found, built or combined with the others."""

    exit_code = 2


class DataError(ContlearnError):
    """A data set is missing or its content does not fit the experiment."""

    exit_code = 1


class TrainingError(ContlearnError):
    """Training cannot go on (non-finite loss, an empty experience...)."""

    exit_code = 1


class CheckpointError(ContlearnError):
    """No usable checkpoint, or one that does not fit the run it is loaded into."""

    exit_code = 1


class MissingDependencyError(ContlearnError):
    """An optional package a feature needs is not installed (or fails to import);
    the message names the package and the extra that installs it. Nothing ran."""

    exit_code = 2


def optional_import(module: str, *, package: str, extra: str, needed_for: str) -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`MissingDependencyError`
    saying that ``needed_for`` needs ``package``, installed by ``contlearn[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{needed_for} needs the '{package}' package ({exc}); install it with: pip install 'contlearn[{extra}]'"
        ) from None


class Interrupted(ContlearnError):
    """The run was stopped on request (Ctrl-C) at a step boundary; the message
    says where, and which checkpoint holds the state to resume from."""

    exit_code = 130


def choices(valid: Iterable[object]) -> str:
    """Format valid names for an error message: ``'a', 'b', 'c'``."""
    names = sorted(valid, key=str)
    return ", ".join(repr(n) for n in names) if names else "(none)"


def one_line(exc: BaseException) -> str:
    """A library's error inside one of ours: ``Type: first line of its message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def command(*words: object) -> str:
    """A command line a message suggests, quoted where a shell needs it (a path
    with a space), so that it can be pasted as it is."""
    return shlex.join(str(word) for word in words)


def raised_in_a_hook(exc: BaseException) -> tuple[str, str] | None:
    """The plugin (its class, by module and name) and the hook whose
    implementation ``exc`` was raised in: the innermost such frame of its
    traceback (a hook a plugin calls from its own, or a wrapper around it, is
    further out), contlearn's own defaults left out; ``None`` when there is none."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        kind = type(owner)
        method = getattr(kind, frame.f_code.co_name, None) if owner is not None else None
        # what @hookimpl marks; the loop's defaults are contlearn's (a model's error passes through them)
        if getattr(method, "contlearn_impl", None) is not None and kind.__module__ != "contlearn.defaults":
            found = f"{kind.__module__}.{kind.__qualname__}", frame.f_code.co_name
        tb = tb.tb_next
    return found
