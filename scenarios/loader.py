"""Data read through a DataLoader: for data sets that do not fit in memory.

:class:`LoaderData` offers the interface of
:class:`~contlearn.scenarios.stream.TensorData` (``len``, ``y``, ``t``,
``batches``, ``subset``, ``map``, ``to``...) over a map-style dataset whose
items are single inputs, decoded and transformed in DataLoader workers. Labels
are held as tensors in the main process. The sample order is the same CPU
generator draw as TensorData's (``torch.randperm(n, generator)``), fed to the
DataLoader as a batch sampler, and augmentation runs on the collated batch in
the main process with the same generator, so for the same seed both storages
give the same batches, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from contlearn.scenarios.stream import Batch, _rows, shared_augment
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from contlearn.errors import DataError


class Indexed(Dataset):
    """Items ``index[i]`` of ``base``."""

    def __init__(self, base: Dataset, index: torch.Tensor):
        self.base, self.index = base, index.long().cpu()

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.base[int(self.index[i])]


class Mapped(Dataset):
    """Items of ``base`` through a deterministic batch transform, one at a time."""

    def __init__(self, base: Dataset, op: Callable[[torch.Tensor], torch.Tensor]):
        self.base, self.op = base, op

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.op(self.base[i].unsqueeze(0))[0]


class LoaderData:
    """Data whose inputs are read from ``dataset`` (items are input tensors)
    through a DataLoader with ``num_workers`` workers, into pinned memory when
    the target device is a GPU.

    :param dataset: a map-style dataset of inputs, ``len(dataset) == len(y)``.
    :param y: labels [N] (kept on the CPU).
    :param t: task labels [N]; zeros when ``None``.
    :param augment: random transform applied to each batch, on the device.
    """

    def __init__(
        self,
        dataset: Dataset,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        *,
        augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
    ):
        if len(dataset) != y.shape[0]:  # type: ignore[arg-type]
            raise ValueError(f"dataset has {len(dataset)} items but y has {y.shape[0]}")  # type: ignore[arg-type]
        self.dataset = dataset
        self.y = y.long().cpu()
        self.t = torch.zeros_like(self.y) if t is None else t.long().cpu()
        self.augment = augment
        self.num_workers = num_workers
        self._device = torch.device(device)

    def _like(self, dataset: Dataset | None = None, y=None, t=None, **changes: Any) -> LoaderData:
        kwargs = {"augment": self.augment, "num_workers": self.num_workers, "device": self._device, **changes}
        return LoaderData(
            self.dataset if dataset is None else dataset,
            self.y if y is None else y,
            self.t if t is None else t,
            **kwargs,
        )

    def __len__(self) -> int:
        return self.y.shape[0]

    def __repr__(self) -> str:
        return f"LoaderData(n={len(self)}, workers={self.num_workers}, device={self._device})"

    @property
    def x(self) -> torch.Tensor:
        raise DataError(
            "this data is read through a DataLoader and has no in-memory x; "
            "use batches(), batch(index) or subset(), or scenario.storage=tensor"
        )

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset[0].shape) if len(self) else ()

    def classes(self) -> list[int]:
        return sorted(int(c) for c in torch.unique(self.y).tolist())

    def to(self, device: torch.device | str) -> LoaderData:
        return self if torch.device(device) == self._device else self._like(device=device)

    def subset(self, index: torch.Tensor | Sequence[int]) -> LoaderData:
        index = _rows(index).cpu()
        return self._like(Indexed(self.dataset, index), self.y[index], self.t[index])

    def map(self, op: Callable[[torch.Tensor], torch.Tensor]) -> LoaderData:
        return self._like(Mapped(self.dataset, op))

    def with_labels(self, y: torch.Tensor) -> LoaderData:
        return self._like(y=y.long().cpu())

    def with_tasks(self, task: int) -> LoaderData:
        return self._like(t=torch.full_like(self.y, task))

    def with_augment(self, augment) -> LoaderData:
        return self._like(augment=augment)

    def batch(self, index: torch.Tensor) -> Batch:
        """The samples at ``index``, without augmentation, on the device."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        x = torch.stack([self.dataset[int(i)] for i in index])
        return Batch(x, self.y[index], self.t[index]).to(self._device)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield batches in the order TensorData would (same generator draw)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        chunks = [order[s : s + batch_size] for s in range(0, stop, batch_size)]
        if not chunks:
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=[c.tolist() for c in chunks],
            num_workers=self.num_workers,
            collate_fn=torch.stack,
            pin_memory=self._device.type == "cuda",
            # a private generator: the DataLoader draws its workers' base seed
            # from it, which must not consume the global RNG the run uses
            generator=torch.Generator(),
        )
        non_blocking = self._device.type == "cuda"
        inputs = iter(loader)
        for index in chunks:
            try:
                x = next(inputs)
            except (DataError, RuntimeError) as exc:
                raise loading_error(exc) from None
            batch = Batch(x, self.y[index], self.t[index]).to(self._device, non_blocking=non_blocking)
            if self.augment is not None:
                batch = Batch(self.augment(batch.x, generator), batch.y, batch.t, raw=batch.x)
            yield batch

    @staticmethod
    def concat(parts: Sequence[Any]) -> LoaderData:
        """One data set of all ``parts`` (TensorData parts are wrapped), augmented
        as :meth:`TensorData.concat` says."""
        datasets, ys, ts = [], [], []
        for p in parts:
            datasets.append(p.dataset if isinstance(p, LoaderData) else _TensorItems(p.x))
            ys.append(p.y.cpu())
            ts.append(p.t.cpu())
        first = next(p for p in parts if isinstance(p, LoaderData))
        return first._like(ConcatDataset(datasets), torch.cat(ys), torch.cat(ts), augment=shared_augment(parts))


class _TensorItems(Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x.cpu()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def loading_error(exc: BaseException) -> DataError:
    """One line for a failure to read or stack inputs, in this process or in a
    DataLoader worker (whose error arrives with the worker's traceback in its
    message: its last line is the original error)."""
    message = str(exc).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last  # "module.Error: what" -> "what"
    if "stack expects each tensor to be equal size" in message or "Sizes of tensors must match" in message:
        return DataError(
            f"the inputs of this data set do not all have one shape ({message}); set scenario.image_size to resize them"
        )
    return DataError(message if isinstance(exc, DataError) else f"cannot read the data: {message}")
