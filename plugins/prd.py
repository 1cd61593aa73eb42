"""Prototype-sample relation distillation: supervised contrastive learning with
per-experience prototypes, no replay.

Asadi, Davari, Mudur, Aljundi and Belilovsky, "Prototype-Sample Relation
Distillation: Towards Replay-Free Continual Learning", ICML 2023; reference code
``naderAsadi/Probing-Continual-Learning`` (``methods/repe.py``). Per training step,
with ``f`` the encoder's features of two augmented views of the batch and ``z``
their normalised projections (an MLP to 128 dimensions):

- ``L_sc``: the supervised contrastive loss of ``z`` (Khosla et al., 2020;
  temperature 0.1, base temperature 0.07) -- the base loss (``compute_loss``);
- ``L_p = mean(1 - cos(f.detach(), p_y))`` over the current experience's
  prototypes ``p`` (one bias-free linear map per experience, from features to its
  classes): it trains the prototypes only;
- ``L_d = sum over earlier experiences e of KL(softmax(s_teacher / T) || softmax(s / T))``
  (batchmean, ``T = 1``), with ``s_c(x) = <f(x), p_c> / |p_c|`` for the
  prototypes of ``e``; the teacher is the encoder and the prototypes as they were
  when the current experience started. Its gradient reaches the encoder and the
  old prototypes. ``relation: prototypes`` (default, the reference code) takes the
  softmax over the prototypes of ``e`` for each sample; ``relation: samples`` (the
  paper's wording: keep the ordering of the samples for each prototype) over the
  batch for each prototype.

The loss is ``L_sc + 2 L_p + 4 L_d``; the prototypes are a parameter group of
their own (``prototype_lr``, no momentum, no weight decay). Prediction is the
class of the most cosine-similar prototype: of all prototypes (class-incremental),
or of the sample's task's (``scenario.setting=task``). No sample is stored.

Where this differs from the reference code, named: the distillation is the KL
divergence (the reference code computes the cross-entropy, which is larger by the
teacher's entropy and has the same gradient); prototypes are created per
experience as it starts (the reference code creates all of them at the start);
no warm-up epochs for the first experience (its ``n_warmup_epochs``, default 0).
The model's own head still grows with the classes and is not used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, List

import torch
from contlearn.plugins._common import plugin_generator
from contlearn.plugins._supcon import supcon_loss, supcon_over_processes
from contlearn.plugins._views import Views
from torch import nn
from torch.nn import functional as F

from contlearn.defaults import build_optimizer
from contlearn.errors import ConfigError, choices
from contlearn.hookspecs import hookimpl
from contlearn.models import Output
from contlearn.models.heads import MASKED_LOGIT
from contlearn.snapshots import drop_unsaved_entries, load_tensors, module_tensors

RELATIONS = ("prototypes", "samples")
TEACHER_BN = ("batch", "running")
#: The augmentations of the reference code for CIFAR (kornia: crop with padding 4,
#: flip, colour jitter 0.4 with p 0.8, grayscale with p 0.2).
REFERENCE_VIEWS = ["random_crop:4", "hflip", "color_jitter:0.4,0.4,0.4,0.8", "grayscale:0.2"]


def prototype_loss(features: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(features_i, prototypes[targets_i]))`` over the samples whose
    target is a row of ``prototypes`` (``targets >= 0``); 0 when there are none."""
    total, count = _prototype_sum(features, targets, prototypes)
    return total / count.clamp_min(1)


