"""Data-parallel training over several processes (``torchrun``, torch.distributed).

A run started by ``torchrun --nproc_per_node N -m contlearn run ...`` trains on N
processes. Every process builds the same run (same seed, same data, same plugins)
and draws the same global batch of ``train.batch_size`` samples, extra samples
(rehearsal) included; each then computes the loss on its contiguous share of the
batch, and the gradients are summed over the processes with each share weighted
by its size. The optimizer step therefore sees the gradient of the whole global
batch's mean loss, as one process would, and every process keeps identical
weights, optimizer state and plugin state (buffers, Fisher information, teachers
are computed the same way everywhere). The forward and backward passes of the
training batch are divided, and so is evaluation: each process predicts its
contiguous share of every test set and the counts of hits (and the confusion
matrix) are summed, unless a plugin sets ``sequential_evaluation = True`` (its
predictions depend on the test samples before them, as DMN's test-time memory
does; every process then evaluates all test data, in order). EWC's and SSD's
Fisher passes (batch-mode and per-sample) are shared out and summed the same way; the other
plugins' own passes over the data run on every process. Only process 0 writes
(run directory, checkpoints, results).

BatchNorm layers normalise each process's share with its own batch statistics,
and after every step process 0's buffers (running statistics) replace the
others' (what DDP's ``broadcast_buffers`` does), so with BatchNorm results
differ slightly from one process but every process keeps the same model. Random
draws inside a step (dropout masks, a plugin's augmented views) are made for
each process's share, so they differ from one process's draws; every process's
random generators are set to process 0's before each experience, so that what
an experience starts with (a grown head, new adapters) is drawn the same way
everywhere. A checkpoint keeps every process's generators, and a resume on as
many processes gives each its own back, so that it continues exactly.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from contlearn._environment import environment_int, environment_world_size
from contlearn.errors import ConfigError


def _leave_process_group() -> None:
    """At exit, leave the process group contlearn joined, as NCCL asks of a program.

    Then wait 50 ms without the GIL: gloo's worker threads free a finished
    collective's tensors after the caller has its result, and that needs the GIL;
    a worker that asks for it once the interpreter is finalizing ends its thread
    inside C++ code that cannot be unwound, which aborts the process (SIGABRT, so
    torchrun reports a failed run). Measured on two CPU processes: a script ending
    right after its last collective aborted 5 times in 12, and 0 in 12 once it
    destroyed the group; the stop test's script 1 in 20, then 0 in 20 with this."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    time.sleep(0.05)


