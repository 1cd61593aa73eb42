"""Avalanche benchmarks as contlearn streams: reading experiences' data as
tensors, their classes and task labels, and renumbering labels in class order.

The public entry points are re-exported by :mod:`contlearn.interop.avalanche`
(see docs/avalanche.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import torch

from contlearn.errors import ConfigError, DataError, choices, optional_import
from contlearn.scenarios import Experience, Stream, TensorData

INSTALL_HINT = "pip install 'contlearn[avalanche]'"
SETTINGS = ("class", "task", "domain")


def require_avalanche() -> ModuleType:
    """The ``avalanche`` module; a :class:`~contlearn.errors.MissingDependencyError`
    saying how to install it when it is missing or broken."""
    for module in ("avalanche", "avalanche.benchmarks"):  # the second: the part every caller needs
        optional_import(module, package="avalanche-lib", extra="avalanche", needed_for="Avalanche interop")
    return sys.modules["avalanche"]


# ------------------------------------------------------------------ materialising


def _unmasked(exp: Any) -> Any:
    """A context in which an Avalanche experience shows every attribute (0.6 hides
    some of them in train/eval mode); a no-op for other objects."""
    return exp.no_attribute_masking() if hasattr(exp, "no_attribute_masking") else contextlib.nullcontext()


def _with_transforms(dataset: Any, transforms: str) -> Any:
    if not hasattr(dataset, "with_transforms"):
        return dataset
    try:
        return dataset.with_transforms(transforms)
    except Exception as exc:
        raise DataError(
            f"the Avalanche dataset has no transform group '{transforms}' ({exc}); use 'eval' or 'train'"
        ) from None


def materialise(
    dataset: Any, transforms: str = "eval", batch_size: int = 1024, what: str = "dataset"
) -> TensorData:
    """Read an Avalanche (or any map-style) dataset once, in order, as a
    :class:`TensorData`.

    :param dataset: yields ``(x, y)`` or ``(x, y, task)`` samples.
    :param transforms: the Avalanche transform group applied while reading:
        ``"eval"`` (default: deterministic), ``"train"`` (one fixed draw of any
        random augmentation), or another group the dataset defines.
    :param batch_size: samples read per step.
    :param what: names the data in error messages.
    """
    from torch.utils.data import DataLoader

    data = _with_transforms(dataset, transforms)
    collate = getattr(data, "collate_fn", None)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)
    xs, ys, ts = [], [], []
    for batch in _batches(loader, what, transforms):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise DataError(f"{what} must yield (x, y) or (x, y, task) samples, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if not isinstance(x, torch.Tensor):
            raise DataError(
                f"{what} yields inputs of type {type(x).__name__}, not tensors; give the benchmark "
                f"a transform that ends in a tensor (e.g. torchvision's ToTensor)"
            )
        x, y = _checked_samples(x, y, what)
        t = torch.as_tensor(batch[2]).long().reshape(-1) if len(batch) > 2 else torch.zeros_like(y)
        xs.append(x.detach().cpu())
        ys.append(y.cpu())
        ts.append(t.cpu())
    if not xs:
        return TensorData(torch.empty(0), torch.empty(0, dtype=torch.long))
    return TensorData(torch.cat(xs), torch.cat(ys), torch.cat(ts))


def _checked_samples(x: torch.Tensor, y: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float inputs (8-bit images divided by 255, as ``Stream.from_tensors`` does)
    and one non-negative integer class id per sample, or a :class:`DataError`."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    elif not x.is_floating_point():
        raise DataError(f"{what} yields inputs of dtype {x.dtype}; give floating-point inputs (or uint8 images)")
    y = torch.as_tensor(y)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or len(y) != len(x):
        raise DataError(
            f"{what} yields labels of shape {tuple(y.shape)} for {len(x)} inputs; a label is one class id per "
            f"sample (for one-hot or soft targets, give their argmax)"
        )
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise DataError(f"{what} yields fractional labels such as {float(y[y != y.round()][0])}; give class ids")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{what} yields the label {int(y.min())}; class ids start at 0")
    return x, y.long()


def _batches(loader: Any, what: str, group: str = "eval") -> Any:
    """The loader's batches; a sample that cannot be batched (a PIL image, mixed
    shapes) is a :class:`DataError` with the fix."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except KeyError as exc:  # Avalanche reads a transform group's name only now
            if exc.args != (group,):
                raise
            raise DataError(
                f"{what} has no transform group {exc}; use 'eval' or 'train' (or a group the benchmark defines)"
            ) from None
        except (TypeError, RuntimeError) as exc:
            raise DataError(
                f"{what} cannot be read as tensors ({type(exc).__name__}: {exc}); give the benchmark a "
                f"transform that ends in a tensor of one shape (e.g. torchvision's ToTensor)"
            ) from None
        yield batch


