"""The state of one run, handed to every hook.

:class:`Run` carries the model, the optimizer, the stream, the current
experience, the device, the config, a typed stash for plugins and a view of the
distributed setting. Nothing in contlearn is global: everything a hook needs is
reachable from its ``run`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import torch

from contlearn.distributed import DistributedView

if TYPE_CHECKING:
    import pluggy
    from omegaconf import DictConfig

    from contlearn.models import ContinualModel
    from contlearn.scenarios import Experience, Stream

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key for :class:`Stash`; create one per kind of value, at module level."""

    __slots__ = ()


class Stash:
    """Values that plugins share through the run, keyed by :class:`StashKey`
    objects (as in pytest), so two plugins never clash on a string."""

    def __init__(self) -> None:
        self._values: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._values[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._values[key])

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return cast("T | None", self._values.get(key, default))

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._values[key]


class OptimizerLike(Protocol):
    """What the loop, schedules, resumes and torchrun use of an optimizer, what
    ``configure_optimizer`` returns: every ``torch.optim.Optimizer`` has it, and
    so may an object of a plugin's own (DMN's, for a model with nothing to train)."""

    param_groups: list[dict[str, Any]]

    def step(self, closure: Any = None) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(eq=False)
class Run:
    """Everything about the run in progress.

    :ivar config: the merged, validated experiment config.
    :ivar model: the model being trained.
    :ivar stream: the stream of experiences.
    :ivar device: where the model and in-memory data live.
    :ivar hook: the plugin manager's hook relay (``run.hook.loss_terms(...)``).
    :ivar plugins: active strategy plugins by name, in config order.
    :ivar optimizer: the optimizer of the current experience (a
        ``torch.optim.Optimizer``, or an object with what the loop uses of one).
    :ivar experience: the experience being trained (``None`` between experiences).
    :ivar epoch: the epoch within the experience, from 0.
    :ivar step: the training step within the experience, from 0.
    :ivar global_step: training steps since the run started.
    :ivar generator: the CPU generator that draws sample orders.
    :ivar accuracy_rows: rows of the accuracy matrix measured so far.
    :ivar batch_size: samples in the current training step's batch, extra samples
        included: under torchrun the global batch, of which this process holds
        ``dist.share(batch_size)`` (``dist.gather_rows`` gathers it back).
    """

    config: DictConfig
    model: ContinualModel
    stream: Stream
    device: torch.device
    hook: pluggy.HookRelay
    plugins: dict[str, Any]
    generator: torch.Generator
    out_dir: Path | None = None
    optimizer: OptimizerLike | None = None
    experience: Experience | None = None
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    accuracy_rows: list[list[float]] = field(default_factory=list)
    batch_size: int = 0
    stash: Stash = field(default_factory=Stash)
    dist: DistributedView = field(default_factory=DistributedView)

    @property
    def seen_classes(self) -> list[int]:
        """Classes of every experience trained so far, the current one included."""
        if self.experience is None:
            upto = len(self.accuracy_rows)
        else:
            upto = self.experience.index + 1
        return sorted({c for exp in self.stream.experiences[:upto] for c in exp.classes})
