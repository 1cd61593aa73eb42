"""Checkpoints: the whole state of a run as tensors and plain containers.

A checkpoint is one file in ``RUN_DIR/checkpoints/``, written by the loop after
every experience and, with ``checkpoint.every_n_steps``, inside experiences. It
holds the model's, the optimizer's and every plugin's ``state_dict()``, the
random states (Python, NumPy, torch, CUDA and ``run.generator``), the position
in the stream and the metrics so far. It is written atomically (temporary file,
fsync, rename), its name sorts in run order (``ckpt-<experiences done>-<steps
done>.pt``), and it loads with ``torch.load(weights_only=True)``: loading never
executes code. :func:`restore` rebuilds a run from one, so that the resumed run
is the run that was interrupted (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import re
import shutil
import warnings
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from contlearn._hook_results import experience_data, experience_optimizer
from contlearn.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    from contlearn.run import Run
    from contlearn.scenarios import Experience, Stream

FORMAT = "contlearn-checkpoint"
VERSION = 1
DIRNAME = "checkpoints"
#: Top-level config keys that may differ between a checkpoint and the run resuming it.
MAY_DIFFER = ("out", "device", "threads", "checkpoint")
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
    """A checkpoint was skipped (unreadable) and an older one is used."""


@dataclass
class Progress:
    """What the loop has measured beyond ``run.accuracy_rows``: the FWT baseline,
    the last confusion matrix and the timings (seconds); ``elapsed`` is the run's
    time before this session (restored) or until now (captured)."""

    timings: dict[str, float] = field(default_factory=lambda: {"train_seconds": 0.0, "eval_seconds": 0.0})
    initial: list[float] | None = None
    confusion: np.ndarray | None = None
    elapsed: float = 0.0


@dataclass
class EpochState:
    """Where a checkpoint inside an experience stands in its epoch: the losses
    of the epoch's steps so far, and ``run.generator``'s state at the epoch's
    start (it drew the epoch's sample order)."""

    losses: list[torch.Tensor]
    terms: dict[str, list[torch.Tensor]]
    generator: torch.Tensor


@dataclass
class Resumed:
    """A run restored inside an experience: the data it trains on, and the epoch
    to continue with ``epoch.losses`` batches of it done."""

    data: Any
    epoch: EpochState


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
            warnings.warn(f"{problem}; resuming from the previous one, '{path.name}'", CheckpointWarning, stacklevel=2)
        return path, state
    raise CheckpointError(f"no readable checkpoint in '{directory}': {'; '.join(problems)}")


# ------------------------------------------------------------------ compatibility


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def _section_saved(saved: dict[str, Any], key: str) -> bool:
    """Whether the section holding ``key`` is in ``saved``: an option added to a
    section the run had, not a plugin (or section) the run did not have."""
    parts = key.split(".")
    depth = 2 if parts[0] == "plugins" else len(parts) - 1  # a plugin's section: plugins.<name>
    node: Any = saved
    for part in parts[:depth]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """The keys on which two configs (as plain containers) differ, with both
    values; keys of :data:`MAY_DIFFER` are ignored. A key the checkpoint lacks
    whose current value is its default in ``defaults`` is not a difference: it is
    an option added since the checkpoint was written, at the value the old code had."""
    a = {k: v for k, v in _flatten(saved).items() if k.split(".")[0] not in MAY_DIFFER}
    b = {k: v for k, v in _flatten(current).items() if k.split(".")[0] not in MAY_DIFFER}
    if defaults is not None:
        default = _flatten(defaults)
        for k in set(b) - set(a):
            if k in default and default[k] == b[k] and _section_saved(saved, k):
                a[k] = b[k]
    diffs = [
        f"{k}: {a.get(k, '(absent)')!r} in the checkpoint, {b.get(k, '(absent)')!r} now"
        for k in sorted(set(a) | set(b))
        if a.get(k, "(absent)") != b.get(k, "(absent)")
    ]
    order_a, order_b = list(saved.get("plugins") or {}), list(current.get("plugins") or {})
    if sorted(order_a) == sorted(order_b) and order_a != order_b:
        diffs.append(f"plugin order: {order_a} in the checkpoint, {order_b} now")
    return diffs


def check_config(
    saved: dict[str, Any], current: dict[str, Any], source: str, defaults: dict[str, Any] | None = None
) -> None:
    """:raises ConfigError: naming the differences when ``current`` is not the
    experiment that wrote checkpoint ``source`` (see :func:`config_differences`)."""
    diffs = config_differences(saved, current, defaults)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"checkpoint '{source}' was written by a different experiment: {shown}")


