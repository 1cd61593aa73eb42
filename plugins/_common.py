"""Helpers the built-in strategies share: seeds for their own generators, checks of
their config fields (their model copies come from :mod:`contlearn.snapshots`)."""

from __future__ import annotations

import re
import zlib

from contlearn.errors import ConfigError


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
