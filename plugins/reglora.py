"""RegLoRA: LoRA fine-tuning per task, merged after it, with the last tasks' key weight changes held still.

The essential-forgetting half of SEFE (Chen et al., "SEFE: Superficial and
Essential Forgetting Eliminator for Multimodal Continual Instruction Tuning",
ICML 2025; reference code github.com/jinpeng0528/SEFE). Every selected
``nn.Linear`` of the backbone gets a LoRA adapter (:mod:`contlearn.plugins._lora`);
the base weights and every other backbone parameter are frozen, the classifier
head trains in full (the reference trains its multimodal projector in full,
unregularised). After each task, in each adapted matrix separately, the
``top`` fraction of the elements of ``|B_t A_t|`` (unscaled) are that task's *key
elements*; their positions are appended to those of earlier tasks (duplicates
kept, as in the reference), and the adapter is merged into the weight
(``W += (alpha/r) B_t A_t``) and started afresh. While a later task ``t`` trains,
the loss gains

    L_reg = lam * (1/M) * sum_m mean_{(i,j) in K_m} |(B_t^m A_t^m)_ij|

over the ``M`` adapted matrices (``K_m``: matrix ``m``'s accumulated key
positions), so the merged weights barely move where earlier tasks changed them
most. The reference's values: ``top`` 0.02, ``lam`` 2500, LoRA rank 128 and
alpha 256 on LLaMA's 4096-wide matrices (the defaults here keep its alpha/r = 2
at rank 8), dropout 0.05.

SEFE's other half, answer-style diversification, rewrites part of each task's
instruction data into other answer formats with a language model before
training; a classification stream has no answers to rewrite, so it is not here.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from contlearn.plugins._common import check_pattern, refuse_model_builders
from contlearn.plugins._lora import LoRALinear, adapter_parameters, insert_lora, lora_layers
from torch import nn

from contlearn.errors import ConfigError, PluginError
from contlearn.hookspecs import hookimpl


def key_elements(delta: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat indices of the ``int(fraction * numel)`` largest ``|delta|`` elements
    (the reference's ``topk`` over the flattened ``B @ A``; ties as ``topk`` breaks them)."""
    k = int(fraction * delta.numel())
    return torch.topk(delta.detach().abs().flatten(), k).indices


class KeyIndex(NamedTuple):
    """One matrix's accumulated key positions, each counted once: ``flat``
    indices into the weight (and their ``rows`` and ``cols``), ``weight`` how
    many tasks chose each over how many choices there were (the reference keeps
    duplicates, so a position counts once per task in its mean), and whether the penalty gathers the elements
    from the factors (``K x rank`` work and memory) or reads them from the whole
    ``B @ A`` (when that is smaller)."""

    flat: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    weight: torch.Tensor
    gather: bool


