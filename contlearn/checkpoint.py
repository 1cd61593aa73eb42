"""Checkpoint files: the whole state of a run, written and read safely.

A checkpoint is one file in ``RUN_DIR/checkpoints/``, written by the loop after
every experience and, with ``checkpoint.every_n_steps``, inside experiences.
:func:`contlearn._run_state.capture` makes its content (the model's, the
optimizer's and every plugin's ``state_dict()``, the random states, the position
in the stream and the metrics so far) and :func:`contlearn._run_state.restore`
rebuilds a run from it. This module is the file: it is written atomically
(temporary file, fsync, rename), its name sorts in run order (``ckpt-<experiences
done>-<steps done>.pt``), and it loads with ``torch.load(weights_only=True)``:
loading never executes code. Every record's CRC-32 is checked before loading,
and :func:`latest` falls back to an older checkpoint when the newest is damaged
(see docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch

from contlearn.errors import CheckpointError

FORMAT = "contlearn-checkpoint"
VERSION = 1
DIRNAME = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d+)-(\d+)\.pt$")
_REQUIRED = ("config", "position", "model", "optimizer", "plugins", "rng", "metrics")
_REQUIRED_INSIDE = {
    "position": ("completed", "inside_experience", "epoch", "step", "global_step"),
    "metrics": ("accuracy_rows", "initial_accuracy", "confusion", "timings", "elapsed", "epoch_losses",
                "epoch_terms", "epoch_generator"),
    "rng": ("python", "numpy", "torch", "cuda", "generator"),
}
_MAPPINGS = ("config", "model", "plugins")  # sections that must be mappings (a hand edit may make them None)


class CheckpointWarning(UserWarning):
    """A resume goes on despite something about its checkpoint: a newer one was
    unreadable and an older one is used, or the run had other data, other plugins
    given in Python, or another number of processes."""


# --------------------------------------------------------------------- naming, files


def checkpoint_name(completed: int, global_step: int) -> str:
    """``ckpt-<experiences completed>-<training steps done>.pt``: names sort in run order."""
    return f"ckpt-{completed:03d}-{global_step:09d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files of ``directory``, oldest first (temporary files excluded)."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), key=_position)


def _position(path: Path) -> tuple[int, ...]:
    """(experiences completed, global step) of a checkpoint file's name."""
    match = _NAME.match(path.name)
    assert match is not None
    return tuple(int(g) for g in match.groups())


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Refuse anything but tensors and plain containers (what ``weights_only``
    loading accepts), naming where the offending value is."""
    if obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool)):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only tensors "
        f"and plain containers (dict, list, tuple, str, int, float, bool, None)"
    )


def write(directory: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` atomically as the next checkpoint of ``directory`` and
    delete all but the newest ``keep_last`` checkpoints."""
    check_plain(state)
    pos = state["position"]
    path = directory / checkpoint_name(pos["completed"], pos["global_step"])
    tmp = directory / f".{path.name}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write (a full disk) as RuntimeError
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
        else:
            detail = str(exc).strip().splitlines()
            reason = f"the write failed ({detail[0] if detail else type(exc).__name__}); {_free_space(directory)}"
        raise CheckpointError(f"cannot write checkpoint '{path}': {reason}") from None
    # Only older ones rotate out: a newer one can be an unreadable file a resume
    # skipped, which must not push out the checkpoints it resumed from.
    newest = _position(path)
    older = [p for p in list_checkpoints(directory) if _position(p) <= newest]
    for old in older[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def _free_space(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "is the disk full?"
    return f"{free / 2**20:.1f} MiB free on its disk"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(directory: Path) -> None:
    """Delete the temporary files a killed writer left behind."""
    if directory.is_dir():
        for p in directory.glob(".ckpt-*.tmp"):
            p.unlink(missing_ok=True)


def load_failure(exc: Exception) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` failed (at most 200 characters)."""
    # torch's weights_only refusal opens with advice to load unsafely; its reason is further down
    refused = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", str(exc), re.S)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = " ".join(refused.group(1).split()).split(". Please")[0] if refused else ""
    reason = reason or (lines[0] if lines else type(exc).__name__)
    if reason.isdigit():  # the unpickler's bare opcode of a file that is no torch.save output
        reason = f"not a file torch.save wrote: {type(exc).__name__} {reason}"
    return reason[:200]


def load(path: Path) -> dict[str, Any]:
    """Read one checkpoint with ``weights_only=True`` onto the CPU and check its format.

    :raises CheckpointError: unreadable (truncated, corrupt, not a checkpoint) or of another version.
    """
    with open(path, "rb") as f:  # an OSError (no permission) propagates: the file itself may be whole
        damaged = _crc_failure(f)
        if damaged is not None:  # torch.load does not check the CRC-32 torch.save writes for every record
            raise CheckpointError(f"checkpoint '{path.name}' is corrupt: its record '{damaged}' fails its CRC check")
        f.seek(0)
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, bad pickle, forbidden global...
            raise CheckpointError(f"checkpoint '{path.name}' is truncated or corrupt ({load_failure(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path.name}' is not a contlearn checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint '{path.name}' has format version {state.get('version')}; this contlearn reads {VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in state]
    missing += [f"{section}.{k}" for section, keys in _REQUIRED_INSIDE.items() if section in state for k in keys
                if not isinstance(state[section], dict) or k not in state[section]]
    if missing:
        raise CheckpointError(f"checkpoint '{path.name}' is incomplete: it lacks {missing}")
    malformed = [k for k in _MAPPINGS if not isinstance(state[k], dict)]
    if malformed:
        raise CheckpointError(f"checkpoint '{path.name}' is malformed: {malformed} should be mappings")
    return state


def _crc_failure(f: BinaryIO) -> str | None:
    """The first record of the zip archive ``f`` whose bytes fail their CRC-32
    (a bit flipped on the disk), or ``None``; also ``None`` for a file that is
    not a whole archive, which ``torch.load`` then describes. Records stored
    with a CRC of 0 are not checked: ``torch.serialization.set_crc32_options(False)``
    writes none."""
    try:
        archive = zipfile.ZipFile(f)
        for info in archive.infolist():
            if info.CRC == 0:
                continue
            try:
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
            except zipfile.BadZipFile:  # "Bad CRC-32 for file ..."
                return info.filename
    except Exception:  # not a zip, or cut short
        return None
    return None


def latest(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``directory`` that loads; each newer one that does
    not is reported with a :class:`CheckpointWarning` naming it and the one used.

    :raises CheckpointError: no checkpoint, or none readable.
    """
    paths = list_checkpoints(directory)
    if not paths:
        raise CheckpointError(f"no checkpoint in '{directory}': nothing to resume")
    problems: list[str] = []
    for path in reversed(paths):
        try:
            state = load(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            warnings.warn(f"{problem}; using the previous one, '{path.name}'", CheckpointWarning, stacklevel=2)
        return path, state
    raise CheckpointError(f"no readable checkpoint in '{directory}': {'; '.join(problems)}")