class LazyExperience(Experience):
    """An :class:`Experience` whose ``train`` / ``test`` data are read from
    Avalanche datasets on first access (then kept). Assigning data replaces it."""

    def __init__(
        self,
        index: int,
        classes: list[int],
        task: int,
        train: Callable[[], TensorData],
        test: Callable[[], TensorData],
    ):
        for f in dataclasses.fields(Experience):  # optional fields keep their defaults
            if f.default is not dataclasses.MISSING:
                object.__setattr__(self, f.name, f.default)
        self._loaders = {"train": train, "test": test}
        self._data: dict[str, TensorData] = {}
        self.index, self.classes, self.task = index, classes, task
        self.device: torch.device | None = None  # where the data are given (read on the CPU)

    def _get(self, key: str) -> TensorData:
        if key not in self._data:
            self._data[key] = self._loaders[key]()
        if self.device is not None:
            self._data[key] = self._data[key].to(self.device)
        return self._data[key]

    train = property(lambda self: self._get("train"), lambda self, v: self._data.__setitem__("train", v))  # type: ignore[assignment]
    test = property(lambda self: self._get("test"), lambda self, v: self._data.__setitem__("test", v))  # type: ignore[assignment]


# ------------------------------------------------------------------ metadata


def _experience_list(benchmark: Any, attr: str) -> list[Any]:
    stream = getattr(benchmark, attr, None)
    if stream is None:
        raise DataError(
            f"{type(benchmark).__name__} has no '{attr}'; stream_from_avalanche needs an Avalanche "
            f"benchmark (a CLScenario with train_stream and test_stream)"
        )
    return list(stream)


def experience_classes(exp: Any) -> list[int]:
    """The classes of an Avalanche experience, sorted (``classes_in_this_experience``
    when the benchmark records it, else the dataset's targets)."""
    with _unmasked(exp):
        classes = getattr(exp, "classes_in_this_experience", None)
        if classes is None:
            targets = getattr(exp.dataset, "targets", None)
            if targets is None:
                raise DataError("an Avalanche experience has neither classes_in_this_experience nor dataset.targets")
            classes = targets.uniques if hasattr(targets, "uniques") else set(int(c) for c in targets)
    return sorted(int(c) for c in classes)


def experience_task(exp: Any) -> int:
    """The task label of an Avalanche experience (the smallest, when it has several;
    0 when the benchmark has none). Per-sample task labels are kept in the data."""
    with _unmasked(exp):
        try:
            label = getattr(exp, "task_label", None)
        except ValueError:  # Avalanche's old API: an experience with several task labels
            label = None
        if label is not None:
            return int(label)
        labels = getattr(exp, "task_labels", None)
        if labels:
            return int(min(labels))
        tl = getattr(exp.dataset, "targets_task_labels", None)
        if tl is not None and hasattr(tl, "uniques") and tl.uniques:
            return int(min(tl.uniques))
    return 0


