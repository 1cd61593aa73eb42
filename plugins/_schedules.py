"""Rehearsal schedules: how many samples of each past task a phase mixes in.

A *phase* is one training experience, numbered by its index ``t``; a *task* is
an earlier experience ``i``. Its *age* at phase ``t`` is ``t - s_i`` (at least
1), where ``s_i`` is the phase that introduced it (``since: first``) or the
last phase that rehearsed it (``since: last``). A schedule turns the ages of the
past tasks into counts:

* ``power_law``: ``n_i(t) = C * (t - s_i + offset) ** -exponent``. In natural
  environments the probability of meeting a task again falls as a power law of
  the time since it was last met (Anderson and Schooler, "Reflections of the
  environment in memory", Psychological Science 1991); Gandhi, Shah, Marupudi
  and Varma ("Catastrophic Interference is Mitigated in Naturalistic Power-Law
  Learning Environments", arXiv:2401.10393, 2024) rehearse on such a schedule.
* ``power_law_index``: ``n_i(t) = C * (offset + i) ** (alpha - 1)``, ``i`` the
  task's index (the phase that introduced it, from 0): the budgeted
  ``powerlaw`` environment of the study's earlier code (``environments.py``,
  ``alpha`` 5, positions ``0.01 * (10 + i)``), which that code compares with
  ``uniform`` and ``exponential`` at equal replay budgets. Newer tasks get
  more, as with ``power_law``, but the share is much flatter: at phase 9,
  ``(18 / 10) ** 4 = 10.5`` times as much for the newest task as for the
  oldest, against ``(19 / 11) ** 5.6 = 21`` for ``power_law``. ``since: first``
  only.
* ``exponential``: ``n_i(t) = C * exp(-(t - s_i) / tau)`` (the paper's
  exponential environment).
* ``uniform``: the same count for every past task.
* ``none``: nothing (sequential fine-tuning).
* ``all``: every stored sample of every past task (the upper bound; no budget).

``C`` is given (``scale``), or derived from a total number of rehearsal samples
per phase (``budget``, or ``budget_fraction`` of the current experience's size),
so that ``power_law``, ``exponential`` and ``uniform`` rehearse exactly the same
number of samples per phase and differ only in how they share it:
:func:`apportion` splits the total in proportion to the weights, caps each
task at its pool, gives what a capped task cannot take to the others, and
rounds by largest remainder, so the counts sum to the total exactly.

``since: first`` is the form of the earlier public code for this study
(github.com/archana53/power-law-for-CI, ``environments.py``): each task's
count is a fixed function of the phases ``k`` since it was introduced, there
``57927 * (10 / (k + 10)) ** 5.6`` to within one sample (the defaults). With
``since: last`` (the paper's description: time since the task was *last met*),
tasks recur at random: a past task is met in a phase with probability
``hazard * f(age) / f(1)``, ``f`` the schedule's decay, and a met task's clock is
reset. Read deterministically, "time since last rehearsed" would reset every
rehearsed task to age 1 at every phase and collapse into ``uniform``; as a
recurrence probability it is Anderson and Schooler's need odds. Met tasks
share the phase's total equally (with ``scale``: ``scale`` samples each); at
least one past task is met in every phase (the one most likely to be).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from contlearn.errors import ConfigError, choices

KINDS = ("power_law", "power_law_index", "uniform", "exponential", "none", "all")
SINCE = ("first", "last")
DECAYING = ("power_law", "power_law_index", "uniform", "exponential")


@dataclass
class Schedule:
    """The parameters of a rehearsal schedule (see the module docstring).

    ``where`` prefixes the field names in error messages (``plugins.powerlaw.``).
    """

    kind: str = "power_law"
    since: str = "first"
    exponent: float = 5.6
    offset: float = 10.0
    tau: float = 1.0
    alpha: float = 5.0
    scale: Optional[float] = None
    budget: Optional[int] = None
    budget_fraction: Optional[float] = 0.5
    hazard: float = 0.5
    where: str = ""

    def __post_init__(self) -> None:
        w = self.where
        if self.kind not in KINDS:
            raise ConfigError(f"{w}schedule must be one of {choices(KINDS)}, got {self.kind!r}")
        if self.since not in SINCE:
            raise ConfigError(f"{w}since must be one of {choices(SINCE)}, got {self.since!r}")
        if self.exponent < 0:
            raise ConfigError(f"{w}exponent must be non-negative, got {self.exponent}")
        if self.offset <= -1:
            raise ConfigError(
                f"{w}offset must be greater than -1 (ages start at 1), got {self.offset}"
            )
        if self.tau <= 0:
            raise ConfigError(f"{w}tau must be positive, got {self.tau}")
        if self.alpha < 1:
            raise ConfigError(f"{w}alpha must be at least 1 (1: uniform), got {self.alpha}")
        if self.kind == "power_law_index" and self.offset <= 0:
            raise ConfigError(
                f"{w}offset must be positive for schedule 'power_law_index' (task indices start at 0, "
                f"and task 0's weight is offset ** (alpha - 1)), got {self.offset}"
            )
        if self.kind == "power_law_index" and self.since != "first":
            raise ConfigError(
                f"{w}schedule 'power_law_index' weights a task by its index, not by its age: "
                f"it needs since: first, got since: {self.since}"
            )
        if not 0 < self.hazard <= 1:
            raise ConfigError(f"{w}hazard must be in (0, 1], got {self.hazard}")
        if self.scale is not None and self.scale < 0:
            raise ConfigError(f"{w}scale must be non-negative, got {self.scale}")
        if self.budget is not None and self.budget < 0:
            raise ConfigError(f"{w}budget must be non-negative, got {self.budget}")
        if self.budget_fraction is not None and self.budget_fraction < 0:
            raise ConfigError(
                f"{w}budget_fraction must be non-negative, got {self.budget_fraction}"
            )
        if self.scale is not None and self.budget is not None:
            raise ConfigError(
                f"{w}scale (C) and budget both set; give one (C is derived from the budget)"
            )
        if (
            self.kind in DECAYING
            and self.scale is None
            and self.budget is None
            and self.budget_fraction is None
        ):
            raise ConfigError(f"{w}schedule {self.kind!r} needs scale, budget or budget_fraction")

    # ------------------------------------------------------------------ decay

    def decay(self, age: float) -> float:
        """``f(age)``: the schedule's weight of a task ``age`` phases old (not
        for ``power_law_index``, whose weights follow the task's index); 0 where
        it is too small for a float. :raises ConfigError: where it is too large."""
        log_weight = self.log_decay(age)  # checks the age and the kind
        try:
            if self.kind == "power_law":
                return float((age + self.offset) ** -self.exponent)
            return math.exp(log_weight)
        except OverflowError:
            raise _overflow(log_weight, self.where) from None

    def log_decay(self, age: float) -> float:
        """``log f(age)``, which stays in range where ``f`` under- or overflows."""
        if age < 1:
            raise ValueError(f"a past task's age is at least 1, got {age}")
        if self.kind == "power_law_index":
            raise ValueError("power_law_index weights tasks by index, not age: Schedule.plan takes their indices")
        if self.kind == "power_law":
            return -self.exponent * math.log(age + self.offset)
        if self.kind == "exponential":
            return -age / self.tau
        return 0.0

    def total(self, current_size: int) -> int | None:
        """Rehearsal samples per phase (``None`` with an explicit ``scale``)."""
        if self.scale is not None:
            return None
        if self.budget is not None:
            return int(self.budget)
        assert self.budget_fraction is not None
        return int(math.floor(self.budget_fraction * current_size + 0.5))

    def recurrence(self, ages: Sequence[int]) -> list[float]:
        """``since: last``: the probability that each past task is met this phase."""
        try:
            first = self.decay(1)
        except ConfigError:
            first = math.inf
        if 0 < first < math.inf:
            return [self.hazard * self.decay(a) / first for a in ages]
        return [self.hazard * math.exp(self.log_decay(a) - self.log_decay(1)) for a in ages]

    # ------------------------------------------------------------------- plan

    def plan(
        self,
        ages: Sequence[int],
        capacity: Sequence[int],
        current_size: int,
        generator: torch.Generator | None = None,
        tasks: Sequence[int] | None = None,
    ) -> list[int]:
        """The number of samples of each past task to rehearse this phase.

        :param ages: phases since each past task was introduced (``since:
            first``) or last rehearsed (``since: last``), each at least 1.
        :param tasks: each past task's index (the phase that introduced it),
            for ``power_law_index``; ``None``: the tasks are ``0 .. n - 1``.
        :param capacity: samples stored for each past task; no count exceeds it.
        :param current_size: training samples of the current experience (for
            ``budget_fraction``).
        :param generator: draws which tasks recur (``since: last`` only).
        """
        n = len(ages)
        if len(capacity) != n:
            raise ValueError(f"{n} ages but {len(capacity)} capacities")
        if tasks is not None and len(tasks) != n:
            raise ValueError(f"{n} ages but {len(tasks)} task indices")
        if n == 0 or self.kind == "none":
            return [0] * n
        if self.kind == "all":
            return [int(c) for c in capacity]
        if self.since == "last" and self.kind in DECAYING:
            weights = [1.0 if met else 0.0 for met in self.meet(ages, generator)]
        else:
            weights = self._weights(ages, range(n) if tasks is None else tasks)
        total = self.total(current_size)
        if total is None:
            assert self.scale is not None
            if self.since == "last":
                return [
                    min(int(c), int(math.floor(self.scale + 0.5))) if w else 0
                    for w, c in zip(weights, capacity, strict=True)
                ]
            return [
                int(math.floor(min(self.scale * w, int(c)) + 0.5))
                for w, c in zip(weights, capacity, strict=True)
            ]
        return apportion(total, weights, capacity)

    def check_phases(self, n_phases: int) -> None:
        """:raises ConfigError: where a stream of ``n_phases`` phases would meet a
        weight too large for a float (with a set ``scale``), before any training.
        The last phase holds every past task at every age and index, so it meets
        the largest weight if any phase does."""
        if self.scale is None or n_phases < 2 or self.since == "last" or self.kind not in DECAYING:
            return
        past = range(n_phases - 1)
        self._weights([n_phases - 1 - i for i in past], past)

    def _weights(self, ages: Sequence[int], tasks: Sequence[int]) -> list[float]:
        """Each past task's weight: ``f(age)``, or ``(offset + index) ** (alpha - 1)``
        for ``power_law_index``. Where these leave a float's range (all of them
        0, or one too large) and a budget is shared, their ratios to the largest,
        computed in logs (the budget then goes to the heaviest tasks); with a
        scale, zeros stand and an overflow is a ConfigError."""
        try:
            if self.kind == "power_law_index":
                weights = [float((self.offset + i) ** (self.alpha - 1)) for i in tasks]
            else:
                weights = [self.decay(a) for a in ages]
            if self.scale is not None or max(weights) > 0:
                return weights
            overflow = False
        except (OverflowError, ConfigError):
            overflow = True
        if self.kind == "power_law_index":
            logs = [(self.alpha - 1) * math.log(self.offset + i) for i in tasks]
        else:
            logs = [self.log_decay(a) for a in ages]
        if overflow and self.scale is not None:
            raise _overflow(max(logs), self.where)
        top = max(logs)
        return [math.exp(v - top) for v in logs]

    def meet(self, ages: Sequence[int], generator: torch.Generator | None) -> list[bool]:
        """``since: last``: which past tasks recur this phase (at least one)."""
        if generator is None:
            raise ValueError("since: last draws which tasks recur; pass a generator")
        p = torch.tensor(self.recurrence(ages), dtype=torch.float64)
        met = (torch.rand(len(ages), generator=generator, dtype=torch.float64) < p).tolist()
        if not any(met):
            # the most likely task; among equals the most recent (the last listed)
            best = max(range(len(ages)), key=lambda i: (p[i].item(), i))
            met[best] = True
        return met


def _overflow(log_weight: float, where: str) -> ConfigError:
    """``where`` is the prefix of the schedule's field names (``plugins.powerlaw.``)."""
    return ConfigError(
        f"{where}schedule: its weights overflow (a weight of e^{log_weight:.4g}) with {where}scale set: lower "
        f"the exponent or alpha, or give a budget instead of the scale"
    )


