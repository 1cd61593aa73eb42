"""One process at a time in a run directory.

A run, a resume and an unlearning hold an advisory lock on ``RUN_DIR/.lock``
(``fcntl.flock``) while they read and write the directory; a second one is
refused with the first one's process id instead of mixing their checkpoints,
rotating each other's away and replacing each other's event log. The system
releases the lock when its process ends, however it ends (a SIGKILL included),
so a crashed run resumes as before. Where ``fcntl`` does not exist (Windows)
nothing is locked.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import IO

from contlearn.errors import ConfigError

LOCK_NAME = ".lock"


class RunLock:
    """The lock of one run directory, held until :meth:`release`."""

    def __init__(self, file: IO[str], path: Path):
        self._file: IO[str] | None = file
        self.path = path

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None


def hold(run_dir: Path, what: str) -> RunLock | None:
    """Take ``run_dir``'s lock for this process (``run_dir`` must exist), saying
    ``what`` holds it (``contlearn run``).

    :raises ConfigError: another process holds it, named with what it is doing.
    :return: the lock, or ``None`` where the system has no ``fcntl`` or the
        directory cannot be written (a reader of a read-only run directory).
    """
    try:
        import fcntl
    except ImportError:
        return None
    path = run_dir / LOCK_NAME
    try:
        file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- held until release()
    except OSError:  # a directory this process may only read: nothing to protect it from here
        return None
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held elsewhere
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise ConfigError(
            f"'{run_dir}' is in use by {holder}: wait until it ends (or stop it) before starting another "
            f"run, resume or unlearning there"
        ) from None
    file.seek(0)
    file.truncate()
    file.write(f"process {os.getpid()} ({what}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    file.flush()
    return RunLock(file, path)


@contextlib.contextmanager
def holding(run_dir: Path, what: str):  # type: ignore[no-untyped-def]
    """:func:`hold` for the duration of a ``with`` block."""
    lock = hold(run_dir, what)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def refuse_if_in_use(run_dir: Path, what: str) -> None:
    """:raises ConfigError: another process holds ``run_dir``'s lock (checked
    before reading its checkpoints; nothing is created in a directory without one)."""
    if (run_dir / LOCK_NAME).exists():
        with holding(run_dir, what):
            pass
