"""Power-law rehearsal: mix samples of past tasks into each experience, on a power-law schedule.

Gandhi, Shah, Marupudi and Varma, "Catastrophic Interference is Mitigated in
Naturalistic Power-Law Learning Environments" (arXiv:2401.10393, 2024): in
natural environments the probability of meeting a task again falls as a power
law of the time since it was last met, and training in such an environment,
each phase rehearsing past tasks on that schedule, mitigates catastrophic
interference about as well as regularisers such as EWC, with no extra
machinery. Their permuted-MNIST environments are a phase-by-task matrix of
sample counts, every phase holding the new task's data and a schedule's share
of each earlier task.

Every experience is a phase and every earlier experience a task. After a task
is trained, a pool of its training samples is kept (``pool_size``; by default
all of them, the paper's setting; the pool holds indices into the stream's
data, which stays in memory anyway). At the start of each later experience,
:class:`~contlearn.plugins._schedules.Schedule` says how many samples of each
past task to rehearse (``power_law``, ``power_law_index``, ``uniform``,
``exponential``, ``none``, ``all``; at a matched total per phase), and that many are drawn from each pool
without replacement, deterministically per seed. They reach training as a
mixture dataset (``via: mixture``, the paper's phases: ``train_data`` returns
the experience's data and the rehearsal samples, shuffled together each epoch)
or spread over the steps of each epoch (``via: extra_samples``: every step adds
its slice of the rehearsal set to the batch; each epoch uses every drawn sample
once). Works for domain-incremental (permuted inputs) and class-incremental
streams: a task is an experience, labels are the stream's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from contlearn.plugins._common import plugin_generator
from contlearn.plugins._schedules import Schedule
from contlearn.scenarios import Batch, TensorData
from contlearn.scenarios.stream import host_to_device

from contlearn.errors import ConfigError, choices
from contlearn.hookspecs import hookimpl

VIA = ("mixture", "extra_samples")


class PowerLaw:
    """Power-law rehearsal of past tasks (Gandhi, Shah, Marupudi and Varma, 2024)."""

    keeps_rehearsal_memory = True  # rehearses samples it keeps (two such plugins: two memories)

    @dataclass
    class Config:
        schedule: str = "power_law"  # power_law | power_law_index | uniform | exponential | none | all
        # first: age = phases since introduced | last: since last met (tasks recur at random)
        since: str = "first"
        exponent: float = 5.6  # power law: n = C * (age + offset) ** -exponent
        offset: float = 10.0
        tau: float = 1.0  # exponential: n = C * exp(-age / tau)
        alpha: float = 5.0  # power_law_index: n = C * (offset + task index) ** (alpha - 1)
        scale: Optional[float] = None  # C; None: derived from the budget
        budget: Optional[int] = None  # rehearsal samples per phase; None: budget_fraction
        budget_fraction: Optional[float] = 0.5  # budget / the current experience's size
        hazard: float = 0.5  # since: last: chance that a task met last phase is met again
        pool_size: Optional[int] = None  # samples kept per task; None: the whole experience
        via: str = "mixture"  # mixture (train_data) | extra_samples (spread over the steps)

    def __init__(self, config: PowerLaw.Config):
        if config.via not in VIA:
            raise ConfigError(
                f"plugins.powerlaw.via must be one of {choices(VIA)}, got {config.via!r}"
            )
        if config.pool_size is not None and config.pool_size < 1:
            raise ConfigError(
                f"plugins.powerlaw.pool_size must be at least 1, got {config.pool_size}"
            )
        self.config = config
        self.schedule = Schedule(
            kind=config.schedule,
            since=config.since,
            exponent=config.exponent,
            offset=config.offset,
            tau=config.tau,
            alpha=config.alpha,
            scale=config.scale,
            budget=config.budget,
            budget_fraction=config.budget_fraction,
            hazard=config.hazard,
            where="plugins.powerlaw.",
        )
        self.generator = torch.Generator()
        self._seeded = False
        #: only the mixture replaces an experience's data; with extra_samples,
        #: train_data draws the phase's rehearsal and returns nothing (an
        #: Avalanche strategy, which builds its data itself, can run it then)
        self.produces_train_data = config.via == "mixture"
        #: task -> indices into its experience's training data
        self.pools: dict[int, torch.Tensor] = {}
        self.introduced: dict[int, int] = {}  # task -> phase that trained it
        self.last: dict[int, int] = {}  # task -> last phase that introduced or rehearsed it
        self.phase = -1  # the phase whose draw is held
        self.draw: dict[int, torch.Tensor] = {}  # task -> indices drawn for the phase
        self.history: list[dict[str, Any]] = []  # per phase: past tasks, their ages and counts
        self._seed = 0
        # not state, rebuilt on demand: the drawn samples as one data set, the
        # steps per epoch of the current experience, (epoch, order of the draw)
        self._rehearsal: TensorData | None = None
        self._steps = 1
        self._order: tuple[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def setup(self, run: Any) -> None:
        self.schedule.check_phases(len(run.stream))  # an overflow found before training, not after experience 0
        self._seed = int(run.config.seed)
        if not self._seeded:
            self.generator.manual_seed(plugin_generator(run.config.seed, "powerlaw"))
            self._seeded = True

    @hookimpl
    def train_data(self, run: Any, exp: Any) -> Any:
        self._prepare(run, exp)
        if self.config.via != "mixture" or not self.draw:
            return None
        parts = [
            exp.train,
            *(
                run.stream[k].train.subset(idx.to(run.stream[k].train.device))
                for k, idx in sorted(self.draw.items())
            ),
        ]
        return TensorData.concat(parts)

    @hookimpl
    def extra_samples(self, run: Any, batch: Batch) -> Batch | None:
        if self.config.via != "extra_samples" or not self.draw:
            return None
        data = self._rehearsal_data(run)
        n = len(data)
        per_step = math.ceil(n / self._steps)
        j = run.step - run.epoch * self._steps
        if j * per_step >= n:
            return None
        if self._order is None or self._order[0] != run.epoch:
            g = torch.Generator().manual_seed(self._epoch_seed(run.epoch))
            self._order = (run.epoch, host_to_device(torch.randperm(n, generator=g), data.device))
        return data.batch(self._order[1][j * per_step : (j + 1) * per_step])

    @hookimpl
    def after_experience(self, run: Any, exp: Any) -> None:
        k = exp.index
        if k in self.pools:
            return
        n = len(exp.train)
        size = self.config.pool_size
        if size is None or size >= n:
            pool = torch.arange(n)
        else:
            pool = torch.randperm(n, generator=self.generator)[:size].sort().values
        self.pools[k] = pool
        self.introduced[k] = k
        self.last[k] = k

    # --------------------------------------------------------------- schedule

    def _prepare(self, run: Any, exp: Any) -> None:
        """Plan and draw the rehearsal of phase ``exp.index`` once (again after
        a resume inside the experience, the held draw is reused)."""
        t = exp.index
        self._steps = max(1, math.ceil(len(exp.train) / run.config.train.batch_size))
        if self.phase == t:
            return
        past = sorted(k for k in self.pools if k < t)
        since = self.introduced if self.config.since == "first" else self.last
        ages = [t - since[k] for k in past]
        capacity = [len(self.pools[k]) for k in past]
        counts = self.schedule.plan(ages, capacity, len(exp.train), self.generator, tasks=past)
        draw: dict[int, torch.Tensor] = {}
        for k, c in zip(past, counts, strict=True):
            if c > 0:
                pool = self.pools[k]
                draw[k] = pool[torch.randperm(len(pool), generator=self.generator)[:c]]
                self.last[k] = t
        self.phase, self.draw = t, draw
        self._rehearsal, self._order = None, None
        self.history.append({"phase": t, "tasks": past, "ages": ages, "counts": counts})

    def _rehearsal_data(self, run: Any) -> TensorData:
        if self._rehearsal is None:
            parts = [
                run.stream[k].train.subset(idx.to(run.stream[k].train.device))
                for k, idx in sorted(self.draw.items())
            ]
            self._rehearsal = TensorData.concat(parts) if len(parts) > 1 else parts[0]
        return self._rehearsal

    def _epoch_seed(self, epoch: int) -> int:
        return plugin_generator(self._seed, f"powerlaw/order/{self.phase}/{epoch}")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Pools, clocks, the held draw, the history and the generator's state."""
        return {
            "generator": self.generator.get_state(),
            "seeded": self._seeded,
            "pools": {k: v.clone() for k, v in self.pools.items()},
            "introduced": dict(self.introduced),
            "last": dict(self.last),
            "phase": self.phase,
            "draw": {k: v.clone() for k, v in self.draw.items()},
            "history": [
                {
                    "phase": h["phase"],
                    "tasks": list(h["tasks"]),
                    "ages": list(h["ages"]),
                    "counts": list(h["counts"]),
                }
                for h in self.history
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self._seeded = bool(state["seeded"])
        self.pools = {int(k): v.cpu().long() for k, v in state["pools"].items()}
        self.introduced = {int(k): int(v) for k, v in state["introduced"].items()}
        self.last = {int(k): int(v) for k, v in state["last"].items()}
        self.phase = int(state["phase"])
        self.draw = {int(k): v.cpu().long() for k, v in state["draw"].items()}
        self.history = [dict(h) for h in state["history"]]
        self._rehearsal, self._order = None, None
