"""Classifier heads: map features to class logits, and grow as classes arrive.

Every head offers ``adapt(classes, task)`` (called by the loop before each
training experience), ``out_features`` (the number of logits) and
``forward(features, task)``.

- :class:`IncrementalLinear`: one linear layer that grows (class-incremental).
- :class:`CosineLinear`: cosine similarity times a learnable scale, growing
  (cosine normalisation of UCIR, Hou et al., CVPR 2019).
- :class:`MultiHead`: one linear head per task (task-incremental); logits of
  classes outside a sample's task are masked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from contlearn.errors import ConfigError, choices

#: The logit given to classes outside a sample's task by :class:`MultiHead`:
#: large and negative, but finite, so softmax gives them ~0 and nothing
#: downstream (distillation, 0 * log p) turns into NaN. Representable in fp16.
MASKED_LOGIT = -1.0e4


def _kaiming_rows(weight: torch.Tensor, bias: torch.Tensor | None, start: int, in_features: int) -> None:
    """Initialise rows ``start:`` as ``nn.Linear`` does."""
    with torch.no_grad():
        if weight.shape[0] > start:
            nn.init.kaiming_uniform_(weight[start:], a=math.sqrt(5))
            if bias is not None:
                bound = 1 / math.sqrt(in_features)
                nn.init.uniform_(bias[start:], -bound, bound)


class IncrementalLinear(nn.Module):
    """A linear classifier whose output grows with the classes seen so far.

    Growing keeps the rows of the old classes and initialises new rows as
    ``nn.Linear`` does. The parameters are replaced on growth, so an optimizer
    must be built after it (the run loop builds one per experience).
    """

    def __init__(self, in_features: int, out_features: int = 0, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._init_rows(0)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def _init_rows(self, start: int) -> None:
        _kaiming_rows(self.weight, self.bias, start, self.in_features)

    def grow(self, out_features: int) -> bool:
        """Grow to ``out_features`` outputs; returns whether it grew."""
        old = self.out_features
        if out_features <= old:
            return False
        weight = torch.empty(out_features, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        weight[:old] = self.weight.data
        self.weight = nn.Parameter(weight)
        if self.bias is not None:
            bias = torch.empty(out_features, device=self.bias.device, dtype=self.bias.dtype)
            bias[:old] = self.bias.data
            self.bias = nn.Parameter(bias)
        self._init_rows(old)
        return True

    def adapt(self, classes: Sequence[int], task: int = 0) -> None:
        """Grow to cover ``classes`` (model-side class ids); none: no change."""
        if len(classes):
            self.grow(max(classes) + 1)

    #: forward is ``F.linear(features, self.weight, self.bias)``: per-sample Fisher
    #: information is exact for it (contlearn.kernels.empirical.is_per_sample_linear)
    per_sample_linear = True

    def forward(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CosineLinear(IncrementalLinear):
    """Cosine classifier: ``scale * <f / |f|, w_c / |w_c|>``, growing like
    :class:`IncrementalLinear`, no bias.

    UCIR (Hou et al., "Learning a Unified Classifier Incrementally via
    Rebalancing", CVPR 2019) learns the scale (their eta) starting from 1; here
    it starts from ``scale`` (default 16, ``model.cosine_scale``) so that plain
    cross-entropy trains quickly, and is learned when ``learn_scale``.
    """

    def __init__(self, in_features: int, out_features: int = 0, scale: float = 16.0, learn_scale: bool = True):
        super().__init__(in_features, out_features, bias=False)
        value = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def forward(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={float(self.scale):.3g}"


class MultiHead(nn.Module):
    """One linear head per task (task-incremental learning).

    ``adapt(classes, task)`` creates the head of a new task (or grows a known
    task's head with classes it lacks). ``forward(features, task)`` returns
    logits over all classes seen so far, with :data:`MASKED_LOGIT` outside
    each sample's task classes, so argmax and cross-entropy with global labels
    work unchanged. A batch may mix task labels; each sample keeps its own
    task's columns. In training (train mode, gradients on) only the heads of
    the tasks in the batch run, read from its task labels (one host read on an
    accelerator): a head run on a batch without its task's samples would get a
    zero gradient, which weight decay and momentum act on, moving a finished
    task's head (a head not run gets no gradient, as in Avalanche's
    ``MultiHeadClassifier``). Otherwise every head is applied, with no host
    read. A sample whose task has no head yet gets only masked logits.
    """

    _anchor: torch.Tensor

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.heads = nn.ModuleDict()
        self.task_classes: dict[int, list[int]] = {}
        self._columns: dict[int, torch.Tensor] = {}
        # follows the module through .to(), so new heads get the model's device and dtype
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    @property
    def out_features(self) -> int:
        return max((max(c) + 1 for c in self.task_classes.values() if c), default=0)

    @property
    def tasks(self) -> list[int]:
        return sorted(self.task_classes)

    def adapt(self, classes: Sequence[int], task: int = 0) -> None:
        task = int(task)
        known = self.task_classes.get(task, [])
        new = [int(c) for c in classes if int(c) not in known]
        if not new:
            return
        if task not in self.task_classes:
            self.heads[str(task)] = IncrementalLinear(self.in_features).to(self._anchor.device, self._anchor.dtype)
        self.task_classes[task] = known + new
        head = cast(IncrementalLinear, self.heads[str(task)])  # all heads are made as above
        head.grow(len(self.task_classes[task]))
        self._columns.pop(task, None)

    def keep_tasks(self, tasks: Sequence[int]) -> None:
        """Drop the heads of every task not in ``tasks`` (a copy of the model rolled
        back to fewer tasks, e.g. a distillation teacher rebuilt on resume)."""
        for task in [t for t in self.task_classes if t not in set(tasks)]:
            del self.heads[str(task)]
            del self.task_classes[task]
            self._columns.pop(task, None)

    def _cols(self, task: int, device: torch.device) -> torch.Tensor:
        cols = self._columns.get(task)
        if cols is None or cols.device != device:
            cols = torch.tensor(self.task_classes[task], dtype=torch.long, device=device)
            self._columns[task] = cols
        return cols

    def forward(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        if task is None:
            if len(self.task_classes) > 1:
                raise ConfigError("a multi-head model needs task labels; use scenario.setting=task")
            task = torch.full((features.shape[0],), next(iter(self.task_classes), 0), device=features.device)
        out = features.new_full((features.shape[0], self.out_features), MASKED_LOGIT)
        for t in self._tasks_to_run(task):
            cols = self._cols(t, features.device)
            logits = self.heads[str(t)](features)
            mine = (task == t).unsqueeze(1)
            out[:, cols] = torch.where(mine, logits, out[:, cols])
        return out

    def _tasks_to_run(self, task: torch.Tensor) -> list[int]:
        if len(self.task_classes) < 2 or not (self.training and torch.is_grad_enabled()):
            return self.tasks
        present = set(task.tolist())  # one read of the labels (torch.unique on a GPU would read twice)
        return [t for t in self.tasks if t in present]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, tasks={self.tasks}, out_features={self.out_features}"


#: Heads by ``model.head``: factory(in_features, model_cfg) -> head.
HEADS = {
    "incremental": lambda n, cfg: IncrementalLinear(n),
    "cosine": lambda n, cfg: CosineLinear(n, scale=getattr(cfg, "cosine_scale", 16.0)),
    "multi": lambda n, cfg: MultiHead(n),
}


def create_head(name: str, in_features: int, cfg=None) -> nn.Module:
    """The head ``name`` over ``in_features`` features, with no classes yet."""
    if name not in HEADS:
        raise ConfigError(f"unknown model.head '{name}'; valid heads: {choices(HEADS)}")
    return HEADS[name](in_features, cfg)
