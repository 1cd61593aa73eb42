"""Experience replay: rehearse samples of past experiences kept in a small buffer.

At every training step a batch drawn from the buffer is trained on together
with the current batch (the ``extra_samples`` hook), as in experience replay
(ER; Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019;
Rolnick et al., "Experience Replay for Continual Learning", NeurIPS 2019).

Two buffers (:mod:`contlearn.plugins._buffers`):

* ``reservoir``: reservoir sampling (Vitter's algorithm R), updated at every
  step with the current batch after the replay batch is drawn, as in ER. Each
  training sample is offered once: during the first epoch of its experience.
* ``class_balanced``: the same number of slots per class seen, filled at the end
  of each experience with a uniform random subset of each class.
* ``experience_balanced``: the same number of slots per experience seen, each a
  uniform random subset of its experience's samples (Avalanche's
  ``ExperienceBalancedBuffer``, the default of its ``ReplayPlugin``).

Samples are stored before the training augmentation (``scenario.train_transform``'s
random crops and flips), and each replayed batch is augmented afresh when it is
drawn, as Mammoth's ER (``not_aug_inputs`` in, the transform applied in
``get_data``) and Avalanche's replay (buffers of dataset samples) do;
``augment: false`` replays them as stored. Only batches contlearn augmented
(``batch.raw`` set) are augmented again: inside an Avalanche strategy, whose
batches come transformed, samples are stored and replayed as they come.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from contlearn.plugins._buffers import BalancedBuffer, ReservoirBuffer
from contlearn.plugins._common import plugin_generator
from contlearn.scenarios import Batch

from contlearn.errors import ConfigError, choices
from contlearn.hookspecs import hookimpl

POLICIES = ("reservoir", "class_balanced", "experience_balanced")
STORAGES = ("device", "cpu")


class Replay:
    """Experience replay from a reservoir or class-balanced buffer (Chaudhry et al., 2019)."""

    keeps_rehearsal_memory = True  # rehearses samples it keeps (two such plugins: two memories)

    @dataclass
    class Config:
        size: int = 200  # samples kept in the buffer
        policy: str = "reservoir"  # reservoir | class_balanced | experience_balanced
        batch_size: Optional[int] = None  # replayed samples per step; None: train.batch_size
        storage: str = "device"  # device (the training device) | cpu
        augment: bool = True  # augment replayed samples afresh at each draw (stored un-augmented)

        def __post_init__(self) -> None:
            if self.policy not in POLICIES:
                raise ConfigError(f"plugins.replay.policy must be one of {choices(POLICIES)}, got {self.policy!r}")
            if self.storage not in STORAGES:
                raise ConfigError(f"plugins.replay.storage must be one of {choices(STORAGES)}, got {self.storage!r}")
            if self.size < 1:
                raise ConfigError(f"plugins.replay.size must be at least 1, got {self.size}")
            if self.batch_size is not None and self.batch_size < 1:
                raise ConfigError(f"plugins.replay.batch_size must be at least 1, got {self.batch_size}")

    def __init__(self, config: Replay.Config):
        self.config = config
        self.generator = torch.Generator()
        self.buffer: ReservoirBuffer | BalancedBuffer | None = None
        self._pending: dict[str, Any] | None = None
        self._batch_size = 0  # replayed samples per step, set in setup (read at every step)

    def _make_buffer(self, device: torch.device) -> ReservoirBuffer | BalancedBuffer:
        storage = torch.device("cpu") if self.config.storage == "cpu" else device
        cls = ReservoirBuffer if self.config.policy == "reservoir" else BalancedBuffer
        return cls(self.config.size, self.generator, storage)

    @hookimpl
    def setup(self, run: Any) -> None:
        self._batch_size = self.config.batch_size or run.config.train.batch_size
        if self.buffer is None:
            self.generator.manual_seed(plugin_generator(run.config.seed, "replay"))
            self.buffer = self._make_buffer(run.device)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    @hookimpl
    def extra_samples(self, run: Any, batch: Batch) -> Batch | None:
        buffer = self.buffer
        assert buffer is not None, "replay: setup was not called"
        replayed = buffer.sample(self._batch_size, run.device)
        if isinstance(buffer, ReservoirBuffer) and run.epoch == 0:
            buffer.add(batch.unaugmented)
        if replayed is None or batch.raw is None or not self.config.augment:
            return replayed  # the current batch was not augmented here (none set, or Avalanche's own transforms)
        augment = run.experience.train.augment
        return Batch(augment(replayed.x, self.generator), replayed.y, replayed.t, raw=replayed.x)

    @hookimpl
    def after_experience(self, run: Any, exp: Any) -> None:
        if isinstance(self.buffer, BalancedBuffer):
            data = exp.train
            labels = data.y.cpu()
            groups = labels if self.config.policy == "class_balanced" else torch.full_like(labels, exp.index)
            self.buffer.add(groups, lambda rows: data.batch(rows.to(data.y.device)))

    def state_dict(self) -> dict[str, Any]:
        """The buffer's samples and bookkeeping, and the generator's state."""
        if self._pending is not None:
            return self._pending
        if self.buffer is None:
            return {"generator": self.generator.get_state(), "buffer": None}
        return {"generator": self.generator.get_state(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.buffer is None:  # before setup: applied there, once the device is known
            self._pending = state
            return
        self.generator.set_state(state["generator"])
        if state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
