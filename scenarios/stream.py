"""The stream core: batches, in-memory data, experiences and streams.

An :class:`Experience` is one step of a continual-learning stream: the classes
it introduces, its task label, and its training and test data. A
:class:`Stream` is the ordered sequence of experiences. Data that fits in
memory is a :class:`TensorData`, batched by index, on the training device,
without a DataLoader.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Batch:
    """Inputs ``x``, class labels ``y`` and task labels ``t`` of some samples."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.x.to(device, non_blocking=non_blocking),
            self.y.to(device, non_blocking=non_blocking),
            self.t.to(device, non_blocking=non_blocking),
        )

    @staticmethod
    def cat(batches: Sequence[Batch]) -> Batch:
        """Concatenate batches along the sample dimension."""
        if len(batches) == 1:
            return batches[0]
        return Batch(
            torch.cat([b.x for b in batches]),
            torch.cat([b.y for b in batches]),
            torch.cat([b.t for b in batches]),
        )


class TensorData:
    """A data set held as tensors: inputs ``x`` [N, ...], labels ``y`` [N], task
    labels ``t`` [N]. Batches are slices by index, on whatever device the
    tensors are on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x = x
        self.y = y.long()
        self.t = torch.zeros_like(self.y) if t is None else t.long()

    def __len__(self) -> int:
        return self.y.shape[0]

    def __repr__(self) -> str:
        return f"TensorData(n={len(self)}, x={tuple(self.x.shape[1:])}, device={self.x.device})"

    @property
    def device(self) -> torch.device:
        return self.x.device

    def classes(self) -> list[int]:
        return sorted(int(c) for c in torch.unique(self.y).tolist())

    def to(self, device: torch.device | str) -> TensorData:
        if self.x.device == torch.device(device):
            return self
        return TensorData(self.x.to(device), self.y.to(device), self.t.to(device))

    def subset(self, index: torch.Tensor | Sequence[int]) -> TensorData:
        index = torch.as_tensor(index, dtype=torch.long, device=self.x.device)
        return TensorData(self.x[index], self.y[index], self.t[index])

    def batch(self, index: torch.Tensor) -> Batch:
        return Batch(self.x[index], self.y[index], self.t[index])

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield batches; with ``shuffle``, in an order drawn from ``generator``
        (a CPU generator, so the order is the same on every device)."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.x.device)
            stop = n - n % batch_size if drop_last else n
            for start in range(0, stop, batch_size):
                yield self.batch(order[start : start + batch_size])
        else:
            stop = n - n % batch_size if drop_last else n
            for start in range(0, stop, batch_size):
                end = start + batch_size
                yield Batch(self.x[start:end], self.y[start:end], self.t[start:end])

    @staticmethod
    def concat(parts: Sequence[TensorData]) -> TensorData:
        return TensorData(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.t for p in parts]),
        )


@dataclass
class Experience:
    """One step of a stream.

    :ivar index: position in the stream, from 0.
    :ivar classes: the classes whose training samples this experience holds
        (labels as the model sees them).
    :ivar task: the task label (0 for class- and domain-incremental streams).
    :ivar train: training data.
    :ivar test: test data of the same classes / domain.
    :ivar val: validation data carved from train, if asked for.
    """

    index: int
    classes: list[int]
    task: int
    train: TensorData
    test: TensorData
    val: TensorData | None = None

    def __repr__(self) -> str:
        return (
            f"Experience(index={self.index}, classes={self.classes}, task={self.task}, "
            f"train={len(self.train)}, test={len(self.test)})"
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

    def to(self, device: torch.device | str) -> Stream:
        """The same stream with every experience's data on ``device``."""
        for exp in self.experiences:
            exp.train = exp.train.to(device)
            exp.test = exp.test.to(device)
            if exp.val is not None:
                exp.val = exp.val.to(device)
        return self
