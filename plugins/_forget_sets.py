"""What an unlearning request names, as data: the forget set and the sets its metrics need.

A request forgets classes (by their names in ``stream.class_names``, what the data
set calls them: ``classes=["3"]`` is the digit 3, whatever its model-side id), or
training samples (indices into the training data seen so far, the experiences'
training sets concatenated in stream order; with ``experience=k``, indices into
experience k's training set), or samples given as data (``data=TensorData``:
samples the run may no longer hold). "Seen so far" is every experience trained,
the one in progress included.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from contlearn.scenarios import TensorData

from contlearn.errors import ConfigError, DataError


class ForgetSets:
    """The data of one request. Only ``forget_train`` is built at once (a request
    served by the cached F_D needs nothing else); the other sets are built when
    first read.

    :ivar forget_train: the samples to forget (F_f is computed on them).
    :ivar described: what the report says was forgotten.
    :ivar seen_train: all training data seen so far (F_D, when it is computed).
    :ivar forget_eval: where ``forget_accuracy`` is measured (test data of the
        forgotten classes; the forget samples themselves for sample forgetting).
    :ivar retain_test: where ``retain_accuracy`` is measured (test data of the
        retained classes; all test data seen for sample forgetting).
    :ivar retain_train: members for the attack (training data minus the forget set).
    :ivar test: non-members for the attack (all test data seen so far).
    """

    def __init__(
        self,
        forget_train: Any,
        described: dict[str, Any],
        seen: Sequence[Any],
        train_masks: Sequence[torch.Tensor] | None = None,
        test_masks: Sequence[torch.Tensor] | None = None,
    ):
        self.forget_train = forget_train
        self.described = described
        self._seen = list(seen)
        self._train_masks = train_masks  # per experience: its training samples to forget
        self._test_masks = test_masks  # per experience: its test samples of forgotten classes

    @cached_property
    def seen_train(self) -> Any:
        return _concat([e.train for e in self._seen])

    @cached_property
    def test(self) -> Any:
        return _concat([e.test for e in self._seen])

    @cached_property
    def retain_train(self) -> Any:
        if self._train_masks is None:
            return self.seen_train
        return _concat(
            [_mask_subset(e.train, ~m) for e, m in zip(self._seen, self._train_masks, strict=True)]
        )

    @cached_property
    def forget_eval(self) -> Any:
        if self._test_masks is None:
            return self.forget_train
        return _concat(
            [_mask_subset(e.test, m) for e, m in zip(self._seen, self._test_masks, strict=True)]
        )

    @cached_property
    def retain_test(self) -> Any:
        if self._test_masks is None:
            return self.test
        return _concat(
            [_mask_subset(e.test, ~m) for e, m in zip(self._seen, self._test_masks, strict=True)]
        )


def n_seen(run: Any) -> int:
    """Experiences trained so far, the one in progress included."""
    return run.experience.index + 1 if run.experience is not None else len(run.accuracy_rows)


def _concat(parts: Sequence[Any]) -> Any:
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    return TensorData.concat(parts)


def _mask_subset(data: Any, mask: torch.Tensor) -> Any:
    return data.subset(mask.nonzero().flatten())


def class_names(stream: Any) -> list[str]:
    """The name of each model-side class id (ids as names when the stream has none)."""
    names = list(stream.class_names or [])
    return names if len(names) == stream.n_classes else [str(c) for c in range(stream.n_classes)]


def class_ids(stream: Any, classes: Sequence[Any], upto: int, where: str) -> list[int]:
    """Model-side ids of classes named as in ``stream.class_names``, each learnt in
    one of the first ``upto`` experiences.

    :raises ConfigError: an unknown class name, none given, a class not trained
        yet, or every class learnt (nothing would be retained).
    """
    names = class_names(stream)
    if len(classes) == 0:
        raise ConfigError(f"{where}: the list of classes to forget is empty")
    ids = []
    for c in classes:
        name = str(c)
        if name not in names:
            raise ConfigError(
                f"{where}: unknown class {name!r}; the classes of this stream are {names}"
            )
        ids.append(names.index(name))
    learnt = {c for exp in stream.experiences[:upto] for c in exp.classes}
    unseen = [names[i] for i in ids if i not in learnt]
    if unseen:
        raise ConfigError(
            f"{where}: class(es) {unseen} not trained yet (after {upto} experience(s) the model knows "
            f"{sorted(names[c] for c in learnt)})"
        )
    if learnt <= set(ids):
        raise ConfigError(f"{where}: forgetting every class learnt so far ({len(learnt)}) leaves nothing to retain")
    return sorted(set(ids))


def sample_index(samples: Any, size: int, where: str) -> torch.Tensor:
    """Sample indices as a sorted, unique long tensor, each in ``[0, size)``.

    :raises ConfigError: empty, not integers, or out of range.
    """
    if isinstance(samples, torch.Tensor):
        samples = samples.flatten().tolist()
    items = list(samples)
    if not items:
        raise ConfigError(f"{where}: the forget set is empty (no sample indices given)")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ConfigError(f"{where}: sample indices must be integers, got {items[:5]}")
    bad = [i for i in items if not 0 <= i < size]
    if bad:
        raise ConfigError(
            f"{where}: sample indices {bad[:5]} are outside the {size} training samples (0 to {size - 1})"
        )
    return torch.tensor(sorted(set(items)), dtype=torch.long)


def resolve(run: Any, request: dict[str, Any], where: str = "unlearn") -> ForgetSets:
    """The sets of ``request`` (one of ``classes``, ``samples`` or ``data``).

    :raises ConfigError: no or several kinds of target, a request that does not
        fit the run (unknown or unseen classes, every class, indices out of
        range, an experience not trained).
    :raises DataError: nothing trained yet, or no sample to forget in the data.
    """
    kinds = [k for k in ("classes", "samples", "data") if request.get(k) is not None]
    if len(kinds) != 1:
        raise ConfigError(
            f"{where}: name what to forget with exactly one of 'classes', 'samples' or 'data', got {kinds or 'none'}"
        )
    upto = n_seen(run)
    if upto == 0:
        raise DataError(f"{where}: nothing has been trained yet")
    seen = run.stream.experiences[:upto]
    experience = request.get("experience")
    if experience is not None and kinds[0] != "samples":
        raise ConfigError(
            f"{where}: 'experience' selects where sample indices point; it needs 'samples'"
        )

    if kinds[0] == "classes":
        classes = request["classes"]
        classes = [classes] if isinstance(classes, (str, int)) else list(classes)
        ids = class_ids(run.stream, classes, upto, where)
        id_t = torch.tensor(ids, dtype=torch.long)
        train_masks = [torch.isin(e.train.y, id_t.to(e.train.y.device)) for e in seen]
        test_masks = [torch.isin(e.test.y, id_t.to(e.test.y.device)) for e in seen]
        forget_train = _concat(
            [_mask_subset(e.train, m) for e, m in zip(seen, train_masks, strict=True)]
        )
        if len(forget_train) == 0:
            raise DataError(
                f"{where}: the forget set is empty: no training samples of classes {classes} seen so far"
            )
        names = class_names(run.stream)
        described: dict[str, Any] = {
            "classes": [names[i] for i in ids],
            "class_ids": ids,
            "forget_samples": len(forget_train),
        }
        return ForgetSets(forget_train, described, seen, train_masks, test_masks)

    if kinds[0] == "samples":
        sizes = [len(e.train) for e in seen]
        offset, size = 0, sum(sizes)
        if experience is not None:
            if (
                isinstance(experience, bool)
                or not isinstance(experience, int)
                or not 0 <= experience < upto
            ):
                raise ConfigError(
                    f"{where}: experience {experience!r} has not been trained (experiences 0 to {upto - 1} have)"
                )
            offset, size = sum(sizes[:experience]), sizes[experience]
        index = sample_index(request["samples"], size, where) + offset
        train_masks, parts, start = [], [], 0
        for e, n in zip(seen, sizes, strict=True):
            local = index[(index >= start) & (index < start + n)] - start
            mask = torch.zeros(n, dtype=torch.bool)
            mask[local] = True
            train_masks.append(mask)
            if len(local):
                parts.append(e.train.subset(local))
            start += n
        described = {
            "samples": [int(i) for i in index - offset],
            "forget_samples": len(index),
        }
        if experience is not None:
            described["experience"] = experience
        return ForgetSets(_concat(parts), described, seen, train_masks, None)

    data = request["data"]
    if not hasattr(data, "batches") or not hasattr(data, "y"):
        raise ConfigError(
            f"{where}: 'data' must be a TensorData (or LoaderData), got {type(data).__name__}"
        )
    if len(data) == 0:
        raise DataError(f"{where}: the forget set is empty (the data given has no samples)")
    data = data.to(run.device)
    return ForgetSets(data, {"data": repr(data), "forget_samples": len(data)}, seen, None, None)
