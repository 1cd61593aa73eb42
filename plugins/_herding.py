"""iCaRL herding and a fixed-budget exemplar memory built with it.

Herding (Rebuffi et al., "iCaRL: Incremental Classifier and Representation
Learning", CVPR 2017, Algorithm 4; Welling, ICML 2009) picks, one at a time,
the sample that brings the mean of the picked samples' L2-normalised features
closest to the class mean. The order of picking is a ranking: shrinking a
class's share to ``m`` keeps its first ``m`` (iCaRL's ReduceExemplarSet).

:class:`HerdingMemory` is the memory of iCaRL, PyCIL and MEMO with a fixed
total budget: after each experience, every class seen gets ``size // classes
seen`` exemplars; old classes keep the head of their ranking, new classes are
ranked by herding on the features of the network of that moment. It stores
the samples as they are given (``x`` as the model sees it), with their labels
and task labels, and offers the ``sample(n, device)`` / ``state_dict`` of the
replay buffers (:mod:`contlearn.plugins._buffers`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from contlearn.scenarios import Batch, TensorData
from torch.nn import functional as F

from contlearn.errors import ConfigError

#: inputs -> features (the network in eval mode, without gradients)
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """The indices of ``min(m, n)`` rows of ``features`` [n, d] in herding order.

    ``features`` should be L2-normalised (as iCaRL's). Step ``k`` picks the row
    ``i`` not picked yet that minimises ``|mu - (S + f_i) / k|``, ``mu`` the mean
    of all rows and ``S`` the sum of those picked; ties go to the lowest index,
    so the order is deterministic.
    """
    n = features.shape[0]
    m = min(int(m), n)
    feats = features.double()
    mu = feats.mean(dim=0)
    running = torch.zeros_like(mu)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    order: list[torch.Tensor] = []
    for k in range(1, m + 1):
        dist = ((mu - (running + feats) / k) ** 2).sum(dim=1)
        dist = dist.masked_fill(taken, float("inf"))
        i = torch.argmin(dist)
        order.append(i)
        taken[i] = True
        running = running + feats[i]
    if not order:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    return torch.stack(order).long()


@torch.no_grad()
def normalized_features(feature_fn: FeatureFn, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """L2-normalised features of ``x``, computed ``chunk`` samples at a time."""
    return F.normalize(torch.cat([feature_fn(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)]), dim=1)


class HerdingMemory:
    """A fixed budget of ``size`` exemplars shared equally by the classes seen,
    each class's share chosen by herding (iCaRL).

    :param size: the total number of exemplars.
    :param generator: the CPU generator that draws :meth:`sample`'s samples.
    :param device: where exemplars are stored; ``None``: where they come from.
    """

    def __init__(self, size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None):
        if size < 1:
            raise ConfigError(f"an exemplar memory needs a budget of at least 1 sample, got {size}")
        self.size = int(size)
        self.generator = generator if generator is not None else torch.Generator()
        self.device = torch.device(device) if device is not None else None
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        self.rank = torch.zeros(0, dtype=torch.long)  # host: position in its class's herding order
        self.labels = torch.zeros(0, dtype=torch.long)  # host copy of y

    def __len__(self) -> int:
        return int(self.labels.numel())

    def counts(self) -> dict[int, int]:
        """Exemplars stored per class."""
        classes, counts = torch.unique(self.labels, return_counts=True)
        return {int(c): int(n) for c, n in zip(classes.tolist(), counts.tolist(), strict=True)}

    def per_class(self, n_classes: int) -> int:
        """Exemplars per class when ``n_classes`` classes share the budget."""
        m = self.size // max(n_classes, 1)
        if m < 1:
            raise ConfigError(
                f"an exemplar budget of {self.size} cannot hold one exemplar for each of {n_classes} classes; "
                f"raise the memory size (or total_memory)"
            )
        return m

    @torch.no_grad()
    def update(self, feature_fn: FeatureFn, data: TensorData, new_classes: list[int], n_seen: int) -> None:
        """Shrink every stored class to ``size // n_seen`` (keeping the head of its
        herding order), then add the herding choice of each class of
        ``new_classes`` from ``data`` (features by ``feature_fn``)."""
        m = self.per_class(n_seen)
        keep = torch.nonzero(self.rank < m).flatten()
        parts_x, parts_y, parts_t, ranks = [], [], [], [self.rank[keep]]
        if self.x is not None:
            index = keep.to(self.x.device)
            parts_x.append(self.x.index_select(0, index))
            parts_y.append(self.y.index_select(0, index))  # type: ignore[union-attr]
            parts_t.append(self.t.index_select(0, index))  # type: ignore[union-attr]
        stored = set(self.labels.tolist())
        y_host = data.y.cpu()
        for c in new_classes:
            if c in stored:
                continue
            rows = torch.nonzero(y_host == c).flatten()
            if len(rows) == 0:
                continue
            rows_dev = rows.to(data.x.device)
            order = herding(normalized_features(feature_fn, data.x.index_select(0, rows_dev)), m).cpu()
            pick = rows_dev[order.to(rows_dev.device)]
            target = self.device if self.device is not None else data.x.device
            parts_x.append(data.x.index_select(0, pick).to(target))
            parts_y.append(data.y.index_select(0, pick).to(target))
            parts_t.append(data.t.index_select(0, pick).to(target))
            ranks.append(torch.arange(len(order)))
        if not parts_x:
            return
        self.x, self.y, self.t = torch.cat(parts_x), torch.cat(parts_y), torch.cat(parts_t)
        self.rank = torch.cat(ranks)
        self.labels = self.y.cpu()

    def data(self, augment: Any = None) -> TensorData | None:
        """The exemplars as a data set, or ``None`` when empty."""
        if self.x is None or len(self) == 0:
            return None
        return TensorData(self.x, self.y, self.t, augment)  # type: ignore[arg-type]

    def joined(self, train: TensorData) -> TensorData | None:
        """``train`` with the exemplars appended (on ``train``'s device), the
        training set of iCaRL, PyCIL's ``Replay`` and MEMO (their ``appendent``);
        ``None`` when the memory is empty."""
        memory = self.data()
        if memory is None:
            return None
        return TensorData.concat([train, memory.to(train.device)])  # the exemplars augmented as train is

    def sample(self, n: int, device: torch.device | str) -> Batch | None:
        """``n`` exemplars drawn uniformly without replacement (all when fewer)."""
        if self.x is None or len(self) == 0:
            return None
        pick = torch.randperm(len(self), generator=self.generator)[: min(n, len(self))]
        index = pick.to(self.x.device)
        parts = [v.index_select(0, index).to(device) for v in (self.x, self.y, self.t)]  # type: ignore[union-attr]
        return Batch(*parts)

    @torch.no_grad()
    def class_means(self, feature_fn: FeatureFn, n_classes: int) -> torch.Tensor:
        """iCaRL's class means: per class, the mean of its exemplars' normalised
        features, normalised; rows of classes without exemplars are NaN."""
        assert self.x is not None and self.y is not None
        feats = normalized_features(feature_fn, self.x)
        means = torch.full((n_classes, feats.shape[1]), float("nan"), device=feats.device, dtype=feats.dtype)
        for c in sorted(set(self.labels.tolist())):
            rows = torch.nonzero(self.labels == c).flatten().to(feats.device)
            means[c] = F.normalize(feats.index_select(0, rows).mean(dim=0), dim=0)
        return means

    def nbytes(self, per_exemplar: int | None = None) -> int:
        """Bytes the exemplars take: ``per_exemplar`` each, or the size of the stored inputs."""
        if per_exemplar is not None:
            return int(per_exemplar) * len(self)
        return 0 if self.x is None else self.x.element_size() * self.x.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "t": self.t, "rank": self.rank.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def move(v: torch.Tensor | None) -> torch.Tensor | None:
            return v if v is None or self.device is None else v.to(self.device)

        self.x, self.y, self.t = move(state["x"]), move(state["y"]), move(state["t"])
        self.rank = state["rank"].clone().cpu()
        self.labels = self.y.cpu() if self.y is not None else torch.zeros(0, dtype=torch.long)