def apportion(total: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Split ``total`` samples in proportion to ``weights``, at most ``capacity[i]`` each.

    A task whose share exceeds its capacity gets its capacity and the rest is
    shared among the others (water filling); the real shares are rounded down
    and the samples left go one each to the largest fractional parts (ties: the
    larger weight, then the later task). The counts sum to ``total``, or to all
    that tasks of positive weight can hold when that is less.
    """
    n = len(weights)
    counts = [0] * n
    open_ = [i for i in range(n) if weights[i] > 0 and capacity[i] > 0]
    remaining = min(int(total), sum(int(capacity[i]) for i in open_))
    if remaining <= 0:
        return counts
    while True:
        mass = sum(weights[i] for i in open_)
        share = {i: remaining * weights[i] / mass for i in open_}
        full = [i for i in open_ if share[i] >= capacity[i]]
        if not full:
            break
        for i in full:
            counts[i] = int(capacity[i])
            remaining -= counts[i]
        open_ = [i for i in open_ if i not in full]
        if not open_ or remaining == 0:
            return counts
    floors = {i: int(math.floor(share[i])) for i in open_}
    for i in open_:
        counts[i] = floors[i]
    left = remaining - sum(floors.values())
    order = sorted(open_, key=lambda i: (share[i] - floors[i], weights[i], i), reverse=True)
    for i in order[:left]:
        counts[i] += 1
    return counts
