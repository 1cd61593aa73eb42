"""Dual Memory Networks: test-time and few-shot adaptation of CLIP.

Zhang, Zhu, Wang, Zhang, "Dual Memory Networks: A Versatile Adaptation
Approach for Vision-Language Models", CVPR 2024 (reference code YBZh/DMN,
``dmn_main.py``). A frozen CLIP classifies with three probability vectors:

- ``P_text``: softmax of ``100 v . w_c`` (the zero-shot text classifier);
- ``P_static``: read out of the *static memory*, per class the text embedding
  and K few-shot training features;
- ``P_dynamic``: read out of the *dynamic memory*, per class L slots filled at
  test time with features of confidently pseudo-labelled test images.

``P = P_text + alpha_d P_dynamic + alpha_s P_static``. A read-out attends over
a class's memory entries with weights ``exp(-beta (1 - q . k))`` and compares
the renormalised weighted sum of values with ``v``. The learnable variant adds
zero-initialised residual biases to queries, keys, values, outputs and text
embeddings, trained on the shots.

In a stream the classifier and the static memory gain each experience's
classes; the dynamic memory is emptied before each evaluation or kept.
``alpha_d`` and ``alpha_s`` are chosen on held-out training samples, never on
test labels (the reference code searches them on the test set).

This module holds the plugin; the memories and their read-out are in
:mod:`contlearn.plugins._dmn_memory`, the view features, the biases' training
and the alpha search in :mod:`contlearn.plugins._dmn_adapt` (their public
names are re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from contlearn.plugins._clip import ClipClassifier, check_templates, class_names_for
from contlearn.plugins._dmn_adapt import ALPHA_GRID, encode_views, search_alphas, train_biases
from contlearn.plugins._dmn_memory import BIASES, DualMemory, entropy

from contlearn.errors import ConfigError, PluginError
from contlearn.hookspecs import hookimpl
from contlearn.models import Output

__all__ = ["ALPHA_GRID", "BIASES", "DMN", "MODES", "DualMemory", "entropy", "search_alphas"]

MODES = ("zero_shot", "training_free", "learnable")


class _NoOptimizer:
    """The optimizer of an experience with nothing to train (a frozen CLIP)."""

    param_groups: list = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DMN:
    """Dual Memory Networks for CLIP (Zhang et al., CVPR 2024): text, static and dynamic memories.

    ``setup`` replaces the run's model by a :class:`~contlearn.plugins._clip.ClipClassifier`
    built from ``clip``/``pretrained``; its head is the text classifier, which
    grows with each experience's classes. Prediction is DMN's, in ``predict``.
    """

    #: predictions depend on the test samples before them (the dynamic memory, the
    #: views drawn from this plugin's generator): under torchrun every process
    #: evaluates all test data, in order, and stays in step with the others
    sequential_evaluation = True

    #: setup replaces the run's model by the CLIP (see :class:`~contlearn.plugins.memo.MEMO`)
    builds_model = True

    #: predict uses the memories after_experience fills with the new classes (see
    #: :class:`~contlearn.plugins.clr.CLR`)
    predicts_from_after_experience = True

    smoke_overrides = [
        "plugins.dmn.clip=contlearn-tiny-clip",
        "plugins.dmn.pretrained=null",
        "plugins.dmn.train_clip=true",
        "plugins.dmn.shots=4",
        "plugins.dmn.views=8",
        "train.optimizer=adam",
        "train.lr=0.001",
        "train.batch_size=16",
        "plugins.dmn.templates=['a photo of the digit {}.']",
    ]

    @dataclass
    class Config:
        clip: str = "ViT-B-16"  # open_clip architecture, or contlearn-tiny-clip
        pretrained: Optional[str] = "openai"  # tag (local cache only) or file; null: random weights
        cache_dir: Optional[str] = None  # where open_clip caches weights
        class_names: Optional[List[str]] = None  # by original label; null: source default / stream names
        templates: Optional[List[str]] = None  # prompt templates; null: CLIP's 7
        mode: str = "training_free"  # zero_shot | training_free | learnable
        shots: int = 16  # K training features per class in the static memory
        memory_size: int = 50  # L dynamic slots per class
        views: int = 32  # the image and views - 1 random resized crops
        view_fraction: float = 0.1  # lowest-entropy share of views averaged into p_bar
        crop_min: float = 0.5  # smallest crop area fraction (DMN's RandomResizedCrop scale (0.5, 1))
        flip: bool = True  # random horizontal flips of the crops
        beta: float = 5.5  # sharpness of the read-out weights
        logit_scale: float = 100.0
        alpha_dynamic: Optional[float] = None  # null: searched on validation samples
        alpha_static: Optional[float] = None  # null: searched (0 in zero_shot mode)
        alpha_grid: List[float] = field(default_factory=lambda: list(ALPHA_GRID))
        validation_per_class: int = 10  # held out of each class's training data for the search
        dynamic_memory: str = "reset"  # reset: emptied before each evaluation | keep
        dynamic_reads_static: bool = True  # dynamic read-out also attends over static entries
        train_clip: bool = False  # the loop trains CLIP by cross-entropy through the text head
        lr: float = 1e-4  # learnable: AdamW on the residual biases
        epochs: int = 20
        batch_size: int = 128
        weight_decay: float = 1e-4

    def __init__(self, config: DMN.Config):
        c = self.config = config
        # without train_clip the CLIP stays frozen and the loop's logits are zeros:
        # ewc, l2 and ssd would weigh no parameter, lwf distil nothing (they refuse)
        self.freezes_model = self.logits_without_gradient = not c.train_clip
        if c.mode not in MODES:
            raise ConfigError(f"plugins.dmn.mode must be one of {', '.join(MODES)}, got {c.mode!r}")
        if c.templates is not None:  # before the CLIP is built (null: CLIP's 7)
            check_templates(c.templates, "plugins.dmn.templates", "null: CLIP's 7")
        if c.dynamic_memory not in ("reset", "keep"):
            raise ConfigError(f"plugins.dmn.dynamic_memory must be 'reset' or 'keep', got {c.dynamic_memory!r}")
        for key in ("memory_size", "views", "epochs", "batch_size"):
            if getattr(c, key) < 1:
                raise ConfigError(f"plugins.dmn.{key} must be at least 1, got {getattr(c, key)}")
        if c.mode != "zero_shot" and c.shots < 1:
            raise ConfigError(f"plugins.dmn.shots must be at least 1 in mode {c.mode} (or use mode=zero_shot)")
        for key in ("lr", "logit_scale"):
            if not getattr(c, key) > 0:
                raise ConfigError(f"plugins.dmn.{key} must be positive, got {getattr(c, key)}")
        for key in ("weight_decay", "beta"):
            if not getattr(c, key) >= 0:
                raise ConfigError(f"plugins.dmn.{key} must be non-negative, got {getattr(c, key)}")
        for key in ("alpha_dynamic", "alpha_static"):
            if getattr(c, key) is not None and not getattr(c, key) >= 0:
                raise ConfigError(f"plugins.dmn.{key} must be non-negative (or null: searched), got {getattr(c, key)}")
        if not all(a >= 0 for a in c.alpha_grid):
            raise ConfigError(f"plugins.dmn.alpha_grid weights must be non-negative, got {list(c.alpha_grid)}")
        if not 0 < c.view_fraction <= 1 or not 0 < c.crop_min <= 1:
            raise ConfigError("plugins.dmn.view_fraction and crop_min must be in (0, 1]")
        if self.searches and c.validation_per_class < 1:
            raise ConfigError("plugins.dmn.validation_per_class must be at least 1 unless alpha_dynamic and alpha_static are given")
        if self.searches and not c.alpha_grid:
            raise ConfigError("plugins.dmn.alpha_grid must list at least one weight")
        self.shots = 0 if c.mode == "zero_shot" else c.shots
        self.memory: DualMemory | None = None
        self.shot_x: torch.Tensor | None = None  # [C, K, *input]: re-encoded when CLIP changes
        self.shot_mask = torch.zeros(0, self.shots, dtype=torch.bool)
        self.val_x: torch.Tensor | None = None
        self.val_y = torch.zeros(0, dtype=torch.long)
        self.alpha = [c.alpha_dynamic or 0.0, 0.0 if c.mode == "zero_shot" else (c.alpha_static or 0.0)]
        self.history: list[dict[str, float]] = []
        self.kept: dict[int, torch.Tensor] = {}  # training samples kept per experience
        self.generator = torch.Generator()

    @property
    def searches(self) -> bool:
        return self.config.alpha_dynamic is None or (self.config.mode != "zero_shot" and self.config.alpha_static is None)

    # ----------------------------------------------------------------- hooks

    # tryfirst: the CLIP replaces run.model before other plugins' setup, which
    # would otherwise anchor or select parameters of the model that is discarded.
    @hookimpl(tryfirst=True)
    def setup(self, run) -> None:
        """Replaces ``run.model`` by the CLIP (kept when :meth:`restore` built it)."""
        self._check_stream(run)
        if not isinstance(run.model, ClipClassifier):
            run.model = self._build_model(run)
            self.generator.manual_seed(int(run.config.seed))
        if self.memory is None:
            self.memory = self._new_memory(run.model.backbone.out_features)
        self.memory.to(run.device)

    @staticmethod
    def _check_stream(run) -> None:
        """Before the CLIP is built: the stream has images, and no task labels (DMN
        classifies among every class seen, and its dynamic memory takes its own
        predictions as labels: a task-incremental score would be a class-incremental one)."""
        if run.stream.setting == "task":  # the stream's: an Avalanche benchmark's is detected, not configured
            raise ConfigError(
                "the dmn plugin classifies among all the classes seen (class- or domain-incremental) and does not "
                "use task labels: scenario.setting=task would report its class-incremental accuracy as task-incremental"
            )
        shape = tuple(run.stream.input_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ConfigError(f"the dmn plugin's CLIP needs image inputs [1 or 3, H, W], the data has shape {shape}")

    def restore(self, run, state: dict[str, Any]) -> None:
        """Resuming from a checkpoint: build the CLIP, grown to the classes of the
        experiences started, so that the checkpoint's weights fit it; then
        :meth:`load_state_dict`."""
        self._check_stream(run)
        model = self._build_model(run)
        started = len(run.accuracy_rows) + (run.experience is not None)
        for exp in run.stream.experiences[:started]:
            model.adapt(exp.classes, exp.task)
        run.model = model
        self.load_state_dict(state)

    @hookimpl
    def train_data(self, run, exp):
        """Holds out validation samples and draws the shots of the new classes
        (once per experience: called again on resume, it returns the same data)."""
        data, gen, c = exp.train, self.generator, self.config
        if exp.index in self.kept:
            return data.subset(self.kept[exp.index])
        y = data.y.cpu()
        carve = self.searches and exp.val is None
        val_idx, rest_idx, shots = [], [], {}
        for cls in exp.classes:
            idx = (y == cls).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = min(c.validation_per_class, len(idx) - 1) if carve else 0
            val_idx.append(idx[:n_val])
            rest_idx.append(idx[n_val:])
            if self.shots:
                shots[cls] = data.batch(idx[n_val : n_val + self.shots]).x.cpu()
        if self.searches:
            source = data if carve else exp.val
            if not carve:
                vy = exp.val.y.cpu()
                val_idx = []
                for cls in exp.classes:
                    idx = (vy == cls).nonzero().flatten()
                    val_idx.append(idx[torch.randperm(len(idx), generator=gen)][: c.validation_per_class])
            val = source.batch(torch.cat(val_idx))
            self.val_x = val.x.cpu() if self.val_x is None else torch.cat([self.val_x, val.x.cpu()])
            self.val_y = torch.cat([self.val_y, val.y.cpu()])
        if shots:
            self._store_shots(shots)
        self.kept[exp.index] = torch.cat(rest_idx).sort().values
        return data.subset(self.kept[exp.index])

    @hookimpl
    def configure_optimizer(self, run, exp):
        return None if self.config.train_clip else _NoOptimizer()

    @hookimpl
    def forward(self, run, batch):
        if self.config.train_clip:
            return None
        return Output(torch.zeros(len(batch), run.model.head.out_features, device=batch.x.device))

    @hookimpl
    def compute_loss(self, run, batch, out):
        return None if self.config.train_clip else torch.zeros((), device=batch.x.device, requires_grad=True)

    @hookimpl
    def after_experience(self, run, exp) -> None:
        """Refreshes the memories, trains the biases (learnable), searches the alphas."""
        model, _ = self._parts(run)
        was_training = model.training
        self.adapt(model, reset=self.config.dynamic_memory == "reset")
        self.history.append({"experience": exp.index, "alpha_dynamic": self.alpha[0], "alpha_static": self.alpha[1]})
        model.train(was_training)

    @hookimpl
    def predict(self, run, batch) -> torch.Tensor:
        model, _ = self._parts(run)
        return self.probabilities(model, batch.x).argmax(dim=1)

    # ----------------------------------------------------- outside a stream

    def fit(
        self,
        model: ClipClassifier,
        shots: dict[int, torch.Tensor] | None = None,
        val_x: torch.Tensor | None = None,
        val_y: torch.Tensor | None = None,
        val_feats: torch.Tensor | None = None,
    ) -> None:
        """DMN on a fixed set of classes (``model.head``'s), without a run:
        ``shots[c]`` the images of class ``c``'s shots, ``val_x``/``val_y`` the
        held-out samples for the alpha search (``val_feats``: their
        :meth:`view_features`). Then :meth:`probabilities` classifies."""
        if self.memory is None:
            self.memory = self._new_memory(model.backbone.out_features).to(model.head.tokens.device)
        if shots:
            self._store_shots({c: x.cpu() for c, x in shots.items()})
        if val_x is not None and val_y is not None:
            self.val_x, self.val_y = val_x.cpu(), val_y.cpu()
        if self.searches and self.val_x is None:
            raise ConfigError("DMN.fit needs val_x and val_y unless alpha_dynamic and alpha_static are given")
        if self.shots and self.shot_x is None:
            raise ConfigError(f"DMN.fit needs the shots of mode {self.config.mode} (or use mode=zero_shot)")
        self.adapt(model, reset=True, val_feats=val_feats)

    def adapt(self, model: ClipClassifier, reset: bool, val_feats: torch.Tensor | None = None) -> None:
        """Refresh the memories from ``model``, train the biases (learnable),
        empty the dynamic memory if ``reset``, search the alphas."""
        assert self.memory is not None
        model.eval()
        self.refresh(model)
        if self.config.mode == "learnable":
            self.train_biases(model)
        if reset:
            self.memory.reset_dynamic()
        if self.searches:
            self.choose_alphas(model, val_feats)

    def probabilities(
        self, model: ClipClassifier, x: torch.Tensor | None = None, feats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``P_text + alpha_d P_dynamic + alpha_s P_static`` ``[N, C]`` of images
        ``x`` (or of their :meth:`view_features` ``feats``), in order, updating
        the dynamic memory."""
        assert self.memory is not None
        if feats is None:
            assert x is not None
            feats = self.view_features(model, x)
        p_text, p_dyn, p_static = self.memory.episode(feats, self.config.view_fraction)
        return p_text + self.alpha[0] * p_dyn + self.alpha[1] * p_static

    # --------------------------------------------------------------- pieces

    def _build_model(self, run) -> ClipClassifier:
        c = self.config
        names = class_names_for(run.stream.name, run.stream.class_names, c.class_names)
        model = ClipClassifier.build(c.clip, names, c.templates, c.pretrained, c.cache_dir, None, run.device)
        model.set_trainable(c.train_clip)
        if run.config.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _new_memory(self, dim: int) -> DualMemory:
        c = self.config
        return DualMemory(
            dim, c.memory_size, self.shots, c.beta, c.logit_scale, c.mode == "learnable", c.dynamic_reads_static
        )

    def _parts(self, run) -> tuple[ClipClassifier, DualMemory]:
        if not isinstance(run.model, ClipClassifier) or self.memory is None:
            raise PluginError("plugin 'dmn' needs the CLIP model it builds in setup; another plugin replaced run.model")
        return run.model, self.memory

    def _store_shots(self, shots: dict[int, torch.Tensor]) -> None:
        """Keep the images of each class's shots (``shots[c]``: ``[k <= K, ...]``)."""
        n = max(shots) + 1
        first = next(iter(shots.values()))
        if self.shot_x is None:
            self.shot_x = first.new_zeros((0, self.shots, *first.shape[1:]))
        if n > self.shot_x.shape[0]:
            extra = n - self.shot_x.shape[0]
            self.shot_x = torch.cat([self.shot_x, self.shot_x.new_zeros((extra, *self.shot_x.shape[1:]))])
            self.shot_mask = torch.cat([self.shot_mask, self.shot_mask.new_zeros(extra, self.shots)])
        for cls, x in shots.items():
            self.shot_x[cls, : len(x)] = x
            self.shot_mask[cls] = torch.arange(self.shots) < len(x)

    def view_features(self, model: ClipClassifier, x: torch.Tensor) -> torch.Tensor:
        """``[N, views, D]`` features of each image and its random views."""
        c = self.config
        return encode_views(model.backbone, x, c.views, self.generator, c.crop_min, c.flip)

    @torch.no_grad()
    def refresh(self, model: ClipClassifier) -> None:
        """Grow the memory to the model's classes; text embeddings and shot
        features from the current CLIP (shots are re-encoded, so a CLIP trained
        in the stream keeps its static memory current)."""
        mem = self.memory
        assert mem is not None
        mem.grow(model.head.out_features)
        mem.text.copy_(model.head.classifier())
        if self.shots and self.shot_x is not None:
            n = min(self.shot_x.shape[0], mem.n_classes)
            x = self.shot_x[:n].flatten(0, 1).to(mem.text.device)
            mem.shot_feat[:n] = model.backbone(x).view(n, self.shots, -1) * self.shot_mask[:n, :, None].to(x.device)
            mem.shot_mask[:n] = self.shot_mask[:n].to(x.device)

    def train_biases(self, model: ClipClassifier) -> list[float]:
        """DMN's learnable variant: AdamW (cosine schedule) on the residual
        biases, cross-entropy of the static-memory logits plus of the text
        logits, on random crops of the shots. Returns the mean loss per epoch."""
        c, mem = self.config, self.memory
        assert mem is not None and self.shot_x is not None
        n = min(self.shot_x.shape[0], mem.n_classes)
        mask = self.shot_mask[:n].flatten()
        x = self.shot_x[:n].flatten(0, 1)[mask]
        y = torch.arange(n).repeat_interleave(self.shots)[mask]
        return train_biases(
            mem, model.backbone, x, y, self.generator, lr=c.lr, weight_decay=c.weight_decay,
            epochs=c.epochs, batch_size=c.batch_size, crop_min=c.crop_min, flip=c.flip
        )  # fmt: skip

    def choose_alphas(self, model: ClipClassifier, feats: torch.Tensor | None = None) -> float:
        """Grid-search alpha_d and alpha_s on the held-out samples of every class
        seen so far (in a random order), in an episode that leaves the dynamic
        memory as it was. ``feats``: their :meth:`view_features`, if already
        computed. Returns the accuracy of the chosen pair on them."""
        c, mem = self.config, self.memory
        assert mem is not None and self.val_x is not None
        device = mem.text.device
        if feats is None:
            feats = self.view_features(model, self.val_x.to(device))
        order = torch.randperm(len(self.val_y), generator=self.generator).to(device)
        snapshot = mem.dynamic_state()
        probs = mem.episode(feats[order], c.view_fraction)
        mem.restore_dynamic(snapshot)
        grid_d = [c.alpha_dynamic] if c.alpha_dynamic is not None else list(c.alpha_grid)
        if c.mode == "zero_shot":
            grid_s = [0.0]
        else:
            grid_s = [c.alpha_static] if c.alpha_static is not None else list(c.alpha_grid)
        ad, as_, acc = search_alphas(probs, self.val_y.to(device)[order], grid_d, grid_s)
        self.alpha = [ad, as_]
        return acc

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        mem = self.memory
        return {
            "memory": None if mem is None else {k: v.detach().cpu().clone() for k, v in mem.state_dict().items()},
            "shot_x": None if self.shot_x is None else self.shot_x.clone(),
            "shot_mask": self.shot_mask.clone(),
            "val_x": None if self.val_x is None else self.val_x.clone(),
            "val_y": self.val_y.clone(),
            "alpha": list(self.alpha),
            "history": [dict(h) for h in self.history],
            "kept": {k: v.clone() for k, v in self.kept.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("memory")
        if saved is not None:
            device = self.memory.text.device if self.memory is not None else torch.device("cpu")
            mem = self._new_memory(saved["text"].shape[1])
            mem.grow(saved["text"].shape[0])
            mem.load_state_dict(saved)
            self.memory = mem.to(device)
        else:
            self.memory = None
        self.shot_x = None if state.get("shot_x") is None else state["shot_x"].cpu().clone()
        self.shot_mask = state["shot_mask"].cpu().clone()
        self.val_x = None if state.get("val_x") is None else state["val_x"].cpu().clone()
        self.val_y = state["val_y"].cpu().clone()
        self.alpha = list(state["alpha"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.kept = {int(k): v.cpu().clone() for k, v in state.get("kept", {}).items()}
        self.generator.set_state(state["generator"].cpu())