def _prototype_sum(
    features: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of ``1 - cos`` over the samples with a prototype, and their number."""
    cos = F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T
    valid = targets >= 0
    picked = cos.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    return ((1 - picked) * valid).sum(), valid.sum().to(picked.dtype)


def prototype_loss_over_processes(
    features: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor, dist: Any, n: int, share: int
) -> torch.Tensor:
    """Several processes: :func:`prototype_loss` of the whole batch of ``n`` samples
    from this process's ``share`` of them. The mean runs over every process's samples
    with a prototype (rehearsed old classes have none, and a share may hold more of
    them than another): its value is the whole batch's, and its gradient this share's
    part of it, scaled for the loop's weighting of the shares (a collective)."""
    total, count = _prototype_sum(features, targets, prototypes)
    whole_total, whole_count = dist.all_reduce_(torch.stack([total.detach(), count]))
    whole = (whole_total + (total - total.detach())) / whole_count.clamp_min(1)
    return dist.whole_batch_loss(whole, n, share)


def relation_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``s[i, c] = <features_i, prototypes_c> / |prototypes_c|``."""
    return (features @ prototypes.T) / prototypes.norm(dim=1)


def relation_distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    T: float = 1.0,
    relation: str = "prototypes",
) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` of score matrices
    ``[samples, prototypes]``, averaged over the distributions ("batchmean"): the
    rows (``relation="prototypes"``) or the columns (``"samples"``)."""
    if relation == "samples":
        student, teacher = student.T, teacher.T
    return F.kl_div(
        F.log_softmax(student.float() / T, dim=1),
        F.log_softmax(teacher.float() / T, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def views_over_processes(scores: torch.Tensor, dist: Any, n: int) -> torch.Tensor:
    """Several processes: the ``[2 b, P]`` scores of a share's two views (view-major,
    as :meth:`PRD.forward` stacks them) -> the ``[2 n, P]`` scores of the whole
    batch of ``n`` samples (this share's rows keep their gradients; a collective)."""
    b = scores.shape[0] // 2
    whole = dist.gather_rows(scores.view(2, b, -1).transpose(0, 1), n)  # [n, 2, P]
    return whole.transpose(0, 1).reshape(2 * n, -1)


def projection_mlp(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    """``layers`` linear layers, ReLU between them (the reference's ``ProjectionMLP``)."""
    widths = [in_features] + [hidden] * (layers - 1) + [out_features]
    modules: list[nn.Module] = []
    for k in range(layers):
        modules.append(nn.Linear(widths[k], widths[k + 1]))
        if k < layers - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


class PRD:
    """Prototype-sample relation distillation (Asadi et al., ICML 2023): replay-free SupCon with prototypes."""

    #: its forward scores the classes by prototype similarity without gradient (the
    #: features train through SupCon and the prototypes): a plugin that would train
    #: through the logits (lwf) refuses to run beside it
    logits_without_gradient = True

    #: a one-epoch split-digits run (tests/test_plugins.py) needs the digits setup of
    #: configs/split-digits-prd.yaml: SGD at lr 0.1 collapses the projections, and
    #: the reference's CIFAR views are too strong for 8x8 digits
    smoke_overrides = [
        "model.backbone=cnn-bn",
        "model.hidden=[32,64]",
        "train.optimizer=adam",
        "train.lr=0.001",
        "plugins.prd.views=[random_crop:1]",
        "plugins.prd.prototype_lr=0.1",
    ]

    @dataclass
    class Config:
        prototype_weight: float = 2.0  # weight of L_p
        distill_weight: float = 4.0  # weight of L_d
        temperature: float = 0.1  # SupCon temperature
        base_temperature: float = 0.07  # SupCon base temperature (loss scale tau / tau_base)
        distill_temperature: float = 1.0  # T of the relation distillation
        relation: str = "prototypes"  # prototypes (reference code) | samples (the paper's wording)
        prototype_lr: float = 0.01  # learning rate of the prototypes' parameter group
        projection_dim: int = 128
        projection_hidden: int = 512
        projection_layers: int = 3  # linear layers of the projection MLP
        views: List[str] = field(default_factory=lambda: list(REFERENCE_VIEWS))  # augmentation of each view
        teacher_bn: str = "batch"  # batch (reference: batch statistics) | running (teacher in eval mode)

    def __init__(self, config: PRD.Config):
        if config.relation not in RELATIONS:
            raise ConfigError(f"plugins.prd.relation must be one of {choices(RELATIONS)}, got {config.relation!r}")
        if config.teacher_bn not in TEACHER_BN:
            raise ConfigError(f"plugins.prd.teacher_bn must be one of {choices(TEACHER_BN)}, got {config.teacher_bn!r}")
        for name in ("temperature", "base_temperature", "distill_temperature"):
            if getattr(config, name) <= 0:
                raise ConfigError(f"plugins.prd.{name} must be positive, got {getattr(config, name)}")
        for name in ("prototype_weight", "distill_weight", "prototype_lr"):
            if getattr(config, name) < 0:
                raise ConfigError(f"plugins.prd.{name} must be non-negative, got {getattr(config, name)}")
        if config.projection_layers < 1 or config.projection_dim < 1 or config.projection_hidden < 1:
            raise ConfigError("plugins.prd.projection_layers, projection_dim and projection_hidden must be positive")
        self.config = config
        self.views = Views(config.views, "plugins.prd.views")
        self.projection: nn.Module | None = None
        self.prototypes = nn.ParameterList()  # one [classes, features] matrix per experience
        self.experiences: list[int] = []  # the experience of each matrix
        self.classes: list[list[int]] = []  # its classes (model-side labels), row by row
        self.tasks: list[int] = []  # its task label
        self.teacher: nn.Module | None = None  # the encoder when the current experience started
        self.teacher_prototypes: list[torch.Tensor] = []  # and the prototypes of the earlier experiences
        self.generator: torch.Generator | None = None
        self._pending: dict[str, Any] | None = None
        self._columns: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- experience

    @hookimpl
    def setup(self, run: Any) -> None:
        cfg = self.config
        if self.projection is None:
            self.projection = projection_mlp(
                run.model.out_features, cfg.projection_hidden, cfg.projection_dim, cfg.projection_layers
            ).to(run.device)
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(plugin_generator(run.config.seed, "prd"))
        if self._pending is not None:
            self._restore(run, self._pending)
            self._pending = None

    @hookimpl
    def before_experience(self, run: Any, exp: Any) -> None:
        if exp.index in self.experiences:
            return
        if len(self.prototypes):
            self.teacher = self._frozen_encoder(run)
            self.teacher_prototypes = [p.detach().clone() for p in self.prototypes]
        weight = nn.Linear(run.model.out_features, len(exp.classes), bias=False).weight
        self.prototypes.append(nn.Parameter(weight.detach().to(run.device)))
        self.experiences.append(exp.index)
        self.classes.append([int(c) for c in exp.classes])
        self.tasks.append(int(exp.task))
        self._columns = {}

    @hookimpl
    def configure_optimizer(self, run: Any, exp: Any) -> torch.optim.Optimizer:
        assert self.projection is not None
        model = [p for p in run.model.parameters() if p.requires_grad] + list(self.projection.parameters())
        prototypes: dict[str, Any] = {"params": list(self.prototypes), "lr": self.config.prototype_lr, "weight_decay": 0.0}
        if run.config.train.optimizer == "sgd":
            prototypes["momentum"] = 0.0
        return build_optimizer([{"params": model}, prototypes], run.config.train)

    # ---------------------------------------------------------------------- step

    @hookimpl
    def forward(self, run: Any, batch: Any) -> Output:
        assert self.projection is not None
        b = len(batch)
        generator = self.generator if run.dist.world_size == 1 else self._share_generator(run)
        views = torch.cat([self.views(batch.x, generator), self.views(batch.x, generator)])
        features = run.model.backbone(views)
        z = F.normalize(self.projection(features), dim=1)
        with torch.no_grad():
            logits = self.class_scores(features[:b])
        return Output(
            logits,
            features[:b],
            {"view_features": features, "projections": torch.stack([z[:b], z[b:]], dim=1), "views": views},
        )

    @staticmethod
    def _share_generator(run: Any) -> torch.Generator:
        """Several processes: the views of this process's share are drawn from a
        generator seeded by the run's seed, the global step and the rank, so that
        the draws differ between processes and a resume makes them again exactly
        (a stateful generator would advance by each share's size)."""
        name = f"prd/views/step{run.global_step}/rank{run.dist.rank}"
        return torch.Generator().manual_seed(plugin_generator(run.config.seed, name))

    @hookimpl
    def compute_loss(self, run: Any, batch: Any, out: Output) -> torch.Tensor:
        z, cfg = out.extras["projections"], self.config
        if not run.dist.divides(run.batch_size):
            return supcon_loss(z, batch.y, cfg.temperature, cfg.base_temperature)
        return supcon_over_processes(z, batch.y, run.dist, run.batch_size, cfg.temperature, cfg.base_temperature)

    @hookimpl
    def loss_terms(self, run: Any, batch: Any, out: Output) -> dict[str, torch.Tensor]:
        cfg = self.config
        features = out.extras["view_features"]
        targets = self._column("local")[batch.y].repeat(2)
        n, b = run.batch_size, len(batch)
        divided = run.dist.divides(n)
        if divided:
            prototype = prototype_loss_over_processes(features.detach(), targets, self.prototypes[-1], run.dist, n, b)
        else:
            prototype = prototype_loss(features.detach(), targets, self.prototypes[-1])
        terms = {"prototype": cfg.prototype_weight * prototype}
        if self.teacher is not None and self.teacher_prototypes:
            with torch.no_grad():
                old_features = self.teacher(out.extras["views"])
            # relation "samples" couples the batch's samples: under torchrun, gathered like SupCon
            gathered = cfg.relation == "samples" and divided
            distill = features.new_zeros(())
            for student_p, teacher_p in zip(self.prototypes, self.teacher_prototypes, strict=False):  # older ones
                student, teacher = relation_scores(features, student_p), relation_scores(old_features, teacher_p)
                if gathered:
                    student = views_over_processes(student, run.dist, n)
                    teacher = views_over_processes(teacher, run.dist, n)
                distill = distill + relation_distillation(student, teacher, cfg.distill_temperature, cfg.relation)
            if gathered:
                distill = run.dist.whole_batch_loss(distill, n, b)
            terms["distill"] = cfg.distill_weight * distill
        return terms

    # ---------------------------------------------------------------------- eval

    @hookimpl
    def predict(self, run: Any, batch: Any) -> torch.Tensor | None:
        if not len(self.prototypes):
            return None
        task = batch.t if run.stream.setting == "task" else None  # the stream's (an Avalanche benchmark's is detected)
        return self.class_scores(run.model.backbone(batch.x), task).argmax(dim=1)

    def class_scores(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarity of ``features`` to the prototypes, by class ``[N, classes]``
        (the best prototype of a class, if several have it; :data:`MASKED_LOGIT` for
        classes without one, or outside the sample's ``task`` when given)."""
        protos = torch.cat(list(self.prototypes))
        cos = F.normalize(features.to(protos.dtype), dim=1) @ F.normalize(protos, dim=1).T
        if task is not None:
            cos = cos.masked_fill(self._column("task")[None, :] != task[:, None], MASKED_LOGIT)
        cls = self._column("class")
        out = cos.new_full((cos.shape[0], max(max(c) for c in self.classes) + 1), MASKED_LOGIT)
        return out.scatter_reduce(1, cls.expand_as(cos), cos, reduce="amax", include_self=False)

    # -------------------------------------------------------------------- helpers

    def _column(self, kind: str) -> torch.Tensor:
        """Per prototype row: its ``class`` and ``task``; ``local``: class -> row of
        the newest matrix (-1 for other classes)."""
        if not self._columns:
            device = self.prototypes[0].device
            flat = [c for cs in self.classes for c in cs]
            local = torch.full((max(flat) + 1,), -1, dtype=torch.long)
            for row, c in enumerate(self.classes[-1]):
                local[c] = row
            self._columns = {
                "class": torch.tensor(flat, dtype=torch.long, device=device),
                "task": torch.tensor([t for t, cs in zip(self.tasks, self.classes, strict=True) for _ in cs], device=device),
                "local": local.to(device),
            }
        return self._columns[kind]

    def _frozen_encoder(self, run: Any) -> nn.Module:
        """A copy of the encoder with gradients off. ``teacher_bn: batch`` keeps it in
        train mode, as the reference code does (BatchNorm normalises with the batch's
        statistics), without updating its running statistics."""
        teacher = copy.deepcopy(run.model.backbone)
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.config.teacher_bn == "running":
            return teacher.eval()
        teacher.train()
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
        return teacher

    # --------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Projection, prototypes (with their experience, classes and task), the
        teacher, the views' generator state; no sample."""
        if self._pending is not None:
            return dict(self._pending)
        return {
            "projection": {} if self.projection is None else {k: v.clone() for k, v in module_tensors(self.projection).items()},
            "prototypes": [p.detach().clone() for p in self.prototypes],
            "experiences": list(self.experiences),
            "classes": [list(c) for c in self.classes],
            "tasks": list(self.tasks),
            "teacher": {} if self.teacher is None else {k: v.clone() for k, v in module_tensors(self.teacher).items()},
            "teacher_prototypes": [p.clone() for p in self.teacher_prototypes],
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Kept until ``setup``, which rebuilds the modules on the run's device."""
        self._pending = dict(state)

    def _restore(self, run: Any, state: dict[str, Any]) -> None:
        assert self.projection is not None and self.generator is not None
        if state["projection"]:
            load_tensors(self.projection, state["projection"])
        self.prototypes = nn.ParameterList([nn.Parameter(p.detach().clone().to(run.device)) for p in state["prototypes"]])
        self.experiences = [int(e) for e in state["experiences"]]
        self.classes = [[int(c) for c in cs] for cs in state["classes"]]
        self.tasks = [int(t) for t in state["tasks"]]
        self.teacher = None
        if state["teacher"]:
            self.teacher = self._frozen_encoder(run)
            drop_unsaved_entries(self.teacher, state["teacher"])  # blocks added to the model since
            load_tensors(self.teacher, state["teacher"])
        self.teacher_prototypes = [p.detach().clone().to(run.device) for p in state["teacher_prototypes"]]
        if state["generator"] is not None:
            self.generator.set_state(state["generator"].cpu())
        self._columns = {}
