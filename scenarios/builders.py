"""Builders: from a data set to a stream of experiences.

Class-incremental (one growing head, no task label at test time) is built here;
each builder documents the invariants its tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from contlearn.scenarios.sources import Split
from contlearn.scenarios.stream import Experience, Stream, TensorData

from contlearn.errors import ConfigError, DataError


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
    samples carry task label i (task-incremental).

    Invariants: the class sets are disjoint and their union is the class order;
    every sample of the data lands in exactly one experience.
    """
    order = resolve_class_order(split.y_train.tolist(), class_order, seed)
    sizes = partition_classes(len(order), n_experiences, classes_per_experience)
    remap = torch.full((max(order) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(len(order))
    y_train, y_test = remap[split.y_train], remap[split.y_test]
    if (y_test < 0).any():
        raise DataError("the test set has classes that the training set lacks")

    experiences = []
    start = 0
    for index, size in enumerate(sizes):
        classes = list(range(start, start + size))
        start += size
        parts = []
        for x, y in ((split.x_train, y_train), (split.x_test, y_test)):
            keep = torch.isin(y, torch.tensor(classes))
            task = torch.full((int(keep.sum()),), index if task_labels else 0, dtype=torch.long)
            parts.append(TensorData(x[keep], y[keep], task))
        if len(parts[0]) == 0:
            raise DataError(f"experience {index} (classes {classes}) has no training samples")
        experiences.append(Experience(index, classes, index if task_labels else 0, parts[0], parts[1]))

    return Stream(
        experiences,
        setting="task" if task_labels else "class",
        n_classes=len(order),
        input_shape=split.input_shape,
        class_names=[str(c) for c in order],
        name=split.name,
    )