def experience_tasks(exp: Any) -> list[int]:
    """Every task label of an Avalanche experience, sorted (``[0]`` when the
    benchmark has none)."""
    with _unmasked(exp):
        labels = getattr(exp, "task_labels", None)
        if labels is None:
            tl = getattr(getattr(exp, "dataset", None), "targets_task_labels", None)
            labels = list(tl.uniques) if tl is not None and hasattr(tl, "uniques") else None
    if labels is None or len(labels) == 0:
        return [experience_task(exp)]
    if type(labels).__name__ == "ConstantSequence":  # one label repeated per sample: read one
        return [int(labels[0])]
    return sorted({int(t) for t in labels})


def classes_by_task(exp: Any) -> dict[int, list[int]]:
    """The classes of each task of an Avalanche experience, sorted. An experience
    with one task label has all its classes in it; one with several is split by
    its dataset's per-sample task labels."""
    tasks = experience_tasks(exp)
    if len(tasks) == 1:
        return {tasks[0]: experience_classes(exp)}
    with _unmasked(exp):
        targets = getattr(exp.dataset, "targets", None)
        labels = getattr(exp.dataset, "targets_task_labels", None)
    if targets is None or labels is None:
        raise DataError(
            f"an Avalanche experience has task labels {tasks} but its dataset lacks targets or "
            f"targets_task_labels, so the classes of each task are unknown"
        )
    y = torch.as_tensor(list(targets)).long()
    t = torch.as_tensor(list(labels)).long()
    return {task: sorted(int(c) for c in torch.unique(y[t == task])) for task in tasks}


def experience_index(exp: Any, default: int) -> int:
    with _unmasked(exp):
        try:
            index = exp.current_experience
        except Exception:  # unset in hand-made experiences
            index = None
    return int(index) if index is not None else default


def class_order(benchmark: Any, train_classes: Sequence[Sequence[int]]) -> list[int]:
    """The order in which classes enter the stream: the benchmark's ``classes_order``
    (``nc_benchmark``) when it matches the experiences, else each experience's new
    classes in increasing order, experience after experience."""
    seen: list[int] = []
    for classes in train_classes:
        seen += [c for c in classes if c not in seen]
    declared = getattr(benchmark, "classes_order", None)
    if declared is not None:
        declared = [int(c) for c in declared]
        if sorted(declared) == sorted(seen):
            pos, ok = 0, True
            for classes in train_classes:
                new = [c for c in classes if c not in declared[:pos]]
                if sorted(declared[pos : pos + len(new)]) != sorted(new):
                    ok = False
                    break
                pos += len(new)
            if ok:
                return declared
    return seen


def detect_setting(tasks: Sequence[int], train_classes: Sequence[Sequence[int]]) -> str:
    """``task`` when experiences carry more than one task label, ``class`` when
    their classes are disjoint, ``domain`` otherwise."""
    if len(set(tasks)) > 1:
        return "task"
    flat = [c for classes in train_classes for c in classes]
    return "class" if len(flat) == len(set(flat)) else "domain"


# ------------------------------------------------------------------ benchmark -> stream


def _apply_remap(data: TensorData, remap: torch.Tensor, what: str) -> TensorData:
    """``data`` with its labels mapped by ``remap`` (-1: a class no training experience has)."""
    if len(data) == 0:
        return data
    if int(data.y.max()) >= remap.numel() or int(data.y.min()) < 0 or bool((remap[data.y] < 0).any()):
        bad = sorted({int(c) for c in data.y.tolist() if c >= remap.numel() or c < 0 or remap[c] < 0})
        raise DataError(f"{what} has classes {bad} that no training experience has")
    return TensorData(data.x, remap[data.y], data.t)


def _filter_classes(data: TensorData, classes: Sequence[int]) -> TensorData:
    keep = torch.isin(data.y, torch.tensor(list(classes), dtype=torch.long))
    return data.subset(keep.nonzero().flatten())


