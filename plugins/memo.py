"""MEMO: a memory-efficient expandable model for class-incremental learning.

Zhou, Wang, Ye, Ma, Pu and Zhan, "A Model or 603 Exemplars: Towards
Memory-Efficient Class-Incremental Learning", ICLR 2023 (reference code
wangkiw/ICLR23-MEMO, the same logic as PyCIL's ``models/memo.py``).

- Model surgery (``setup``): the model becomes a :class:`MemoNet`, the
  backbone split into shared *generalized* blocks and a *specialized* block
  (:func:`~contlearn.plugins._memo_net.split_backbone`).
- Each later experience (``before_experience``) appends a specialized block
  initialised as a copy of the newest one, freezes the older ones (eval mode,
  batch-norm statistics included), widens the classifier to the concatenated
  features (old rows copied) and makes an auxiliary head with |new classes| + 1
  outputs on the newest block (new class k -> its rank + 1, old classes -> 0).
- Loss: the cross-entropy of the classifier (the default) plus
  ``alpha_aux`` x the auxiliary cross-entropy (``loss_terms``, name ``aux``),
  from the second experience on (as the reference's ``_update_representation``).
- Training data (``train_data``): the experience's data and the exemplars.
- After an experience: weight aligning of the new classes' rows, then the
  exemplar memory (iCaRL herding on the whole network's normalised features,
  ``memory_size // classes seen`` per class), then the exemplar class means.
- Prediction by the classifier or by nearest mean of exemplars (both measured).
- Memory accounting: parameters at 4 bytes against exemplars at their byte size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from contlearn.plugins._common import plugin_generator
from contlearn.plugins._herding import HerdingMemory
from contlearn.plugins._memo_net import (
    ExpandableBackbone,
    MemoNet,
    count_parameters,
    split_backbone,
)
from contlearn.scenarios import TensorData
from torch.nn import functional as F

from contlearn.errors import ConfigError, TrainingError, choices
from contlearn.hookspecs import hookimpl
from contlearn.models import CosineLinear, IncrementalLinear

PREDICTIONS = ("classifier", "nme")
BYTES_PER_PARAMETER = 4


class MEMO:
    """MEMO: expandable specialized blocks over shared generalized blocks, with herding exemplars (Zhou et al., ICLR 2023)."""

    keeps_rehearsal_memory = True  # rehearses samples it keeps (two such plugins: two memories)

    #: setup replaces the run's model by MEMO's network (a plugin that adapts the
    #: run's model in place, reglora, refuses to run beside it)
    builds_model = True

    smoke_overrides = ["plugins.memo.memory_size=40"]

    @dataclass
    class Config:
        memory_size: int = 200  # total exemplars (fixed budget), shared by the classes seen
        total_memory: Optional[int] = None  # bytes of model + exemplars; sets memory_size when given
        exemplar_bytes: Optional[int] = None  # bytes per exemplar; None: the stored input's size
        alpha_aux: float = 1.0  # weight of the auxiliary loss
        train_base: bool = True  # False: freeze the generalized blocks after the first experience
        weight_align: bool = True  # rescale the new classes' classifier rows after each experience
        specialized_width: Optional[int] = None  # mlp/cnn: width of the specialized block; None: the backbone's
        predict: str = "classifier"  # classifier | nme (nearest mean of exemplars)

        def __post_init__(self) -> None:
            if self.predict not in PREDICTIONS:
                raise ConfigError(f"plugins.memo.predict must be one of {choices(PREDICTIONS)}, got {self.predict!r}")
            if self.memory_size < 1:
                raise ConfigError(f"plugins.memo.memory_size must be at least 1, got {self.memory_size}")
            if self.total_memory is not None and self.total_memory < 1:
                raise ConfigError(f"plugins.memo.total_memory must be a positive number of bytes, got {self.total_memory}")
            if self.exemplar_bytes is not None and self.exemplar_bytes < 1:
                raise ConfigError(f"plugins.memo.exemplar_bytes must be at least 1, got {self.exemplar_bytes}")
            if self.specialized_width is not None and self.specialized_width < 1:
                raise ConfigError(f"plugins.memo.specialized_width must be at least 1, got {self.specialized_width}")
            if self.alpha_aux < 0:
                raise ConfigError(f"plugins.memo.alpha_aux must be >= 0, got {self.alpha_aux}")

    def __init__(self, config: MEMO.Config | None = None):
        self.config = config if config is not None else self.Config()
        # nme predicts with the class means after_experience computes (see CLR)
        self.predicts_from_after_experience = self.config.predict == "nme"
        self.generator = torch.Generator()
        self.memory: HerdingMemory | None = None
        self.model: MemoNet | None = None  # the run's model, once rebuilt
        self.budget = self.config.memory_size
        self.seen: list[int] = []  # classes of the experiences finished or started
        self.old: list[int] = []  # classes known before the current experience
        self.new: list[int] = []  # classes the current experience adds
        self.class_means: torch.Tensor | None = None
        self.accuracy: dict[str, list[list[float]]] = {"classifier": [], "nme": []}
        self.memory_rows: list[dict[str, int | float]] = []
        self.align_factors: list[float] = []  # weight aligning's factor, per experience it ran after
        self._pending: dict[str, Any] | None = None
        self._aux_map: torch.Tensor | None = None
        self._hits: dict[str, torch.Tensor] = {}
        self._predicted: tuple[Any, dict[str, torch.Tensor]] | None = None  # the last batch predict answered
        self._exp_of_class: torch.Tensor | None = None

    # ------------------------------------------------------------- surgery

    def _build(self, run: Any) -> MemoNet:
        cfg = run.config
        if run.stream.setting != "class":  # the stream's: an Avalanche benchmark's is detected, not configured
            raise ConfigError(f"the memo plugin is class-incremental: it needs scenario.setting=class, got '{run.stream.setting}'")
        head = run.model.head
        if not isinstance(head, IncrementalLinear) or isinstance(head, CosineLinear):
            raise ConfigError(f"the memo plugin needs model.head=incremental, got '{cfg.model.head}'")
        generalized, specialized, d = split_backbone(run.model.backbone, self.config.specialized_width, str(cfg.model.backbone))
        model = MemoNet(ExpandableBackbone(generalized, specialized, d), head.out_features)
        return model.to(run.device)

    def _final_model_parameters(self, run: Any, model: MemoNet) -> int:
        """Parameters of the network at the end of the stream: generalized blocks,
        one specialized block per experience, classifier and auxiliary head."""
        stream = run.stream
        n_exp, n_classes, d = len(stream), stream.n_classes, model.backbone.block_features
        last_new = len(stream[n_exp - 1].classes)
        counts = model.parameter_counts()
        bias = int(model.head.bias is not None)
        return (counts["generalized"] + n_exp * counts["specialized_block"] + n_classes * (n_exp * d + bias)
                + (last_new + 1) * (d + bias))

    def _exemplar_bytes(self, run: Any) -> int:
        if self.config.exemplar_bytes is not None:
            return int(self.config.exemplar_bytes)
        x = run.stream[0].train.x
        return x.element_size() * x[0].numel()

    def _set_budget(self, run: Any, model: MemoNet) -> None:
        total = self.config.total_memory
        if total is None:
            self.budget = self.config.memory_size
            if self.budget < run.stream.n_classes:
                raise ConfigError(
                    f"plugins.memo.memory_size={self.budget} exemplars is fewer than one per class of the "
                    f"stream ({run.stream.n_classes})"
                )
            return
        model_bytes = BYTES_PER_PARAMETER * self._final_model_parameters(run, model)
        self.budget = (int(total) - model_bytes) // self._exemplar_bytes(run)
        if self.budget < run.stream.n_classes:
            raise ConfigError(
                f"plugins.memo.total_memory={total} bytes leaves room for {max(self.budget, 0)} exemplars next to "
                f"the final model's {model_bytes} bytes: fewer than one per class ({run.stream.n_classes})"
            )

    def _apply(self, run: Any) -> None:
        """Bind to the run's device: memory, lookups, pending state."""
        if self.memory is None:
            self.generator.manual_seed(plugin_generator(run.config.seed, "memo"))
            self.memory = HerdingMemory(self.budget, self.generator, run.device)
        n = run.stream.n_classes
        exp_of = torch.zeros(n, dtype=torch.long)
        for exp in run.stream:
            exp_of[torch.as_tensor(exp.classes, dtype=torch.long)] = exp.index
        self._exp_of_class = exp_of.to(run.device)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._load(state, run.device)
        self._aux_map = self._make_aux_map(n, run.device)

    def _make_aux_map(self, n_classes: int, device: torch.device) -> torch.Tensor:
        aux = torch.zeros(n_classes, dtype=torch.long)
        for k, c in enumerate(self.new):
            aux[c] = k + 1
        return aux.to(device)

    # tryfirst: the new network replaces run.model before other plugins' setup,
    # which would otherwise anchor (l2, ewc) or select parameters of the model
    # that is discarded.
    @hookimpl(tryfirst=True)
    def setup(self, run: Any) -> None:
        if not isinstance(run.model, MemoNet):
            model = self._build(run)
            self._set_budget(run, model)
            run.model = model
        self.model = run.model
        self._apply(run)

    def restore(self, run: Any, state: dict[str, Any]) -> None:
        """Resume: rebuild the expanded network the checkpoint's weights fit."""
        model = self._build(run)
        self._set_budget(run, model)
        for _ in range(int(state["n_blocks"]) - 1):
            model.expand([])
        if state["aux_outputs"]:
            model.set_aux_head(int(state["aux_outputs"]))
        model.freeze(int(state["n_frozen"]), bool(state["generalized_frozen"]))
        run.model = self.model = model
        self.load_state_dict(state)

    @hookimpl
    def train_data(self, run: Any, exp: Any) -> TensorData | None:
        if not isinstance(exp.train, TensorData):
            raise ConfigError("the memo plugin trains on experience data + exemplars held as tensors: "
                              "use scenario.storage=tensor")
        return self.memory.joined(exp.train) if self.memory is not None else None

    @hookimpl
    def before_experience(self, run: Any, exp: Any) -> None:
        model: MemoNet = run.model
        self.old = list(self.seen)
        self.new = [c for c in exp.classes if c not in self.old]
        self.seen = sorted(set(self.old) | set(self.new))
        if exp.index > 0:
            model.expand(self.old)
        model.set_aux_head(len(self.new) + 1)
        model.freeze(len(model.blocks) - 1, generalized=not self.config.train_base and exp.index > 0)
        self._aux_map = self._make_aux_map(run.stream.n_classes, run.device)

    @staticmethod
    def aux_targets(aux_map: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Auxiliary labels: a new class -> its rank among the new classes + 1; an old class -> 0."""
        return aux_map[y]

    @hookimpl
    def loss_terms(self, run: Any, batch: Any, out: Any) -> dict[str, torch.Tensor] | None:
        if not self.old or self.config.alpha_aux == 0:
            return None
        aux = out.extras.get("aux_logits")
        if aux is None:
            raise TrainingError("memo: the model output has no 'aux_logits'; another plugin's forward replaced MEMO's")
        assert self._aux_map is not None, "made by before_experience, with self.old"
        return {"aux": self.config.alpha_aux * F.cross_entropy(aux, self.aux_targets(self._aux_map, batch.y))}

    def _features(self, model: MemoNet):
        return lambda x: model(x).features

    @hookimpl
    def after_experience(self, run: Any, exp: Any) -> None:
        model: MemoNet = run.model
        if self.old and self.new and self.config.weight_align:
            self.align_factors.append(model.weight_align(self.old, self.new))
        was_training = model.training
        model.eval()
        assert self.memory is not None
        self.memory.update(self._features(model), exp.train, self.new, len(self.seen))
        self.class_means = self.memory.class_means(self._features(model), run.stream.n_classes)
        model.train(was_training)
        self.memory_rows.append(self.memory_report(run))

    # ----------------------------------------------------------- evaluation

    def nme(self, features: torch.Tensor) -> torch.Tensor:
        """Nearest mean of exemplars (iCaRL): the class whose normalised mean is closest."""
        assert self.class_means is not None
        dist = torch.cdist(F.normalize(features, dim=1), self.class_means.to(features.dtype))
        return torch.nan_to_num(dist, nan=float("inf")).argmin(dim=1)

    @hookimpl
    def predict(self, run: Any, batch: Any) -> torch.Tensor:
        out = run.model(batch.x, batch.t)
        cnn = out.logits.argmax(dim=1)
        preds = {"classifier": cnn}
        # the means of the network before the experience's block, when another plugin predicts
        # before after_experience has computed them again (SSD's forget events): no NME then
        if self.class_means is not None and self.class_means.shape[1] == out.features.shape[1]:
            preds["nme"] = self.nme(out.features)
        self._predicted = (batch, preds)
        return preds.get(self.config.predict, cnn)

    @hookimpl
    def after_eval_batch(self, run: Any, batch: Any) -> None:
        """Counts both predictions of the batch just predicted: in the run's
        evaluations only, not in other plugins' calls of ``predict`` (SSD's
        measurements before and after it forgets)."""
        if self._predicted is None or self._predicted[0] is not batch:
            return
        preds = self._predicted[1]
        self._predicted = None
        assert self._exp_of_class is not None
        n_exp = len(run.stream)
        index = self._exp_of_class[batch.y]
        # index_add_, not bincount: bincount reads its input's range back to the host on CUDA
        self._hits.setdefault("count", torch.zeros(n_exp, device=run.device))
        self._hits["count"].index_add_(0, index, torch.ones(len(index), device=run.device))
        for name, p in preds.items():
            self._hits.setdefault(name, torch.zeros(n_exp, device=run.device))
            self._hits[name].index_add_(0, index, (p == batch.y).float())

    @hookimpl
    def on_metrics(self, run: Any, metrics: dict[str, Any]) -> None:
        if metrics.get("kind") != "eval":
            return
        # every process takes part in the all-reduce (sharded evaluation), whatever its share held
        names = ["count", *(name for name in PREDICTIONS if name != "nme" or self.class_means is not None)]
        zeros = torch.zeros(len(run.stream), device=run.device)
        totals = run.dist.all_reduce_(torch.stack([self._hits.get(name, zeros) for name in names]))
        self._hits.clear()
        if not bool(totals[0].any()):  # predict was answered by another plugin: nothing counted
            return
        count = totals[0].clamp(min=1)
        for name, hits in zip(names[1:], totals[1:], strict=True):
            self.accuracy[name].append((hits / count).cpu().tolist())

    # ------------------------------------------------------------- memory

    def memory_report(self, run: Any) -> dict[str, int | float]:
        """The model's and the exemplars' memory now, in bytes and exemplar equivalents."""
        per = self._exemplar_bytes(run)
        params = count_parameters(run.model)
        n = len(self.memory) if self.memory is not None else 0
        model_bytes = BYTES_PER_PARAMETER * params
        total = model_bytes + n * per
        return {
            "model_parameters": params,
            "model_bytes": model_bytes,
            "exemplars": n,
            "bytes_per_exemplar": per,
            "exemplar_bytes": n * per,
            "total_bytes": total,
            "total_exemplar_equivalents": total / per,
            "budget": self.budget,
        }

    # -------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        model = self.model
        return {
            "n_blocks": 1 if model is None else len(model.blocks),
            "aux_outputs": 0 if model is None or model.aux_head is None else model.aux_head.out_features,
            "n_frozen": 0 if model is None else model.n_frozen,
            "generalized_frozen": False if model is None else model.generalized_frozen,
            "seen": list(self.seen),
            "old": list(self.old),
            "new": list(self.new),
            "budget": int(self.budget),
            "generator": self.generator.get_state(),
            "memory": None if self.memory is None else self.memory.state_dict(),
            "class_means": self.class_means,
            "accuracy": {k: [list(r) for r in v] for k, v in self.accuracy.items()},
            "memory_rows": [dict(r) for r in self.memory_rows],
            "align_factors": list(self.align_factors),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.memory is None:  # before setup: applied there, once the device is known
            self._pending = state
            self.seen, self.old, self.new = list(state["seen"]), list(state["old"]), list(state["new"])
            self.budget = int(state["budget"])
            return
        self._load(state, None)

    def _load(self, state: dict[str, Any], device: torch.device | None) -> None:
        self.seen, self.old, self.new = list(state["seen"]), list(state["old"]), list(state["new"])
        self.budget = int(state["budget"])
        self.generator.set_state(state["generator"])
        assert self.memory is not None
        self.memory.size = self.budget
        if state["memory"] is not None:
            self.memory.load_state_dict(state["memory"])
        means = state["class_means"]
        self.class_means = None if means is None else means.to(device or self.memory.device or "cpu")
        self.accuracy = {k: [list(r) for r in v] for k, v in state["accuracy"].items()}
        self.memory_rows = [dict(r) for r in state["memory_rows"]]
        self.align_factors = [float(g) for g in state.get("align_factors", [])]
