"""Elastic Weight Consolidation: a quadratic penalty weighted by the Fisher information.

After each experience the diagonal of the empirical Fisher information ``F`` of
the model on that experience's training data is estimated
(:func:`contlearn.kernels.fisher.empirical_fisher`) and the parameters are kept
as the anchor ``theta*``. While later experiences are trained, the loss gains

    L_ewc = lam/2 * sum_i F_i (theta_i - theta*_i)^2,   dL_ewc/dtheta = lam * F * (theta - theta*)

(Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
PNAS 2017, eq. 3). ``mode: separate`` keeps one anchor and one Fisher per past
experience and sums their penalties (the paper's multi-task form); ``mode:
online`` keeps one anchor, the latest parameters, and a running Fisher
``F <- gamma * F + F_new`` (online EWC; Schwarz et al., "Progress & Compress",
ICML 2018).

The head grows with the classes: a parameter is penalised only over the part
that existed at its anchor (the rows of the classes known then); parameters
added since are free.

The penalties of separate mode are kept summed: a sum of quadratics
``sum_k F_k (theta - a_k)^2`` is the single quadratic ``S (theta - m)^2 + c``
with ``S = sum_k F_k``, ``m = sum_k F_k a_k / S`` and the constant ``c`` (the
value at the minimum), so a step costs the same after 100 experiences as after
one, and memory does not grow with the stream. Value and gradient are the sum's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from contlearn.kernels.fisher import FisherMode, fisher_sums
from contlearn.plugins._common import (
    plugin_generator,
    refuse_logits_without_gradient,
    require_trainable,
)
from torch.nn import functional as F

from contlearn.errors import ConfigError, PluginError, choices
from contlearn.hookspecs import hookimpl
from contlearn.snapshots import overlap, snapshot

if TYPE_CHECKING:
    from contlearn.distributed import DistributedView

MODES = ("separate", "online")
FISHERS = ("batch", "per_sample")


def fisher_information(
    model: torch.nn.Module, data: Any, batch_size: int, mode: str = "batch", dist: DistributedView | None = None
) -> dict[str, torch.Tensor]:
    """:func:`fisher_and_divisors`'s Fisher."""
    return fisher_and_divisors(model, data, batch_size, mode, dist)[0]


def fisher_and_divisors(
    model: torch.nn.Module, data: Any, batch_size: int, mode: str = "batch", dist: DistributedView | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Diagonal empirical Fisher of ``model``'s cross-entropy on ``data`` (a
    :class:`~contlearn.scenarios.TensorData` or ``LoaderData``), with the true
    labels, without augmentation, in eval mode (BatchNorm statistics as at test
    time, no dropout), and by parameter what it is a mean over: the number of
    samples for a parameter computed per sample, of batches otherwise (what
    weighs it when Fishers of several data sets are averaged).

    With ``dist`` of several processes, each process takes a contiguous block of
    the batches (the same batches one process would make), and the sums and
    their divisors are added over the processes: the same Fisher, computed once.

    :raises PluginError: the model has no trainable parameter to weigh.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise PluginError("the model has no trainable parameters (requires_grad=True): no Fisher information to compute")
    if len(data) == 0:  # on every process alike, before any collective
        raise PluginError("no data to compute the Fisher information on")
    was_training = model.training
    model.eval()
    try:
        plain = data.with_augment(None) if getattr(data, "augment", None) is not None else data
        if dist is not None and dist.world_size > 1:
            return _fisher_over_processes(model, plain, batch_size, mode, dist)
        sums, divisors, _ = _fisher_sums(model, plain, batch_size, mode)
        return {n: value / divisors[n] for n, value in sums.items()}, {n: float(d) for n, d in divisors.items()}
    finally:
        model.train(was_training)


def _fisher_sums(
    model: torch.nn.Module, data: Any, batch_size: int, mode: str
) -> tuple[dict[str, torch.Tensor], dict[str, int], frozenset[str]]:
    batches = (((b.x, b.t), b.y) for b in data.batches(batch_size))

    def loss(m: torch.nn.Module, xt: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(xt[0], xt[1]).logits, y)

    return fisher_sums(model, batches, loss, mode=cast(FisherMode, mode))  # a config's value, checked there