def key_index(flat: torch.Tensor, layer: LoRALinear) -> KeyIndex:
    """The :class:`KeyIndex` of ``layer`` for accumulated positions ``flat`` (duplicates allowed)."""
    unique, counts = torch.unique(flat, return_counts=True)
    rank = layer.lora_A.shape[0]
    gather = unique.numel() * rank <= layer.in_features * layer.out_features
    weight = counts.float() / max(flat.numel(), 1)
    return KeyIndex(unique, unique // layer.in_features, unique % layer.in_features, weight, gather)


def key_penalty(layers: list[LoRALinear], keys: list[KeyIndex]) -> torch.Tensor:
    """``(1/M) sum_m mean_k |(B_m A_m)[rows_k, cols_k]|`` over the ``M`` layers,
    duplicates counted as often as they were chosen; a layer without key
    elements adds 0 but counts in ``M``."""
    terms = []
    for layer, key in zip(layers, keys, strict=True):
        if not key.flat.numel():
            continue
        if key.gather:
            values = (layer.lora_B[key.rows] * layer.lora_A[:, key.cols].T).sum(dim=1)
        else:
            values = layer.delta().flatten()[key.flat]
        terms.append((key.weight * values.abs()).sum())
    return torch.stack(terms).sum() / len(layers)


class RegLoRA:
    """RegLoRA (SEFE, Chen et al., ICML 2025): per-task LoRA, merged, key elements regularised.

    See the module docstring and docs/plugins/reglora.md.
    """

    #: the reference's optimizer: lam 2500 is too strong for plain SGD at lr 0.1 (docs/plugins/reglora.md)
    smoke_overrides = ["train.optimizer=adamw", "train.lr=0.001"]

    @dataclass
    class Config:
        rank: int = 8  # LoRA rank r (the reference: 128 on 4096-wide matrices)
        alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / rank (the reference's 2)
        dropout: float = 0.05  # dropout on the adapter's input (peft's lora_dropout)
        pattern: Optional[str] = None  # regex searched in backbone layer names; None: every nn.Linear
        top: float = 0.02  # fraction of each matrix's elements that are a task's key elements
        lam: float = 2500.0  # weight of the L1 penalty on the key elements
        train_base_first: bool = False  # experience 0 trains the whole model (no adapter): a stand-in for pretraining
        train_head: bool = True  # the head trains in full; false: only the adapters train (domain-incremental streams)

        def __post_init__(self) -> None:
            if int(self.rank) != self.rank or self.rank < 1:
                raise ConfigError(f"plugins.reglora.rank must be a positive integer, got {self.rank}")
            if not 0 < self.alpha < math.inf:
                raise ConfigError(f"plugins.reglora.alpha must be a finite number > 0, got {self.alpha}")
            if not 0 <= self.dropout < 1:
                raise ConfigError(f"plugins.reglora.dropout must be in [0, 1), got {self.dropout}")
            if not 0 < self.top <= 1:
                raise ConfigError(f"plugins.reglora.top must be in (0, 1], got {self.top}")
            if not 0 <= self.lam < math.inf:
                raise ConfigError(f"plugins.reglora.lam must be a finite number >= 0, got {self.lam}")
            check_pattern("plugins.reglora.pattern", self.pattern)

    def __init__(self, config: RegLoRA.Config | None = None):
        self.config = config or self.Config()
        #: accumulated key positions by adapted layer name: flat indices into its weight
        self.keys: dict[str, torch.Tensor] = {}
        self._layers: list[LoRALinear] = []
        self._names: list[str] = []
        self._index: list[KeyIndex] = []  # per layer, on its device
        self._has_keys = False  # any layer has key elements: the penalty applies
        self._trainable: list[tuple[nn.Parameter, bool]] = []  # requires_grad of the model's parameters before the surgery
        self._model: nn.Module | None = None  # the model adapted
        self._trains_adapters = False

    # ------------------------------------------------------------- surgery

    def _build(self, run: Any) -> None:
        if self._layers:
            return
        backbone = getattr(run.model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise PluginError(f"plugin reglora adapts the model's backbone, and {type(run.model).__name__} has none")
        c = self.config
        self._trainable = [(p, p.requires_grad) for p in run.model.parameters()]
        self._model = run.model
        try:
            insert_lora(backbone, int(c.rank), c.alpha, c.dropout, c.pattern, root=run.model)
        except ConfigError as exc:
            raise ConfigError(f"plugin reglora: {exc}") from None
        layers = lora_layers(backbone)
        unknown = sorted(set(self.keys) - set(layers))
        if unknown:
            raise PluginError(f"plugin reglora holds key elements of layers the backbone lacks: {unknown[:5]}")
        self._layers = list(layers.values())
        self._names = list(layers)
        self._place_keys()

    def _place_keys(self) -> None:
        self._index = []
        for name, layer in zip(self._names, self._layers, strict=True):
            flat = self.keys.get(name, torch.empty(0, dtype=torch.long)).to(layer.lora_A.device)
            self.keys[name] = flat
            self._index.append(key_index(flat, layer))
        self._has_keys = any(k.flat.numel() for k in self._index)

    def _select(self, run: Any, index: int) -> None:
        """Freeze the backbone but its adapters (or, for a base-training first
        experience, train everything but them); the head trains unless ``train_head`` is false."""
        self._trains_adapters = not (self.config.train_base_first and index == 0)
        adapters = {id(p) for p in adapter_parameters(run.model.backbone)}
        backbone = {id(p) for p in run.model.backbone.parameters()}
        for p in run.model.parameters():
            if id(p) in backbone:
                trains = (id(p) in adapters) == self._trains_adapters
            else:
                trains = self.config.train_head or not self._trains_adapters
            p.requires_grad_(trains)
            if not trains:
                p.grad = None

    # --------------------------------------------------------------- hooks

    # tryfirst: the surgery comes before other plugins' setup, which may select
    # parameters by name (l2's pattern, ewc's anchors).
    @hookimpl(tryfirst=True)
    def setup(self, run: Any) -> None:
        # both setups go first (tryfirst): which one runs first depends on the plugins' order
        refuse_model_builders(run, "reglora", "adapts the linear layers of the model the run builds")
        if not self.config.train_head and run.stream.setting != "domain" and len(run.stream) > 1:
            raise ConfigError(
                "plugins.reglora.train_head=false leaves the classes of later experiences untrained: it is for "
                f"domain-incremental streams (scenario.setting=domain), got '{run.stream.setting}'"
            )
        self._build(run)

    @hookimpl
    def before_experience(self, run: Any, exp: Any) -> None:
        if run.model is not self._model:
            raise PluginError(
                f"plugin reglora adapted the model the run built, and another plugin replaced it by a "
                f"{type(run.model).__name__}: reglora cannot be combined with plugins that build their own model"
            )
        self._select(run, int(exp.index))

    @hookimpl
    def loss_terms(self, run: Any) -> dict[str, torch.Tensor] | None:
        if self.config.lam == 0 or not self._trains_adapters or not self._has_keys:
            return None
        return {"reglora": self.config.lam * key_penalty(self._layers, self._index)}

    # A wrapper, so that the merge comes before every other plugin's
    # after_experience (tryfirst ones included): they see the adapters merged
    # (the weights evaluated), never in flight.
    @hookimpl(wrapper=True)
    def after_experience(self, run: Any, exp: Any) -> Generator[None, Any, Any]:
        if self._trains_adapters:
            for name, layer in zip(self._names, self._layers, strict=True):
                self.keys[name] = torch.cat([self.keys[name], key_elements(layer.delta(), self.config.top)])
                layer.merge_()
            self._place_keys()
            self._trains_adapters = False
        return (yield)

    @hookimpl
    def teardown(self, run: Any) -> None:
        """Give the model's parameters back the trainability they had before the
        surgery (the adapters stay trainable), for whatever uses the model next."""
        for p, trainable in self._trainable:
            p.requires_grad_(trainable)
        if self._model is not None:
            for p in adapter_parameters(self._model):
                p.requires_grad_(True)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The accumulated key positions by layer name (the adapters and merged
        weights are in the model's state)."""
        return {"keys": dict(self.keys)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys = {str(k): v.long() for k, v in state["keys"].items()}
        if self._layers:
            self._place_keys()

    def restore(self, run: Any, state: dict[str, Any]) -> None:
        """On resume: redo the surgery, then load the key positions; inside an
        experience, freeze again what it freezes."""
        self.load_state_dict(state)
        self._build(run)
        if run.experience is not None:
            self._select(run, int(run.experience.index))
