"""The stream core: batches, in-memory data, experiences and streams.

An :class:`Experience` is one step of a continual-learning stream: the classes
it introduces, its task label, and its training and test data. A
:class:`Stream` is the ordered sequence of experiences. Data that fits in
memory is a :class:`TensorData`, batched by index, on the training device,
without a DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from contlearn.scenarios.loader import LoaderData


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor (drawn from a CPU generator, so the
    same on every device) reaches a GPU without waiting for it: pinned, then
    copied asynchronously, where a copy from pageable memory would wait until
    the GPU has run everything queued (a stall at every training step)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _rows(index: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Row indices as int64: from indices, or from a boolean mask (its True rows)."""
    index = torch.as_tensor(index)
    if index.dtype == torch.bool:
        return index.nonzero().flatten()
    return index.long()


@dataclass(slots=True)
class Batch:
    """Inputs ``x``, class labels ``y`` and task labels ``t`` of some samples;
    ``raw``, for a training batch whose inputs were augmented, the inputs before
    the augmentation (what a rehearsal buffer keeps, to augment them afresh when
    it replays them), ``None`` otherwise."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    raw: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.x.to(device, non_blocking=non_blocking),
            self.y.to(device, non_blocking=non_blocking),
            self.t.to(device, non_blocking=non_blocking),
            None if self.raw is None else self.raw.to(device, non_blocking=non_blocking),
        )

    @staticmethod
    def cat(batches: Sequence[Batch]) -> Batch:
        """Concatenate batches along the sample dimension (without ``raw``: the
        batch a step trains on needs the inputs it sees, and a copy of the
        un-augmented ones would cost a concatenation at every step)."""
        if len(batches) == 1:
            return batches[0]
        return Batch(
            torch.cat([b.x for b in batches]),
            torch.cat([b.y for b in batches]),
            torch.cat([b.t for b in batches]),
        )

    @property
    def unaugmented(self) -> Batch:
        """The batch with its inputs before augmentation (itself if it had none)."""
        return self if self.raw is None else Batch(self.raw, self.y, self.t)


class TensorData:
    """A data set held as tensors: inputs ``x`` [N, ...], labels ``y`` [N], task
    labels ``t`` [N]. Batches are slices by index, on whatever device the
    tensors are on.

    ``x`` holds the inputs as the model sees them, deterministic transforms
    (normalisation, domain shifts) applied; ``augment``, if set, is the random
    augmentation that :meth:`batches` applies to each batch.
    :class:`~contlearn.scenarios.loader.LoaderData` offers the same interface for
    data read through a DataLoader.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
    ):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x = x
        self.y = y.long()
        self.t = torch.zeros_like(self.y) if t is None else t.long()
        #: random transform applied to every batch of :meth:`batches` (training data only)
        self.augment = augment

    def __len__(self) -> int:
        return self.y.shape[0]

    def __repr__(self) -> str:
        return f"TensorData(n={len(self)}, x={tuple(self.x.shape[1:])}, device={self.x.device})"

    @property
    def device(self) -> torch.device:
        return self.x.device

    def classes(self) -> list[int]:
        return sorted(int(c) for c in torch.unique(self.y).tolist())

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def to(self, device: torch.device | str) -> TensorData:
        if self.x.device == torch.device(device):
            return self
        return TensorData(self.x.to(device), self.y.to(device), self.t.to(device), self.augment)

    def subset(self, index: torch.Tensor | Sequence[int]) -> TensorData:
        """The samples at ``index``; a ``range`` of step 1 gives views, not copies."""
        if isinstance(index, range) and index.step == 1 and 0 <= index.start and index.stop <= len(self):
            rows = slice(index.start, index.stop)
            return TensorData(self.x[rows], self.y[rows], self.t[rows], self.augment)
        index = _rows(index).to(self.x.device)
        return TensorData(self.x[index], self.y[index], self.t[index], self.augment)

    def map(self, op: Callable[[torch.Tensor], torch.Tensor], chunk: int = 8192) -> TensorData:
        """The data with a deterministic transform applied to its inputs (in
        chunks of ``chunk`` samples)."""
        if len(self) == 0:
            return self
        x = torch.cat([op(self.x[s : s + chunk]) for s in range(0, len(self), chunk)])
        return TensorData(x, self.y, self.t, self.augment)

    def with_labels(self, y: torch.Tensor) -> TensorData:
        """The data with labels ``y`` instead."""
        return TensorData(self.x, y.to(self.x.device), self.t, self.augment)

    def with_tasks(self, task: int) -> TensorData:
        """The data with every task label set to ``task``."""
        return TensorData(self.x, self.y, torch.full_like(self.y, task), self.augment)

    def with_augment(self, augment) -> TensorData:
        return TensorData(self.x, self.y, self.t, augment)

    def batch(self, index: torch.Tensor) -> Batch:
        """The samples at ``index``, without augmentation."""
        return Batch(self.x[index], self.y[index], self.t[index])

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield batches; with ``shuffle``, in an order drawn from ``generator``
        (a CPU generator, so the order is the same on every device). ``augment``
        draws from ``generator`` too, after the order."""
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if shuffle:
            order = host_to_device(torch.randperm(n, generator=generator), self.x.device)
            for start in range(0, stop, batch_size):
                yield self._augmented(self.batch(order[start : start + batch_size]), generator)
        else:
            for start in range(0, stop, batch_size):
                end = start + batch_size
                yield self._augmented(Batch(self.x[start:end], self.y[start:end], self.t[start:end]), generator)

    def _augmented(self, batch: Batch, generator: torch.Generator | None) -> Batch:
        if self.augment is None:
            return batch
        return Batch(self.augment(batch.x, generator), batch.y, batch.t, raw=batch.x)

    @staticmethod
    def concat(parts: Sequence[Any]) -> Any:
        """One data set of all ``parts`` (a :class:`LoaderData` if any part is one),
        augmented by the parts' augmentation: every sample of it, those of parts
        without one too (``concat([exp.train, more])`` trains on ``more`` as on
        ``exp.train``, as iCaRL's exemplars are); parts with different
        augmentations are a ValueError."""
        if not all(isinstance(p, TensorData) for p in parts):
            from contlearn.scenarios.loader import LoaderData

            return LoaderData.concat(parts)
        augment = shared_augment(parts)
        return TensorData(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.t for p in parts]),
            augment,
        )


def shared_augment(parts: Sequence[Any]) -> Any:
    """The one augmentation among ``parts`` (``None`` if none has one)."""
    found = {id(a): a for a in (getattr(p, "augment", None) for p in parts) if a is not None}
    if len(found) > 1:
        raise ValueError(
            f"concat: the parts have {len(found)} different augmentations and the result can have one; "
            "give the parts the same one (part.with_augment(...))"
        )
    return next(iter(found.values()), None)


@dataclass
class Experience:
    """One step of a stream.

    :ivar index: position in the stream, from 0.
    :ivar classes: the classes whose training samples this experience holds
        (labels as the model sees them).
    :ivar task: the task label (0 for class- and domain-incremental streams).
    :ivar train: training data (:class:`TensorData`, or
        :class:`~contlearn.scenarios.loader.LoaderData` for data read through a
        DataLoader).
    :ivar test: test data of the same classes / domain.
    :ivar val: validation data carved from train, if asked for.
    :ivar shift: the input shift of a domain-incremental experience, e.g.
        ``Rotate(36)``; ``None`` otherwise.
    """

    index: int
    classes: list[int]
    task: int
    train: TensorData | LoaderData
    test: TensorData | LoaderData
    val: TensorData | LoaderData | None = None
    shift: Any = None

    def __repr__(self) -> str:
        return (
            f"Experience(index={self.index}, classes={self.classes}, task={self.task}, "
            f"train={len(self.train)}, test={len(self.test)}"
            + (f", val={len(self.val)}" if self.val is not None else "")
            + (f", shift={self.shift!r}" if self.shift is not None else "")
            + ")"
        )


@dataclass
class Stream:
    """An ordered sequence of experiences.

    :ivar setting: ``class``, ``task`` or ``domain`` incremental.
    :ivar n_classes: the number of distinct labels over the whole stream.
    :ivar class_names: the original label of each model-side class id.
    :ivar input_shape: shape of one input, without the batch dimension.
    """

    experiences: list[Experience]
    setting: str
    n_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str] = field(default_factory=list)
    name: str = ""

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    def __getitem__(self, index: int) -> Experience:
        return self.experiences[index]

    @property
    def n_tasks(self) -> int:
        return len({e.task for e in self.experiences})

    @classmethod
    def from_tensors(
        cls,
        x_train: Any,
        y_train: Any,
        x_test: Any = None,
        y_test: Any = None,
        *,
        seed: int = 0,
        name: str = "tensors",
        **scenario: Any,
    ) -> Stream:
        """A stream from in-memory arrays or tensors.

        ``x_*`` are inputs [N, ...] (uint8 images are divided by 255), ``y_*``
        integer labels or names. Without a test set, a stratified split of the
        training data by ``seed``. ``scenario`` takes the fields of the
        ``scenario`` config section (``setting``, ``n_experiences``,
        ``class_order``, ``transform``, ``train_transform`` ...; see
        docs/scenarios.md), e.g.
        ``Stream.from_tensors(x, y, setting="domain", transform="permute", n_experiences=3)``.
        """
        from contlearn.scenarios.build import build_from_split, check_scenario, scenario_config
        from contlearn.scenarios.sources import Split

        from contlearn.errors import ConfigError

        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if scenario.get("domains") is not None:
            raise ConfigError(
                "scenario.domains names data sets to load; Stream.from_tensors streams the tensors it is given "
                "(a domain-incremental stream of them: setting='domain', transform='permute' or 'rotate')"
            )
        cfg = scenario_config(scenario)
        check_scenario(cfg)  # before the split, which test_fraction drives
        split = Split.from_arrays(
            x_train, y_train, x_test, y_test, name=name, test_fraction=cfg.test_fraction, seed=seed
        )
        return build_from_split(split, cfg, seed)

    def to(self, device: torch.device | str) -> Stream:
        """The same stream with every experience's data on ``device``."""
        for exp in self.experiences:
            exp.train = exp.train.to(device)
            exp.test = exp.test.to(device)
            if exp.val is not None:
                exp.val = exp.val.to(device)
        return self
