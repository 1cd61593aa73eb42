"""Where ``torchrun`` puts this process, read from its environment variables.

Kept apart from :mod:`contlearn.distributed` (which needs torch) so that the
command line can name the process in a message before torch is imported.
"""

from __future__ import annotations

import os

from contlearn.errors import ConfigError


def environment_rank() -> int:
    """This process's rank as ``torchrun`` sets it (``RANK``), 0 without it."""
    return environment_int("RANK", 0)


def environment_world_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``), 1 without it."""
    return environment_int("WORLD_SIZE", 1)


def environment_int(name: str, default: int) -> int:
    """The non-negative integer in the environment variable ``name`` (``default`` without it)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(f"the environment variable {name} must be a non-negative integer (torchrun sets it), got {value!r}")
    return number