def stream_from_avalanche(
    benchmark: Any,
    *,
    setting: str | None = None,
    remap: bool | str = "auto",
    transforms: str = "eval",
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    name: str | None = None,
    batch_size: int = 1024,
) -> Stream:
    """A contlearn :class:`Stream` holding an Avalanche benchmark's experiences.

    Each train experience becomes one contlearn experience, with the classes and
    task label Avalanche gives it; its data are read once (see :func:`materialise`).
    Test data: the test experience of the same index when the test stream is as
    long as the train stream; with a single test experience (``ni_benchmark``,
    ``complete_test_set_only``), the test samples of each experience's classes in a
    class-incremental stream, and the whole test set otherwise.

    :param benchmark: an Avalanche benchmark (``train_stream`` and ``test_stream``).
    :param setting: ``class``, ``task`` or ``domain``; ``None`` detects it: ``task``
        when experiences carry different task labels, ``class`` when their classes
        are disjoint, else ``domain``.
    :param remap: contlearn's growing heads expect experience i's classes to come
        after those of earlier experiences, numbered 0..n-1. ``"auto"`` renumbers
        the labels in class order (see :func:`class_order`) when they are not
        already so; ``True`` always renumbers, ``False`` never (labels kept as
        Avalanche gives them). ``stream.class_names[k]`` is the original label of
        class k.
    :param transforms: the Avalanche transform group applied while reading the
        data: ``"eval"`` (default) or ``"train"`` (random augmentations drawn once).
    :param class_names: names of the original labels (a sequence indexed by label,
        or a mapping); default: the labels as text.
    :param name: the stream's name; default: the benchmark's class name.
    :param batch_size: samples read at a time while materialising.
    :raises DataError: a benchmark whose streams or data do not fit.
    """
    require_avalanche()
    if setting is not None and setting not in SETTINGS:
        raise ConfigError(f"setting must be one of {choices(SETTINGS)} or None, got {setting!r}")
    if remap not in ("auto", True, False):
        raise ConfigError(f"remap must be 'auto', True or False, got {remap!r}")
    train_exps = _experience_list(benchmark, "train_stream")
    test_exps = _experience_list(benchmark, "test_stream")
    if not train_exps:
        raise DataError("the Avalanche benchmark's train stream has no experiences")
    if len(test_exps) not in (1, len(train_exps)):
        raise DataError(
            f"the Avalanche benchmark has {len(train_exps)} train but {len(test_exps)} test experiences; "
            f"contlearn needs one test experience per train experience, or a single test set"
        )

    train = [materialise(e.dataset, transforms, batch_size, f"train experience {k}") for k, e in enumerate(train_exps)]
    # test data are read with the evaluation transforms whatever ``transforms`` says: no augmentation
    tests = [materialise(e.dataset, "eval", batch_size, f"test experience {k}") for k, e in enumerate(test_exps)]
    for k, data in enumerate(train):
        if len(data) == 0:
            raise DataError(f"train experience {k} of the Avalanche benchmark has no samples")
    classes = [data.classes() for data in train]
    tasks = [int(data.t.min()) for data in train]
    setting = setting or detect_setting(tasks, classes)

    order = class_order(benchmark, classes)
    renumber = remap is True or (remap == "auto" and order != list(range(len(order))))
    # the classes trained, renumbered or kept: a test class none of them has is refused
    mapping = torch.full((max(order) + 1,), -1, dtype=torch.long)
    mapping[torch.tensor(order)] = torch.arange(len(order)) if renumber else torch.tensor(order)
    n_classes = len(order) if renumber else max(order) + 1
    originals = order if renumber else list(range(n_classes))

    experiences = []
    for k, (exp, data) in enumerate(zip(train_exps, train, strict=True)):
        test = tests[k] if len(tests) == len(train) else tests[0]
        if len(tests) == 1 and len(train) > 1 and setting == "class":
            test = _filter_classes(test, classes[k])
        data = _apply_remap(data, mapping, f"train experience {k}")
        test = _apply_remap(test, mapping, f"test experience {k}")
        if len(test) == 0:
            test = TensorData(data.x[:0], data.y[:0], data.t[:0])
        exp_classes = sorted(int(mapping[c]) for c in classes[k])
        experiences.append(Experience(k, exp_classes, experience_task(exp), data, test))

    dataset_label = _dataset_labels(benchmark)
    names = [_class_name(class_names, dataset_label.get(c, c)) for c in originals]
    return Stream(
        experiences,
        setting=setting,
        n_classes=n_classes,
        input_shape=tuple(train[0].x.shape[1:]),
        class_names=names,
        name=name if name is not None else type(benchmark).__name__,
    )