def _fisher_over_processes(
    model: torch.nn.Module, data: Any, batch_size: int, mode: str, dist: DistributedView
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The Fisher with the batches shared out in contiguous blocks (``dist.part``;
    the last, partial batch ends the last block): each process's sums of squared
    gradients and their divisors (samples or batches, by parameter) are added in
    one all-reduce, then divided."""
    n_batches = math.ceil(len(data) / batch_size)
    mine = dist.part(n_batches)
    rows = range(mine.start * batch_size, min(mine.stop * batch_size, len(data))) if len(mine) else range(0)
    if len(mine):
        sums, _, per_sample = _fisher_sums(model, data.subset(rows), batch_size, mode)
    else:  # fewer batches than processes: nothing here, but the all-reduce all the same
        device = next(p for p in model.parameters() if p.requires_grad).device
        sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=device)
                for n, p in model.named_parameters() if p.requires_grad}
        per_sample = frozenset()
    device = next(iter(sums.values())).device
    # Per parameter, how this process computed it: per sample, from batch gradients, or either (no gradient
    # here at all: a linear layer its batches never called, which adds 0 per sample as well as per batch),
    # and what it adds to each divisor, its samples and its batches. All processes that computed a parameter
    # must agree, as one process's batches must (empirical_fisher). One host read: whether sums are 0.
    used = torch.stack([value.ne(0).any() for value in sums.values()]).tolist()
    kind = [(n in per_sample, n not in per_sample and nonzero) for n, nonzero in zip(sums, used, strict=True)]
    kinds = torch.tensor([[float(a), float(b)] for a, b in kind], device=device)
    counts = torch.tensor([[0.0 if on_batches else float(len(rows)), 0.0 if on_samples else float(len(mine))]
                           for on_samples, on_batches in kind], device=device)
    *totals, total_counts, total_kinds = dist.summed([*sums.values(), counts, kinds])
    mixed = [n for n, (on_samples, on_batches) in zip(sums, total_kinds.tolist(), strict=True) if on_samples and on_batches]
    if mixed:
        raise PluginError(
            f"the Fisher pass shared out between processes computed {mixed[0]} per sample on some and from batch "
            "gradients on others: the model called different linear layers in different batches"
        )
    by_samples = (total_kinds[:, 0] > 0).tolist()
    total_counts = torch.stack([c[0] if s else c[1] for c, s in zip(total_counts, by_samples, strict=True)])
    divisors = dict(zip(sums, total_counts.tolist(), strict=True))
    return {n: value / divisors[n] for n, value in zip(sums, totals, strict=True)}, divisors


def quadratic_penalty(
    params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], weight: dict[str, torch.Tensor] | None
) -> torch.Tensor | None:
    """``sum_i w_i (theta_i - anchor_i)^2`` over the anchored parameters (``w = 1``
    without ``weight``), each cut to its anchor's shape; ``None`` if none is present."""
    total = None
    for name, a in anchor.items():
        p = params.get(name)
        if p is None:
            continue
        current = overlap(p, a)
        if current is None:
            continue
        sq = (current - a).square()
        term = (sq * weight[name]).sum() if weight is not None else sq.sum()
        total = term if total is None else total + term
    return total


def _grow_to(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``value`` zero-padded to ``shape`` (a Fisher of a head that has grown since)."""
    if value.shape == shape:
        return value
    out = value.new_zeros(shape)
    out[tuple(slice(0, s) for s in value.shape)] = value
    return out


def merge_quadratic(
    importance: torch.Tensor | None,
    center: torch.Tensor | None,
    fisher: torch.Tensor,
    anchor: torch.Tensor,
    decay: float | None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fold a new penalty ``F (theta - a)^2`` into ``S (theta - m)^2``.

    ``decay=None`` (separate): the sum of both quadratics, returned as
    ``(S + F, (S m + F a) / (S + F), c)`` with ``c`` the constant the sum gains
    (its value at the new centre). ``decay=gamma`` (online): ``(gamma S + F, a, 0)``.
    The old terms are zero-padded to the new shape when the parameter has grown.
    """
    if importance is None or center is None or overlap(fisher, importance) is None:
        return fisher, anchor, 0.0
    old_s, old_m = _grow_to(importance, fisher.shape), _grow_to(center, fisher.shape)
    if decay is not None:
        return old_s * decay + fisher, anchor, 0.0
    total = old_s + fisher
    weighted = old_s * old_m + fisher * anchor
    new_m = torch.where(total > 0, weighted / total.clamp_min(torch.finfo(total.dtype).tiny), anchor)
    # constant: S m^2 + F a^2 - (S + F) m'^2, in float64 (a difference of near-equal sums)
    d = torch.float64
    c = (old_s.to(d) * old_m.to(d) ** 2 + fisher.to(d) * anchor.to(d) ** 2 - total.to(d) * new_m.to(d) ** 2).sum()
    return total, new_m, max(float(c), 0.0)


class EWC:
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), separate or online."""

    @dataclass
    class Config:
        lam: float = 30.0  # penalty weight: L = lam/2 * sum F (theta - theta*)^2 (chosen on validation data, docs/results.md)
        mode: str = "separate"  # separate (one penalty per past experience) | online
        gamma: float = 1.0  # online mode: decay of the running Fisher
        fisher: str = "batch"  # batch (squared batch gradients) | per_sample (exact for Linear layers)
        fisher_batch_size: Optional[int] = None  # None: train.batch_size
        fisher_samples: Optional[int] = None  # a random subset of the experience; None: all of it

        def __post_init__(self) -> None:
            if self.mode not in MODES:
                raise ConfigError(f"plugins.ewc.mode must be one of {choices(MODES)}, got {self.mode!r}")
            if self.fisher not in FISHERS:
                raise ConfigError(f"plugins.ewc.fisher must be one of {choices(FISHERS)}, got {self.fisher!r}")
            if not 0 <= self.lam < math.inf:
                raise ConfigError(f"plugins.ewc.lam must be a non-negative finite number, got {self.lam}")
            if not 0 <= self.gamma <= 1:
                raise ConfigError(f"plugins.ewc.gamma must be in [0, 1], got {self.gamma}")
            for key in ("fisher_batch_size", "fisher_samples"):
                value = getattr(self, key)
                if value is not None and value < 1:
                    raise ConfigError(f"plugins.ewc.{key} must be at least 1, got {value}")

    def __init__(self, config: EWC.Config):
        self.config = config
        #: the penalty S (theta - m)^2 + offset, by parameter name
        self.importance: dict[str, torch.Tensor] = {}
        self.center: dict[str, torch.Tensor] = {}
        self.offset = 0.0
        self.generator = torch.Generator()
        self._seeded = False

    @hookimpl
    def setup(self, run: Any) -> None:
        require_trainable(run, "ewc", "weighs the model's trainable parameters by their Fisher information")
        refuse_logits_without_gradient(run, "ewc", "weighs parameters by the Fisher information of the model's logits")
        if not self._seeded:
            self.generator.manual_seed(plugin_generator(run.config.seed, "ewc"))
            self._seeded = True
        # after a resume, the tensors move to the run's device
        self.importance = {n: t.to(run.device) for n, t in self.importance.items()}
        self.center = {n: t.to(run.device) for n, t in self.center.items()}

    @hookimpl
    def after_experience(self, run: Any, exp: Any) -> None:
        cfg = self.config
        data = exp.train
        if cfg.fisher_samples is not None and cfg.fisher_samples < len(data):
            pick = torch.randperm(len(data), generator=self.generator)[: cfg.fisher_samples]
            data = data.subset(pick)
        batch_size = cfg.fisher_batch_size or run.config.train.batch_size
        fisher = fisher_information(run.model, data, batch_size, cfg.fisher, run.dist)
        anchor = snapshot(run.model)
        decay = cfg.gamma if cfg.mode == "online" else None
        offset = 0.0
        for name, a in anchor.items():
            if name not in fisher:
                continue
            s, m, c = merge_quadratic(self.importance.get(name), self.center.get(name), fisher[name], a, decay)
            self.importance[name], self.center[name] = s, m
            offset += c
        self.offset = offset if decay is not None else self.offset + offset

    @hookimpl
    def loss_terms(self, run: Any) -> dict[str, torch.Tensor] | None:
        if not self.importance:
            return None
        # looked up at every step, not cached: a module may be replaced inside an experience (Avalanche's
        # IncrementalClassifier grows at a periodic evaluation), and a cache would penalise the old one
        total = quadratic_penalty(dict(run.model.named_parameters()), self.center, self.importance)
        if total is None:
            return None
        return {"ewc": 0.5 * self.config.lam * (total + self.offset)}

    def state_dict(self) -> dict[str, Any]:
        """The summed penalty (importance and centre by parameter name, one offset) and the generator's state."""
        return {
            "importance": dict(self.importance),
            "center": dict(self.center),
            "offset": self.offset,
            "generator": self.generator.get_state(),
            "seeded": self._seeded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = dict(state["importance"])
        self.center = dict(state["center"])
        self.offset = float(state["offset"])
        self.generator.set_state(state["generator"])
        self._seeded = bool(state["seeded"])