@dataclass
class DistributedView:
    """Where this process stands among the processes of a run (one by default)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> tuple[DistributedView, torch.device]:
        """Join the process group ``torchrun`` describes (gloo on the CPU, NCCL on
        CUDA, each process on GPU ``LOCAL_RANK``), or stay alone. Returns the view
        and the device this process trains on."""
        world = environment_world_size()
        if world <= 1:
            return cls(), device
        dist = torch.distributed
        if not dist.is_available():
            raise ConfigError(f"WORLD_SIZE={world} asks for {world} processes, but this torch has no torch.distributed")
        if device.type == "cuda":
            # One visible GPU: the launcher gave each process its own (CUDA_VISIBLE_DEVICES).
            visible = torch.cuda.device_count()
            if device.index is not None and visible > 1:
                raise ConfigError(
                    f"device={device} under torchrun would put all {world} processes on one GPU; use "
                    "device=cuda or auto (each process takes GPU LOCAL_RANK)"
                )
            local = 0 if visible == 1 else environment_int("LOCAL_RANK", 0)
            if local >= visible:
                raise ConfigError(
                    f"process LOCAL_RANK={local} has no GPU of its own: {visible} visible; "
                    "start at most that many processes per machine (torchrun --nproc_per_node)"
                )
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            atexit.register(_leave_process_group)
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size()), device

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place (a no-op on one process)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def summed(self, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        """``scale`` times each tensor, summed over all processes in one all-reduce
        over a flat copy (the tensors share a dtype); the sums are views of it."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if scale != 1.0:
            flat.mul_(scale)
        self.all_reduce_(flat)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]

    def part(self, n: int) -> range:
        """This process's rows of ``n`` items split without overlap, as evenly as
        they go: ``range(rank * n // world, (rank + 1) * n // world)`` (empty for
        some processes when ``n < world``)."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def divides(self, n: int) -> bool:
        """Whether a global batch of ``n`` is divided into shares (several processes
        and at least one sample each); a batch-coupled loss gathers it only then."""
        return 1 < self.world_size <= n

    def share(self, n: int) -> tuple[slice, float]:
        """This process's rows of a global batch of ``n`` and the weight of its
        gradient: rows ``[rank * n // world, (rank + 1) * n // world)``, weighted
        by their fraction of ``n``. A batch smaller than the number of processes
        is not divided: every process takes all of it, at weight ``1 / world``."""
        if not self.divides(n):
            return slice(0, n), 1.0 / self.world_size
        rows = self.part(n)
        return slice(rows.start, rows.stop), len(rows) / n

    def gather_rows(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` rows of a global batch from each process's share (:meth:`share`):
        this process's ``rows`` as they are (gradients flow through them), the
        others' as constants. A batch-coupled loss (a contrastive one) computed on
        it sees the whole batch; a collective (every process must call it). A
        batch not divided (``n`` smaller than the processes) is returned as is."""
        if not self.divides(n):
            return rows
        parts = [DistributedView(r, self.world_size).part(n) for r in range(self.world_size)]
        width = max(len(p) for p in parts)
        padded = rows.detach().new_zeros((width, *rows.shape[1:]))
        padded[: len(rows)] = rows.detach()
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, padded)
        pieces = [g[: len(p)] for g, p in zip(gathered, parts, strict=True)]
        pieces[self.rank] = rows
        return torch.cat(pieces)

    @staticmethod
    def whole_batch_loss(loss: torch.Tensor, n: int, share: int) -> torch.Tensor:
        """``loss`` computed on the gathered batch (:meth:`gather_rows`), with its
        gradient scaled by ``n / share``: the loop weights each process's gradient
        by its share of the batch, ``share / n``, and sums them, and the sum of the
        processes' gradients through their own rows is the whole batch's. The
        value is unchanged (the one-process loss)."""
        return loss.detach() + (loss - loss.detach()) * (n / share)

    def broadcast_buffers_(self, module: torch.nn.Module) -> None:
        """Give every process process 0's buffers of ``module`` (BatchNorm's running
        statistics): one broadcast per dtype over a flat copy (a no-op on one process)."""
        if self.world_size <= 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in module.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            torch.distributed.broadcast(flat, src=0)
            for b, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
                b.copy_(part.view_as(b))

    def broadcast_object(self, value: Any) -> Any:
        """Process 0's ``value`` on every process (a collective; a no-op on one process)."""
        if self.world_size <= 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value: Any) -> list[Any] | None:
        """Every process's ``value``, in rank order, on process 0 (``None`` on the
        others); a collective, ``[value]`` on one process."""
        if self.world_size <= 1:
            return [value]
        box: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(value, box, dst=0)
        return box

    def sum_gradients_(self, params: Iterable[torch.nn.Parameter], weight: float) -> None:
        """Replace every gradient by the sum over processes of ``weight * grad``:
        one all-reduce per dtype (:meth:`summed`). A trainable parameter that has
        no gradient on some processes (the head of a task that only some shares
        hold, :class:`~contlearn.models.MultiHead`) takes part with zeros there,
        so that every process sums the same tensors; where no process had a
        gradient it is left without one (one host read, on the processes that
        lacked one), so that the optimizer leaves it alone as on one process."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        missing = [p.grad is None for p in params]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            grad = p.grad
            if grad is None:
                grad = p.grad = torch.zeros_like(p)
            by_dtype.setdefault(grad.dtype, []).append(grad)
        first = next(iter(by_dtype))
        # weight > 0 on every process, so a parameter's sum of weights is > 0 where any process had its gradient;
        # made on the device, element by element (no copy from the host, which would wait for the GPU)
        had = torch.ones(len(params), dtype=first, device=params[0].device)
        for i in (i for i, lacks in enumerate(missing) if lacks):
            had[i] = 0.0
        for dtype, grads in by_dtype.items():
            if dtype == first:
                *totals, had = self.summed([*grads, had], weight)
            else:
                totals = self.summed(grads, weight)
            for g, total in zip(grads, totals, strict=True):
                g.copy_(total)
        if any(missing):
            for p, lacks, anywhere in zip(params, missing, had.tolist(), strict=True):
                if lacks and anywhere == 0:
                    p.grad = None