def _dataset_labels(benchmark: Any) -> dict[int, int]:
    """Avalanche's class id -> the data set's label, where Avalanche renumbered
    the classes (``nc_benchmark(..., class_ids_from_zero_from_first_exp=True)``:
    ``classes_order`` then differs from ``classes_order_original_ids``)."""
    ids, originals = getattr(benchmark, "classes_order", None), getattr(benchmark, "classes_order_original_ids", None)
    if ids is None or originals is None or list(ids) == list(originals):
        return {}
    if len(set(ids)) != len(list(ids)):  # ids renumbered within each task: one id, several labels
        return {}
    return {int(i): int(o) for i, o in zip(ids, originals, strict=True)}


def _class_name(class_names: Sequence[str] | Mapping[int, str] | None, label: int) -> str:
    if class_names is None:
        return str(label)
    try:
        return str(class_names[label])
    except (KeyError, IndexError):
        raise ConfigError(f"class_names has no name for label {label}") from None


def lazy_stream(
    train_exps: Sequence[Any],
    test_exps: Sequence[Any] = (),
    transforms: str = "eval",
    batch_size: int = 1024,
    name: str = "",
) -> Stream:
    """Avalanche experiences as a stream whose data are read only when a plugin
    asks for them, labels kept as Avalanche gives them (what the plugin adapter
    shows as ``run.stream``). Without test experiences, test data are empty."""
    train_exps, test_exps = list(train_exps), list(test_exps)
    classes = [experience_classes(e) for e in train_exps]
    tasks = [experience_task(e) for e in train_exps]
    shape = input_shape(train_exps[0], transforms)
    experiences: list[Experience] = []
    for k, exp in enumerate(train_exps):
        test_exp = test_exps[k] if len(test_exps) == len(train_exps) else (test_exps[0] if test_exps else None)
        experiences.append(
            LazyExperience(
                k,
                classes[k],
                tasks[k],
                _loader(exp, transforms, batch_size, f"train experience {k}"),
                _loader(test_exp, "eval", batch_size, f"test experience {k}", shape),
            )
        )
    n_classes = max(c for cl in classes for c in cl) + 1
    return Stream(
        experiences,
        setting=detect_setting(tasks, classes),
        n_classes=n_classes,
        input_shape=shape,
        class_names=[str(c) for c in range(n_classes)],
        name=name,
    )


def input_shape(exp: Any, transforms: str = "eval") -> tuple[int, ...]:
    """The shape of one input of an Avalanche experience (reads one sample)."""
    with _unmasked(exp):
        first = _with_transforms(exp.dataset, transforms)[0][0]
    return tuple(torch.as_tensor(first).shape)


def _loader(
    exp: Any, transforms: str, batch_size: int, what: str, shape: Sequence[int] = ()
) -> Callable[[], TensorData]:
    """Reads ``exp``'s data when called; without an experience, empty data of
    inputs of ``shape``."""

    def load() -> TensorData:
        if exp is None:
            return TensorData(torch.empty(0, *shape), torch.empty(0, dtype=torch.long))
        with _unmasked(exp):
            dataset = exp.dataset
        return materialise(dataset, transforms, batch_size, what)

    return load
