"""Builders: from a data set to a stream of experiences.

- :func:`class_incremental`: disjoint groups of classes, one per experience, one
  growing head; with ``task_labels`` the task-incremental variant (experience
  ``i`` carries task label ``i`` at train and test time).
- :func:`domain_incremental`: the same classes in every experience, under a
  different input shift (:func:`permuted`, :func:`rotated`) or from a
  different data set (:func:`one_dataset_per_experience`).
- :func:`carve_validation`, :func:`subsample_per_class`: index helpers.

Builders take a :class:`~contlearn.scenarios.sources.Split` whose train and
test are stored data (TensorData or LoaderData; raw Samples are loaded into
tensors). Each builder documents the invariants its tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from contlearn.scenarios.sources import Samples, Split
from contlearn.scenarios.stream import Experience, Stream, TensorData
from contlearn.scenarios.transforms import Op, Permute, Rotate

from contlearn.errors import ConfigError, DataError


def stored(split: Split) -> Split:
    """The split with Samples loaded into TensorData (stored data is kept)."""
    def one(data):
        return TensorData(data.load(), data.targets) if isinstance(data, Samples) else data

    return Split(one(split.train), one(split.test), split.name, split.class_names)


def resolve_class_order(labels: Sequence[int], class_order: Sequence[int] | None, seed: int) -> list[int]:
    """The explicit order if given (checked to be a permutation of the labels),
    otherwise the labels shuffled with ``seed``."""
    present = sorted({int(c) for c in labels})
    if class_order is None:
        rng = np.random.default_rng(seed)
        return [present[i] for i in rng.permutation(len(present))]
    order = [int(c) for c in class_order]
    if sorted(order) != present:
        missing = sorted(set(present) - set(order))
        extra = sorted(set(order) - set(present))
        raise ConfigError(
            f"scenario.class_order must list each class of the data exactly once; "
            f"classes in the data: {present}"
            + (f"; missing: {missing}" if missing else "")
            + (f"; not in the data: {extra}" if extra else "")
            + (f"; repeated: {sorted({c for c in order if order.count(c) > 1})}" if len(order) != len(set(order)) else "")
        )
    return order


def partition_classes(
    n_classes: int, n_experiences: int, classes_per_experience: Sequence[int] | None
) -> list[int]:
    """How many classes each experience introduces."""
    if classes_per_experience is not None:
        sizes = [int(s) for s in classes_per_experience]
        if len(sizes) != n_experiences or sum(sizes) != n_classes or min(sizes) < 1:
            raise ConfigError(
                f"scenario.classes_per_experience {sizes} must have n_experiences={n_experiences} "
                f"positive entries that sum to the number of classes ({n_classes})"
            )
        return sizes
    if n_experiences > n_classes:
        raise ConfigError(
            f"scenario.n_experiences={n_experiences} is more than the {n_classes} classes of the data"
        )
    if n_classes % n_experiences:
        raise ConfigError(
            f"{n_classes} classes do not split evenly into {n_experiences} experiences; "
            f"list them with scenario.classes_per_experience"
        )
    return [n_classes // n_experiences] * n_experiences


def _names(split: Split, labels: Sequence[int]) -> list[str]:
    names = split.class_names
    return [names[c] if names is not None and 0 <= c < len(names) else str(c) for c in labels]


_MAX_LABEL = 10_000_000  # 80 MB of relabelling table; ImageNet-21k's labels stay below 22,000


def _remap(order: Sequence[int]) -> torch.Tensor:
    if min(order) < 0:
        raise DataError(f"the training set has a negative label ({min(order)}): labels must be 0 or more")
    if max(order) >= _MAX_LABEL:  # the relabelling table has an entry per label up to the largest
        raise DataError(f"the training set has label {max(order)}; labels must be below {_MAX_LABEL:,} "
                        f"(number the classes 0, 1, 2, ...)")
    remap = torch.full((max(order) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(len(order))
    return remap


def _relabel(data, remap: torch.Tensor, what: str):
    y = data.y.cpu()
    if len(y) and int(y.min()) < 0:
        raise DataError(f"the {what} set has a negative label ({int(y.min())}): labels must be 0 or more")
    if int(y.max()) >= remap.numel() or bool((remap[y.clamp(max=remap.numel() - 1)] < 0).any()):
        known = set(torch.nonzero(remap >= 0).flatten().tolist())
        lacking = sorted(set(y.unique().tolist()) - known)
        shown = ", ".join(map(str, lacking[:5])) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise DataError(f"the {what} set has classes that the training set lacks: labels {shown}")
    return data.with_labels(remap[y])


def class_incremental(
    split: Split,
    n_experiences: int,
    class_order: Sequence[int] | None = None,
    classes_per_experience: Sequence[int] | None = None,
    seed: int = 0,
    task_labels: bool = False,
) -> Stream:
    """Split the classes of a data set into disjoint groups, one per experience.

    Labels are renumbered in class order: the k-th class of the order becomes
    class k, so experience 0 holds classes 0..n_0-1 and the head grows in order.
    ``stream.class_names`` maps them back. With ``task_labels``, experience i's
    samples carry task label i (task-incremental, van de Ven & Tolias 2019).

    Invariants: the class sets are disjoint and their union is the class order;
    every sample of the data lands in exactly one experience.
    """
    split = stored(split)
    if len(split.train) == 0:
        raise DataError(f"data set '{split.name}' has no training samples")
    order = resolve_class_order(split.y_train.tolist(), class_order, seed)
    sizes = partition_classes(len(order), n_experiences, classes_per_experience)
    remap = _remap(order)
    train = _relabel(split.train, remap, "training")
    test = _relabel(split.test, remap, "test")

    experiences = []
    start = 0
    for index, size in enumerate(sizes):
        classes = list(range(start, start + size))
        start += size
        parts = []
        for data in (train, test):
            keep = torch.isin(data.y.cpu(), torch.tensor(classes)).nonzero().flatten()
            part = data.subset(keep)
            parts.append(part.with_tasks(index) if task_labels else part)
        if len(parts[0]) == 0:
            raise DataError(f"experience {index} (classes {classes}) has no training samples")
        experiences.append(Experience(index, classes, index if task_labels else 0, parts[0], parts[1]))

    return Stream(
        experiences,
        setting="task" if task_labels else "class",
        n_classes=len(order),
        input_shape=split.input_shape,
        class_names=_names(split, order),
        name=split.name,
    )


def domain_incremental(
    splits: Sequence[Split],
    shifts: Sequence[Op | None],
    name: str = "",
) -> Stream:
    """Experience ``i`` is ``splits[i]`` (or the one split, for every ``i``) with
    the input shift ``shifts[i]`` applied to train and test data.

    Every experience has the same classes, all of them (labels are renumbered
    to 0..K-1 in sorted order), so the head stays K-way; task labels are 0
    (van de Ven & Tolias 2019, "domain-incremental").

    Invariants: each experience's train and test sets hold all K classes, and
    its test set is the same test samples as every other experience's (for one
    split), under its own shift.
    """
    splits = [stored(s) for s in splits]
    if len(splits) != 1 and len(splits) != len(shifts):
        raise ValueError("give one split, or one per shift")
    labels = sorted({int(c) for c in splits[0].y_train.tolist()})
    for s in splits[1:]:
        other = sorted({int(c) for c in s.y_train.tolist()})
        if other != labels:
            raise DataError(
                f"domain-incremental data sets must share their classes: '{splits[0].name}' has {labels}, "
                f"'{s.name}' has {other}"
            )
    remap = _remap(labels)
    classes = list(range(len(labels)))
    experiences = []
    shapes = set()
    for index, shift in enumerate(shifts):
        split = splits[index if len(splits) > 1 else 0]
        train = _relabel(split.train, remap, "training")
        test = _relabel(split.test, remap, "test")
        if shift is not None:
            train, test = train.map(shift), test.map(shift)
        if len(train) == 0:
            raise DataError(f"experience {index} ({split.name}) has no training samples")
        shapes.add((split.name, split.input_shape))
        experiences.append(Experience(index, classes, 0, train, test, shift=shift))
    if len({shape for _, shape in shapes}) > 1:
        raise DataError(
            f"domain-incremental data sets must have one input shape, got {sorted(shapes)}; "
            f"make them match with scenario.train_transform/eval_transform (e.g. resize:32, rgb)"
        )
    return Stream(
        experiences,
        setting="domain",
        n_classes=len(labels),
        input_shape=splits[0].input_shape,
        class_names=_names(splits[0], labels),
        name=name or splits[0].name,
    )


def permutations(n_values: int, n_experiences: int, seed: int, identity_first: bool = False) -> list[torch.Tensor]:
    """One random permutation of ``n_values`` per experience, drawn with a CPU
    generator seeded with ``seed``; with ``identity_first`` experience 0 keeps
    the original inputs (its draw is still made, so later ones do not change)."""
    generator = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(n_values, generator=generator) for _ in range(n_experiences)]
    if identity_first:
        perms[0] = torch.arange(n_values)
    return perms


def permuted(split: Split, n_experiences: int, seed: int = 0, identity_first: bool = False) -> Stream:
    """Permuted inputs (Permuted MNIST, Goodfellow et al. 2013; Kirkpatrick et
    al. 2017): experience ``i`` applies a fixed random permutation of the input
    values to every sample. By default every experience, the first included,
    has a random permutation (common practice); ``identity_first`` keeps the
    first one unpermuted. Permutations depend on ``seed`` only."""
    split = stored(split)
    n_values = int(np.prod(split.input_shape))
    perms = permutations(n_values, n_experiences, seed, identity_first)
    return domain_incremental([split], [Permute(p) for p in perms], name=f"permuted-{split.name}")


def rotation_angles(n_experiences: int) -> list[float]:
    """Evenly spaced angles in [0, 180): ``i * 180 / n`` degrees."""
    return [i * 180.0 / n_experiences for i in range(n_experiences)]


def rotated(split: Split, n_experiences: int, angles: Sequence[float] | None = None) -> Stream:
    """Rotated inputs (Rotated MNIST, Lopez-Paz & Ranzato, GEM 2017): experience
    ``i`` rotates every image by ``angles[i]`` degrees; by default
    :func:`rotation_angles` (experience 0 unrotated)."""
    angles = list(angles) if angles is not None else rotation_angles(n_experiences)
    if len(angles) != n_experiences:
        raise ConfigError(f"scenario.rotations lists {len(angles)} angles for n_experiences={n_experiences}")
    split = stored(split)
    if len(split.input_shape) != 3:
        raise ConfigError(f"scenario.transform=rotate needs image inputs [C, H, W], got {split.input_shape}")
    return domain_incremental([split], [Rotate(a) for a in angles], name=f"rotated-{split.name}")


def one_dataset_per_experience(splits: Sequence[Split]) -> Stream:
    """Experience ``i`` is data set ``i`` (same classes, different inputs)."""
    names = "+".join(s.name for s in splits)
    return domain_incremental(splits, [None] * len(splits), name=names)


# ------------------------------------------------------------ index helpers


def subsample_per_class(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of at most ``per_class`` samples of each class, drawn with
    ``seed``, in their original order."""
    generator = torch.Generator().manual_seed(int(seed))
    labels = labels.cpu()
    keep = []
    for c in torch.unique(labels).tolist():
        index = (labels == c).nonzero().flatten()
        keep.append(index[torch.randperm(index.numel(), generator=generator)[:per_class]])
    return torch.cat(keep).sort().values


def carve_validation(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_index, val_index)``: about ``fraction`` of each class for
    validation (at least one sample of a class with two or more), by ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    labels = labels.cpu()
    train, val = [], []
    for c in torch.unique(labels).tolist():
        index = (labels == c).nonzero().flatten()
        index = index[torch.randperm(index.numel(), generator=generator)]
        k = min(max(int(round(fraction * index.numel())), 1), index.numel() - 1) if index.numel() > 1 else 0
        val.append(index[:k])
        train.append(index[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values
