"""What a run trains on, as a checkpoint records it, and the check a resume makes.

A resume must continue on the stream the run trained on: the setting, the class
order, each experience's classes, task, sizes and input shift are compared
exactly, and a cheap checksum of each experience's inputs tells other data of
the same shape (another download or preprocessing) with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch

from contlearn.checkpoint import CheckpointWarning
from contlearn.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from contlearn.scenarios import Stream


def stream_signature(stream: Stream) -> dict[str, Any]:
    """What a run trains on, as far as a resume can check it cheaply: the setting,
    the original label of each class id (the class order), each experience's
    classes, task label, numbers of training and test samples, and input shift
    (its ``repr``: a permutation's length and first entries, a rotation's angle),
    and a checksum of each experience's inputs (:func:`data_checksum`)."""
    return {
        "setting": str(stream.setting),
        "class_names": [str(c) for c in stream.class_names],
        "experiences": [
            [[int(c) for c in exp.classes], int(exp.task), len(exp.train), len(exp.test), _describe_shift(exp.shift)]
            for exp in stream
        ],
        "data": [[data_checksum(exp.train), data_checksum(exp.test)] for exp in stream],
    }


#: samples of a data set that :func:`data_checksum` reads, and input elements of theirs it hashes, at most
CHECKSUM_SAMPLES, CHECKSUM_ELEMENTS = 256, 4096


def data_checksum(data: Any) -> str | None:
    """A cheap checksum of a data set: a BLAKE2 hash of the bytes of up to
    :data:`CHECKSUM_ELEMENTS` input elements, at evenly spaced positions of up to
    :data:`CHECKSUM_SAMPLES` evenly spaced samples, and of those samples' labels.
    Only the picked elements are read (gathered where they lie, on any device),
    and bytes hash alike on every device and whatever the values (NaN included).
    ``None`` for data read through a DataLoader (nothing is held to read).
    Computed once per data object (a run's data do not change)."""
    try:
        return _CHECKSUMS[data]
    except (KeyError, TypeError):  # not computed yet, or data that cannot be a weak key
        pass
    try:
        x, y = data.x, data.y
    except (AttributeError, DataError):  # data read through a DataLoader holds no x
        return None
    if not torch.is_tensor(x) or not torch.is_tensor(y):
        return None
    n = len(x)
    rows = torch.arange(0, n, -(-n // CHECKSUM_SAMPLES) if n else 1, device=x.device)
    per_sample = math.prod(x.shape[1:])
    count = min(per_sample, max(1, CHECKSUM_ELEMENTS // max(len(rows), 1)))
    positions = torch.linspace(0, per_sample - 1, count, device=x.device).long() if per_sample else None
    if positions is None or x.dim() == 1:
        picked = x[rows]
    else:
        index = (rows[:, None], *_unravel(positions, x.shape[1:]))  # a name: mypy reads x[(a, *b)] as 3.11's x[a, *b]
        picked = x[index]
    digest = hashlib.blake2b(digest_size=8)
    for part in (picked, y[rows]):
        digest.update(str(part.dtype).encode())
        digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    checksum = digest.hexdigest()
    with contextlib.suppress(TypeError):
        _CHECKSUMS[data] = checksum
    return checksum


_CHECKSUMS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _unravel(flat: torch.Tensor, shape: torch.Size) -> list[torch.Tensor]:
    """The index along each dimension of ``shape`` of the row-major positions ``flat``."""
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat = flat // size
    return out[::-1]


def _describe_shift(shift: Any) -> str | None:
    """A shift's ``repr`` where its class defines one, else its class's name (the
    default ``repr`` holds a memory address, which differs in every process)."""
    if shift is None:
        return None
    if type(shift).__repr__ is object.__repr__:
        return f"{type(shift).__module__}.{type(shift).__qualname__}"
    return repr(shift)


def check_stream(saved: dict[str, Any], stream: Stream, source: str) -> None:
    """:raises CheckpointError: when the run resumes on another stream than it trained on."""
    own = stream_signature(stream)
    saved_data, own_data = saved.get("data"), own.pop("data")  # checkpoints written before checksums lack them
    saved = {k: v for k, v in saved.items() if k != "data"}
    if saved == own:
        _warn_other_data(saved_data, own_data, source)
        return
    old, new = saved["experiences"], own["experiences"]
    if saved["setting"] != own["setting"]:
        where = f"{saved['setting']}-incremental in the checkpoint, {own['setting']}-incremental here"
    elif len(old) != len(new):
        where = f"{len(old)} experiences in the checkpoint, {len(new)} here"
    elif old != new:
        k = next(k for k, (a, b) in enumerate(zip(old, new, strict=True)) if a != b)
        fields = ("classes", "task", "training samples", "test samples", "shift")
        diff = [f"{name} {a} in the checkpoint but {b} here" for name, a, b in zip(fields, old[k], new[k], strict=True) if a != b]
        where = f"experience {k}: {', '.join(diff)}"
    else:
        where = f"the classes in order are {saved['class_names']} in the checkpoint but {own['class_names']} here"
    raise CheckpointError(
        f"checkpoint '{source}' was written by a run on another stream ({where}); a run given its stream "
        f"in Python continues only on that stream (Experiment.resume(run_dir, stream=...))"
    )


def _warn_other_data(saved: list[list[str | None]] | None, own: list[list[str | None]], source: str) -> None:
    """Warn when an experience's data differ from those the run trained on (same
    classes and sizes, other values: another download, preprocessing or split)."""
    if saved is None or saved == own:
        return
    k, part = next((k, p) for k, (a, b) in enumerate(zip(saved, own, strict=True))
                   for p, x, y in (("training", a[0], b[0]), ("test", a[1], b[1])) if x != y)
    warnings.warn(
        f"checkpoint '{source}' was written by a run on other data: the {part} inputs of experience {k} differ "
        f"from the checkpoint's (same classes and sizes, other values: another download, preprocessing or "
        f"split?); the run goes on with the data it has now",
        CheckpointWarning,
        stacklevel=6,  # the caller of Experiment.run
    )
