"""Seeds for the built-in strategies' own generators (their model copies come from :mod:`contlearn.snapshots`)."""

from __future__ import annotations

import zlib


def plugin_generator(seed: int, name: str) -> int:
    """A seed for a plugin's own CPU generator, derived from the run seed and the
    plugin's name, so plugins do not share (or shift) the loop's random stream."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
