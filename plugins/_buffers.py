"""Rehearsal buffers: a reservoir and a balanced memory of past samples.

Both draw every random choice from a CPU ``torch.Generator`` and keep their
bookkeeping (counts, which slot holds what) on the host, so adding a batch or
drawing one never reads a tensor back from the device. Samples are stored in
preallocated tensors on ``storage`` (the training device or the CPU).

* :class:`ReservoirBuffer`: Vitter's algorithm R (Vitter, "Random sampling with
  a reservoir", ACM TOMS 1985), as experience replay uses it (Chaudhry et al.,
  "On Tiny Episodic Memories in Continual Learning", 2019): after n samples have
  been offered, each of them is in the buffer with probability ``min(1, size/n)``.
* :class:`BalancedBuffer`: the same number of samples per group seen so far (per
  class, or per experience; up to one more for some, and fewer for a group that
  has fewer samples), each group's share a uniform random subset of that group's
  samples: every sample gets a uniform random key when offered and a group keeps
  its smallest keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from contlearn.scenarios import Batch
from contlearn.scenarios.stream import host_to_device


class _Storage:
    """Preallocated ``x``, ``y``, ``t`` tensors of ``size`` rows, made at the first write."""

    def __init__(self, size: int, device: torch.device | str | None):
        self.size = size
        self.device = torch.device(device) if device is not None else None
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.t: torch.Tensor | None = None

    def _allocate(self, batch: Batch) -> None:
        device = self.device if self.device is not None else batch.x.device
        pin = device.type == "cpu" and batch.x.device.type == "cuda"
        self.x = torch.zeros((self.size, *batch.x.shape[1:]), dtype=batch.x.dtype, device=device, pin_memory=pin)
        self.y = torch.zeros(self.size, dtype=torch.long, device=device, pin_memory=pin)
        self.t = torch.zeros(self.size, dtype=torch.long, device=device, pin_memory=pin)

    def write(self, slots: torch.Tensor, batch: Batch, rows: torch.Tensor) -> None:
        """``self[slots[k]] = batch[rows[k]]``; ``slots`` and ``rows`` are CPU index tensors."""
        if len(slots) == 0:
            return
        if self.x is None:
            self._allocate(batch)
        assert self.x is not None and self.y is not None and self.t is not None
        src = batch.x.device
        rows = host_to_device(rows, src)
        slots = host_to_device(slots, self.x.device)
        for dst, values in ((self.x, batch.x), (self.y, batch.y), (self.t, batch.t)):
            # device -> host copies block (a CPU buffer written from the GPU costs a copy per write)
            dst.index_copy_(0, slots, values.index_select(0, rows).to(dst.device))

    def read(self, slots: torch.Tensor, device: torch.device | str) -> Batch:
        """The samples in ``slots`` (a CPU index tensor), on ``device``."""
        assert self.x is not None and self.y is not None and self.t is not None
        index = host_to_device(slots, self.x.device)
        parts = [v.index_select(0, index) for v in (self.x, self.y, self.t)]
        if self.x.device != torch.device(device):
            parts = [host_to_device(p, torch.device(device)) for p in parts]
        return Batch(*parts)

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("x", "y", "t"):
            value = state[name]
            if value is not None and self.device is not None:
                value = value.to(self.device)
            setattr(self, name, value)


class _Buffer:
    """``size`` slots of stored samples and the generator that draws from them."""

    def __init__(self, size: int, generator: torch.Generator, device: torch.device | str | None = None):
        if size < 1:
            raise ValueError(f"buffer size must be at least 1, got {size}")
        self.size = size
        self.generator = generator
        self.storage = _Storage(size, device)

    def _draw(self, filled: torch.Tensor, n: int, device: torch.device | str) -> Batch | None:
        """``n`` of the ``filled`` slots, uniformly without replacement (all when fewer)."""
        if len(filled) == 0:
            return None
        pick = torch.randperm(len(filled), generator=self.generator)[: min(n, len(filled))]
        return self.storage.read(filled[pick], device)


class ReservoirBuffer(_Buffer):
    """A uniform sample of everything offered so far (algorithm R).

    :param size: the number of samples kept.
    :param generator: the CPU generator that draws which samples stay.
    :param device: where samples are stored; ``None``: where they come from.
    """

    def __init__(self, size: int, generator: torch.Generator, device: torch.device | str | None = None):
        super().__init__(size, generator, device)
        self.n_seen = 0
        self.ids = torch.full((size,), -1, dtype=torch.long)  # which offered sample each slot holds

    def __len__(self) -> int:
        return min(self.n_seen, self.size)

    def add(self, batch: Batch) -> None:
        """Offer the samples of ``batch``, in order (nothing is read from the device)."""
        n = len(batch)
        if n == 0:
            return
        position = torch.arange(self.n_seen, self.n_seen + n)  # 0-based index in the stream
        # Algorithm R: sample number k (from 0) takes slot k while the buffer fills,
        # then replaces a uniform slot j in [0, k] when j < size.
        draw = (torch.rand(n, generator=self.generator, dtype=torch.float64) * (position + 1)).long()
        slot = torch.where(position < self.size, position, draw)
        keep = slot < self.size
        rows = torch.nonzero(keep).flatten()
        slots = slot[keep]
        if len(slots) > 1:  # a later sample overwrites an earlier one in the same slot: keep the last
            order = torch.arange(len(slots))
            last = torch.zeros(self.size, dtype=torch.long).scatter_reduce_(
                0, slots, order, reduce="amax", include_self=False
            )
            unique = last[slots] == order
            rows, slots = rows[unique], slots[unique]
        self.storage.write(slots, batch, rows)
        self.ids[slots] = position[rows]
        self.n_seen += n

    def sample(self, n: int, device: torch.device | str) -> Batch | None:
        """``n`` stored samples drawn uniformly without replacement (all of them when
        fewer are stored), or ``None`` when the buffer is empty."""
        return self._draw(torch.arange(len(self)), n, device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_seen": self.n_seen,
            "ids": self.ids.clone(),
            "storage": self.storage.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_seen = int(state["n_seen"])
        self.ids = state["ids"].clone()
        self.storage.load_state_dict(state["storage"])


def balanced_quotas(available: dict[int, int], size: int) -> dict[int, int]:
    """Share ``size`` slots among groups (classes, experiences) as evenly as possible
    (water filling): with the highest level ``L`` such that ``sum_c min(available_c,
    L) <= size``, every group gets ``min(available_c, L)``, and the slots left over
    go one each to groups with more samples than ``L``, smaller ids first."""
    counts = sorted(available.values())
    level, used, below = 0, 0, 0  # below: classes with available <= level
    while below < len(counts):
        # raise the level to the next class's count, or as far as the slots allow
        step = counts[below] - level
        open_classes = len(counts) - below
        if used + step * open_classes > size:
            level += (size - used) // open_classes
            break
        used += step * open_classes
        level = counts[below]
        while below < len(counts) and counts[below] <= level:
            below += 1
    quota = {c: min(a, level) for c, a in available.items()}
    left = size - sum(quota.values())
    for c in sorted(available):
        if left == 0:
            break
        if available[c] > quota[c]:
            quota[c] += 1
            left -= 1
    return quota


class BalancedBuffer(_Buffer):
    """An equal share of ``size`` per group seen, each a uniform subset of its group.

    The groups are what :meth:`add` is given with the samples: their classes
    (``replay.policy: class_balanced``; Avalanche's ``ClassBalancedBuffer``) or
    their experience (``experience_balanced``; Avalanche's
    ``ExperienceBalancedBuffer``, its ``ReplayPlugin``'s default).

    :param size: the total number of samples kept.
    :param generator: the CPU generator that draws the samples' keys.
    :param device: where samples are stored; ``None``: where they come from.
    """

    def __init__(self, size: int, generator: torch.Generator, device: torch.device | str | None = None):
        super().__init__(size, generator, device)
        self.groups = torch.full((size,), -1, dtype=torch.long)  # group of each slot; -1: empty
        self.keys = torch.full((size,), float("inf"), dtype=torch.float64)
        self.available: dict[int, int] = {}  # samples of each group offered so far

    def __len__(self) -> int:
        return int((self.groups >= 0).sum())

    def counts(self) -> dict[int, int]:
        """How many samples of each group are stored."""
        groups, counts = torch.unique(self.groups[self.groups >= 0], return_counts=True)
        return {int(g): int(n) for g, n in zip(groups.tolist(), counts.tolist(), strict=True)}

    def add(self, groups: torch.Tensor, fetch: Callable[[torch.Tensor], Batch]) -> None:
        """Offer samples (e.g. all of an experience's data) whose groups, on the
        CPU, are ``groups`` (non-negative integers), and rebalance every group to
        its quota. Only the samples that enter the buffer are read: ``fetch(rows)``
        returns the samples at positions ``rows`` (a CPU index tensor) as a batch."""
        n = len(groups)
        if n == 0:
            return
        for c, k in zip(*torch.unique(groups, return_counts=True), strict=True):
            self.available[int(c)] = self.available.get(int(c), 0) + int(k)
        quota = balanced_quotas(self.available, self.size)
        new_keys = torch.rand(n, generator=self.generator, dtype=torch.float64)
        # For every group: the stored samples and the offered ones compete by key;
        # the quota smallest stay. Slots of dropped samples are freed first, then filled.
        keep_new: list[torch.Tensor] = []
        for c, q in quota.items():
            stored = torch.nonzero(self.groups == c).flatten()
            offered = torch.nonzero(groups == c).flatten()
            keys = torch.cat([self.keys[stored], new_keys[offered]])
            order = torch.argsort(keys)[:q]
            kept_old = order[order < len(stored)]
            drop = torch.ones(len(stored), dtype=torch.bool)
            drop[kept_old] = False
            freed = stored[drop]
            self.groups[freed] = -1
            self.keys[freed] = float("inf")
            keep_new.append(offered[order[order >= len(stored)] - len(stored)])
        rows = torch.cat(keep_new) if keep_new else torch.zeros(0, dtype=torch.long)
        if len(rows) == 0:
            return
        slots = torch.nonzero(self.groups < 0).flatten()[: len(rows)]
        self.storage.write(slots, fetch(rows), torch.arange(len(rows)))
        self.groups[slots] = groups[rows]
        self.keys[slots] = new_keys[rows]

    def sample(self, n: int, device: torch.device | str) -> Batch | None:
        """``n`` stored samples drawn uniformly without replacement, or ``None`` when empty."""
        return self._draw(torch.nonzero(self.groups >= 0).flatten(), n, device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups.clone(),
            "keys": self.keys.clone(),
            "available": dict(self.available),
            "storage": self.storage.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = state["groups" if "groups" in state else "labels"].clone()  # "labels": earlier checkpoints
        self.keys = state["keys"].clone()
        self.available = {int(c): int(k) for c, k in state["available"].items()}
        self.storage.load_state_dict(state["storage"])