def check_model(model: torch.nn.Module, saved: dict[str, torch.Tensor], source: str) -> None:
    """:raises CheckpointError: naming the parameters the model and the
    checkpoint disagree on (missing, unexpected, other shape)."""
    own = model.state_dict()
    problems = [f"'{k}' missing from the checkpoint" for k in own if k not in saved]
    problems += [f"'{k}' not in the model" for k in saved if k not in own]
    problems += [
        f"'{k}' is {list(saved[k].shape)} in the checkpoint but {list(own[k].shape)} in the model"
        for k in own
        if k in saved and saved[k].shape != own[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(
            f"checkpoint '{source}' does not fit the model: {shown}. A plugin that changes the model "
            f"must rebuild the change in restore(run, state) (docs/reliability.md)"
        )


# ------------------------------------------------------------------------ random state


def rng_state(generator: torch.Generator, own_gpu: torch.device | None = None) -> dict[str, Any]:
    """Python's, NumPy's, torch's (CPU and, once initialised, CUDA) and ``generator``'s state.

    ``own_gpu``: the one GPU this process draws on (one process per GPU under
    torchrun): its state alone is kept, under ``cuda_own``, so that another
    process sets it on its own GPU, not on the same index."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda_ready and own_gpu is None else [],
        "generator": generator.get_state(),
    }
    if own_gpu is not None and own_gpu.type == "cuda":
        state["cuda_own"] = torch.cuda.get_rng_state(own_gpu)
    return state


def _own_rng(state: dict[str, Any], run: Any, source: str) -> dict[str, Any]:
    """The random states this process resumes with: its own when the checkpoint
    was written by as many processes, else process 0's (with a warning when the
    run had several: their draws per share then differ from the run's)."""
    saved = state.get("rng_processes")
    world = run.dist.world_size
    if not saved:
        return state["rng"]
    if len(saved) == world:
        return saved[run.dist.rank]
    if run.dist.is_main:
        warnings.warn(
            f"checkpoint '{source}' was written by {len(saved)} processes and this resume has {world}: every "
            f"process starts from process 0's random state, so random draws made per share of a batch "
            f"(dropout, augmented views), if the run makes any, differ from the run's",
            CheckpointWarning,
            stacklevel=5,  # the caller of Experiment.run
        )
    return state["rng"]


def own_gpu(run: Any) -> torch.device | None:
    """The GPU of this process when several processes each draw on their own."""
    return run.device if run.dist.world_size > 1 and run.device.type == "cuda" else None


def set_rng_state(state: dict[str, Any], generator: torch.Generator, own_gpu: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state`; a ``cuda_own`` state goes to ``own_gpu`` (this
    process's GPU), when there is one."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda_own") is not None and own_gpu is not None and own_gpu.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_own"].cpu(), own_gpu)
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator.set_state(state["generator"].cpu())


# ------------------------------------------------------------------- capture, restore


def _plugin_states(run: Run) -> dict[str, Any]:
    return {name: p.state_dict() for name, p in run.plugins.items() if callable(getattr(p, "state_dict", None))}


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
        picked = x[(rows[:, None], *_unravel(positions, x.shape[1:]))]
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


def _check_stream(saved: dict[str, Any], stream: Stream, source: str) -> None:
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


def capture(
    run: Run,
    config: dict[str, Any],
    progress: Progress,
    epoch: EpochState | None = None,
    given_plugins: dict[str, str] | None = None,
    process_rngs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checkpoint of ``run`` now: between experiences (``epoch`` is ``None``)
    or after a step inside one. ``process_rngs``: several processes' random
    states (:func:`rng_state` of each, in rank order), kept so that each process
    resumes with its own. ``given_plugins``: the plugins given to the run
    in Python that take part in training, name -> class, which a resume should
    be given again."""
    completed = len(run.accuracy_rows)
    inside = epoch is not None
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "position": {
            "completed": completed,
            "inside_experience": inside,
            "epoch": run.epoch if inside else 0,
            "batch": len(epoch.losses) if inside else 0,
            "step": run.step if inside else 0,
            "global_step": run.global_step,
        },
        "stream": stream_signature(run.stream),
        "given_plugins": dict(given_plugins or {}),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict() if inside and run.optimizer is not None else None,
        "plugins": _plugin_states(run),
        "rng": process_rngs[0] if process_rngs else rng_state(run.generator, own_gpu(run)),
        "rng_processes": list(process_rngs) if process_rngs is not None and len(process_rngs) > 1 else None,
        "metrics": {
            "accuracy_rows": [list(r) for r in run.accuracy_rows],
            "initial_accuracy": progress.initial,
            "confusion": None if progress.confusion is None else torch.from_numpy(np.asarray(progress.confusion)),
            "timings": dict(progress.timings),
            "elapsed": progress.elapsed,
            "epoch_losses": torch.stack(epoch.losses).cpu() if inside and epoch.losses else None,
            "epoch_terms": {k: torch.stack(v).cpu() for k, v in epoch.terms.items()} if inside else {},
            "epoch_generator": epoch.generator if inside else None,
        },
    }


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


def _warn_given_plugins(saved: dict[str, str], given: dict[str, str], source: str) -> None:
    """Warn when a resume is not given the plugins (names and classes) the run was
    given in Python: one that only watched (a profiler, a stop at some step) may
    be left out, one that trained changes what the rest of the run learns."""
    if saved == given:
        return

    def listed(plugins: dict[str, str]) -> str:
        return ", ".join(f"{n!r} ({c})" for n, c in plugins.items()) or "none"

    warnings.warn(
        f"checkpoint '{source}' was written by a run given these plugins in Python: {listed(saved)}; this "
        f"resume has {listed(given)}. A plugin that only watched may be left out; one that trained must be "
        f"given again (Experiment.resume(run_dir, plugins={{...}})), or the results will differ",
        CheckpointWarning,
        stacklevel=5,  # the caller of Experiment.run
    )


def restore(
    run: Run, state: dict[str, Any], source: str, given_plugins: dict[str, str] | None = None
) -> tuple[Progress, Resumed | None]:
    """Bring a freshly built run to the checkpoint's state, calling ``setup``.

    Order: position and metrics; the head grown for every experience started;
    each plugin's ``restore(run, state)`` (when it has one: model surgery) or
    ``load_state_dict(state)``; the model's weights (checked against its
    structure); the ``setup`` hook; inside an experience, ``train_data`` and
    ``configure_optimizer`` again and the optimizer's state; the random states
    last, so that nothing above shifts them.
    """
    pos, metrics = state["position"], state["metrics"]
    with _fits(source, "its position"):
        completed, inside = int(pos["completed"]), bool(pos["inside_experience"])
        global_step, epoch, step = int(pos["global_step"]), int(pos["epoch"]), int(pos["step"])
        accuracy_rows = [[float(a) for a in row] for row in metrics["accuracy_rows"]]
    stream = run.stream
    if isinstance(state.get("stream"), dict):  # checkpoints written before these checks lack them
        _check_stream(state["stream"], stream, source)
    if "given_plugins" in state:
        _warn_given_plugins(state["given_plugins"], dict(given_plugins or {}), source)
    if completed + inside > len(stream):
        raise CheckpointError(f"checkpoint '{source}' is past the end of the stream ({len(stream)} experiences)")
    run.accuracy_rows = accuracy_rows
    run.global_step = global_step
    current: Experience | None = stream[completed] if inside else None
    for exp in stream.experiences[: completed + inside]:
        run.model.adapt(exp.classes, exp.task)
    run.experience = current
    run.epoch, run.step = epoch, step

    saved = state["plugins"]
    own = {name for name, p in run.plugins.items() if callable(getattr(p, "state_dict", None))}
    if set(saved) != own:
        missing, extra = sorted(own - set(saved)), sorted(set(saved) - own)
        raise CheckpointError(
            f"checkpoint '{source}' holds plugin states for {sorted(saved)} but this run has {sorted(own)}"
            + (f" (no state for {missing})" if missing else "")
            + (f" (no plugin for {extra})" if extra else "")
        )
    for name, plugin_state in saved.items():  # tensors on the CPU: plugins move them (generator states stay)
        plugin = run.plugins[name]
        with _fits(source, f"the state of plugin '{name}' (written by another version of it?)"):
            if callable(getattr(plugin, "restore", None)):
                plugin.restore(run, plugin_state)
            else:
                plugin.load_state_dict(plugin_state)

    check_model(run.model, state["model"], source)
    run.model.load_state_dict(state["model"])
    try:  # plugins apply states that need the run's device here
        run.hook.setup(run=run)
    except _MALFORMED as exc:
        raise CheckpointError(f"cannot resume from checkpoint '{source}': a plugin's setup failed on its saved "
                              f"state (written by another version of it?): {type(exc).__name__}: {exc}") from exc

    resumed = None
    if current is not None:
        data = experience_data(run, current)
        run.optimizer = experience_optimizer(run, current)
        if state["optimizer"] is not None:
            run.optimizer.load_state_dict(state["optimizer"])
        losses = metrics["epoch_losses"]
        resumed = Resumed(
            data,
            EpochState(
                list(losses.to(run.device).unbind()) if losses is not None else [],
                {k: list(v.to(run.device).unbind()) for k, v in metrics["epoch_terms"].items()},
                metrics["epoch_generator"],
            ),
        )
    with _fits(source, "its random states or metrics"):
        set_rng_state(_own_rng(state, run, source), run.generator, own_gpu(run))
        confusion = metrics["confusion"]
        progress = Progress(
            timings=dict(metrics["timings"]),
            initial=metrics["initial_accuracy"],
            confusion=None if confusion is None else confusion.numpy(),
            elapsed=float(metrics["elapsed"]),
        )
    return progress, resumed


#: What reading a value of the wrong type or shape raises.
_MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError)


@contextlib.contextmanager
def _fits(source: str, what: str) -> Iterator[None]:
    """A value of the wrong type or shape in a checkpoint (edited by hand, or by
    another version) as a :class:`CheckpointError` naming the part it is in."""
    try:
        yield
    except _MALFORMED as exc:
        raise CheckpointError(f"checkpoint '{source}' is malformed: {what} does not fit this run "
                              f"({type(exc).__name__}: {exc})") from exc
