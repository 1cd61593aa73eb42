"""CLR: channel-wise lightweight reprogramming of a frozen backbone, one parameter bank per task.

Ge et al., "CLR: Channel-wise Lightweight Reprogramming for Continual Learning"
(ICCV 2023). A frozen *anchor* backbone is shared by every task. After each
convolution (``variant: reduced``, the reference default: every convolution
whose kernel is not 1x1) a depthwise ``k x k`` convolution without bias
(groups = channels), initialised to the identity (Dirac), is inserted before
the convolution's BatchNorm. Per task only these reprogramming kernels, every
BatchNorm (affine parameters and running statistics) and the task's own linear
head are trained, with the loss

    L = CE + lam * sum_p ||p||_2          (lam = 1e-5, the reference's ``reg="l2"``)

over those parameters. Before each task the kernels go back to the identity and
the BatchNorms to the anchor's values; after it, its kernels and BatchNorm
tensors go into a bank. At test time the task label picks the bank (a batch
that mixes tasks is split by task), so learning a task never changes what an
earlier task predicts: backward transfer is exactly zero.

The anchor is ``pretrained`` (the backbone as built, e.g. ``tv:resnet18`` with
``model.pretrained=true``), ``checkpoint`` (a backbone state dict read from
``anchor_path``) or ``first_experience``: experience 0 trains the whole
backbone (kernels held at the identity), which is then frozen as the anchor.
Per-task heads are the model's :class:`~contlearn.models.MultiHead`
(``model.head=multi``), so the plugin needs a task-incremental stream
(``scenario.setting=task``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from contlearn._manager import DEFAULTS_NAME
from contlearn.checkpoint import load_failure
from contlearn.defaults import build_optimizer
from contlearn.errors import ConfigError, choices
from contlearn.hookspecs import hookimpl
from contlearn.models import MultiHead

ANCHORS = ("first_experience", "pretrained", "checkpoint")
VARIANTS = ("reduced", "full", "scale")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ReprogrammedConv(nn.Module):
    """A (frozen) convolution followed by its channel-wise reprogramming: a
    depthwise ``kernel_size`` convolution without bias, initialised to the
    identity (the reference's ``ReGhos_Block``)."""

    def __init__(self, conv: nn.Conv2d, kernel_size: int = 3):
        super().__init__()
        self.conv = conv
        channels = conv.out_channels
        self.reprogram = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        self.reset()

    def reset(self) -> None:
        """Back to the identity."""
        with torch.no_grad():
            nn.init.dirac_(self.reprogram.weight, groups=self.reprogram.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reprogram(self.conv(x))


def _kernel_size(conv: nn.Conv2d, variant: str) -> int | None:
    """Size of the reprogramming kernel after ``conv`` (``None``: none)."""
    pointwise = tuple(conv.kernel_size) == (1, 1)
    if variant == "reduced":
        return None if pointwise else 3
    if variant == "full":
        return 3
    return 1 if pointwise else 3  # scale


def insert_reprogramming(module: nn.Module, variant: str = "reduced") -> list[str]:
    """Wrap every convolution of ``module`` that ``variant`` selects in a
    :class:`ReprogrammedConv`, in place (the reference's ``add_ghostnet``);
    returns the names of all wrappers. Wrapped convolutions stay as they are,
    so a second call changes nothing."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown plugins.clr.variant '{variant}'; valid: {choices(VARIANTS)}")
    names: list[str] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent.named_children():
            name = f"{prefix}{attr}"
            if isinstance(child, ReprogrammedConv):
                names.append(name)
            elif isinstance(child, nn.Conv2d):
                size = _kernel_size(child, variant)
                if size is not None:
                    setattr(parent, attr, ReprogrammedConv(child, size))
                    names.append(name)
            else:
                walk(child, f"{name}.")

    walk(module, "")
    return names


def reprogramming_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The reprogramming kernels of ``module``, by name."""
    return {f"{n}.reprogram.weight": m.reprogram.weight for n, m in module.named_modules()
            if isinstance(m, ReprogrammedConv)}


def batchnorm_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every BatchNorm's affine parameters and running statistics, by name."""
    out: dict[str, torch.Tensor] = {}
    for n, m in module.named_modules():
        if isinstance(m, _BatchNorm):
            for t in BN_TENSORS:
                value = getattr(m, t, None)
                if value is not None:
                    out[f"{n}.{t}" if n else t] = value
    return out


def parameter_overhead(module: nn.Module) -> dict[str, int]:
    """Parameters a task adds to a reprogrammed ``module``: ``reprogramming``
    (kernels), ``batchnorm`` (affine), and ``backbone`` (all, kernels included)."""
    bn = sum(p.numel() for m in module.modules() if isinstance(m, _BatchNorm) for p in m.parameters())
    return {
        "reprogramming": sum(p.numel() for p in reprogramming_parameters(module).values()),
        "batchnorm": bn,
        "backbone": sum(p.numel() for p in module.parameters()),
    }


def _read_anchor(path: str) -> dict[str, torch.Tensor]:
    """A backbone state dict from ``path``: a plain one, a whole model's (keys
    ``backbone.*``) or a contlearn checkpoint's (under ``model``)."""
    if not Path(path).is_file():
        raise ConfigError(f"plugins.clr.anchor_path '{path}' is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"plugins.clr.anchor_path '{path}' cannot be read as a torch state dict ({load_failure(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"plugins.clr.anchor_path '{path}' holds a {type(state).__name__}, not a state dict")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if any(".reprogram." in k for k in state):
        raise ConfigError(
            f"plugins.clr.anchor_path '{path}' is a model CLR reprogrammed (one per-task bank of it); "
            "give the backbone the run started from, or a run trained without clr"
        )
    return state


class CLR:
    """CLR: channel-wise lightweight reprogramming (Ge et al., ICCV 2023), task-incremental.

    See the module docstring and docs/plugins/clr.md.
    """

    #: the parameters of the earlier tasks are CLR's own banks, out of the model
    #: that an unlearning plugin (ssd) dampens: it refuses to forget beside CLR
    cannot_unlearn = "the earlier tasks' reprogramming parameters and heads are CLR's own banks, out of the model"

    #: predict uses what after_experience makes (the bank of the task just trained):
    #: ssd's forget events, which come first there, refuse to run beside it
    predicts_from_after_experience = True

    smoke_overrides = ["scenario.setting=task", "model.head=multi", "model.backbone=cnn-bn", "model.hidden=[32,64]"]

    @dataclass
    class Config:
        anchor: str = "first_experience"  # first_experience | pretrained | checkpoint
        anchor_path: Optional[str] = None  # backbone state dict, for anchor: checkpoint
        variant: str = "reduced"  # reduced | full | scale
        lam: float = 1e-5  # weight of the sum of L2 norms of the trained parameters

    def __init__(self, config: CLR.Config | None = None):
        self.config = config or self.Config()
        c = self.config
        if c.anchor not in ANCHORS:
            raise ConfigError(f"unknown plugins.clr.anchor '{c.anchor}'; valid: {choices(ANCHORS)}")
        if c.variant not in VARIANTS:
            raise ConfigError(f"unknown plugins.clr.variant '{c.variant}'; valid: {choices(VARIANTS)}")
        if c.anchor == "checkpoint" and not c.anchor_path:
            raise ConfigError("plugins.clr.anchor=checkpoint needs plugins.clr.anchor_path (a backbone state dict)")
        if c.anchor != "checkpoint" and c.anchor_path:
            raise ConfigError(
                f"plugins.clr.anchor_path is read only with plugins.clr.anchor=checkpoint (anchor is '{c.anchor}')"
            )
        if not (math.isfinite(c.lam) and c.lam >= 0):
            raise ConfigError(f"plugins.clr.lam must be finite and >= 0, got {c.lam}")
        #: anchor BatchNorm tensors by name (None until the anchor is fixed)
        self.anchor_bn: dict[str, torch.Tensor] | None = None
        #: per task: kernels and BatchNorm tensors by backbone-relative name
        self.banks: dict[int, dict[str, torch.Tensor]] = {}
        self._built = False
        self._trained: list[torch.Tensor] = []

    # ------------------------------------------------------------- surgery

    def _check(self, run) -> None:
        if not isinstance(run.model.head, MultiHead):
            raise ConfigError("plugin clr trains one head per task: use model.head=multi (and scenario.setting=task)")
        if run.stream.setting != "task" and len(run.stream) > 1:
            raise ConfigError(
                f"plugin clr routes by task label and needs scenario.setting=task (got '{run.stream.setting}')"
            )
        if self.config.anchor == "pretrained" and not bool(getattr(run.config.model, "pretrained", False)):
            raise ConfigError("plugins.clr.anchor=pretrained needs model.pretrained=true (a timm:/tv: backbone)")
        pm = getattr(run, "pm", None)  # (a run inside Avalanche has none)
        mixers = sorted(
            {
                impl.plugin_name
                for hook in ("train_data", "extra_samples")
                for impl in (getattr(pm.hook, hook).get_hookimpls() if pm is not None else ())
                if impl.plugin_name != DEFAULTS_NAME
            }
        )
        if mixers:
            raise ConfigError(
                f"plugin clr trains each task's reprogramming on that task's samples only, but {mixers} "
                "implement train_data / extra_samples, the hooks that add other experiences' samples to the "
                "training batches (rehearsal, joint training); CLR needs no rehearsal: drop them"
            )

    def _build(self, run, fresh: bool) -> None:
        """Insert the reprogramming layers (loading the anchor first when
        ``fresh`` and ``anchor: checkpoint``); fix the anchor unless it is the
        first experience's."""
        if self._built:
            return
        self._check(run)
        backbone = run.model.backbone
        if fresh and self.config.anchor == "checkpoint":
            state = _read_anchor(str(self.config.anchor_path))
            own = backbone.state_dict()
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
            if missing or unexpected or wrong:
                raise ConfigError(
                    f"plugins.clr.anchor_path '{self.config.anchor_path}' does not fit backbone "
                    f"'{run.config.model.backbone}': missing {missing[:3]}, unexpected {unexpected[:3]}, "
                    f"other shapes {wrong[:3]}"
                )
            backbone.load_state_dict(state)
        names = insert_reprogramming(backbone, self.config.variant)
        if not names:
            raise ConfigError(
                f"plugin clr found no convolution to reprogram in backbone '{run.config.model.backbone}' "
                f"(variant '{self.config.variant}'); use a convolutional backbone, e.g. model.backbone=cnn-bn"
            )
        self._built = True
        if fresh and self.config.anchor != "first_experience":
            self._fix_anchor(run)

    def _fix_anchor(self, run) -> None:
        self.anchor_bn = {k: v.detach().clone() for k, v in batchnorm_tensors(run.model.backbone).items()}

    def _reset_to_anchor(self, run, task: int) -> None:
        """Kernels to the identity and BatchNorm to the anchor, or to the task's
        bank if the task was trained before."""
        backbone = run.model.backbone
        bank = self.banks.get(task)
        with torch.no_grad():
            for m in backbone.modules():
                if isinstance(m, ReprogrammedConv):
                    m.reset()
            source = bank if bank is not None else self.anchor_bn or {}
            own = {**batchnorm_tensors(backbone), **reprogramming_parameters(backbone)}
            for name, value in source.items():
                own[name].copy_(value)

    # --------------------------------------------------------------- hooks

    # tryfirst: the reprogramming surgery comes before other plugins' setup, which
    # may select (l2's pattern) or anchor (l2, ewc) the model's parameters by name.
    @hookimpl(tryfirst=True)
    def setup(self, run) -> None:
        self._build(run, fresh=True)
        self._to_device(run.device)

    @hookimpl
    def before_experience(self, run, exp) -> None:
        if self.anchor_bn is not None:
            self._reset_to_anchor(run, int(exp.task))

    def _select(self, run, task: int) -> list[nn.Parameter]:
        """Set ``requires_grad`` on what this experience trains and return it."""
        model = run.model
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # no stale gradient from an earlier experience
        head = model.head.heads[str(task)]
        if self.anchor_bn is None:  # first experience as the anchor: all but the kernels
            kernels = {id(p) for p in reprogramming_parameters(model.backbone).values()}
            trained = [p for p in model.backbone.parameters() if id(p) not in kernels]
        else:
            trained = list(reprogramming_parameters(model.backbone).values())
            trained += [p for m in model.backbone.modules() if isinstance(m, _BatchNorm) for p in m.parameters()]
        trained += list(head.parameters())
        for p in trained:
            p.requires_grad_(True)
        return trained

    def _regularised(self, run, task: int) -> list[torch.Tensor]:
        backbone = run.model.backbone
        params = list(reprogramming_parameters(backbone).values())
        params += [p for m in backbone.modules() if isinstance(m, _BatchNorm) for p in m.parameters()]
        return params + list(run.model.head.heads[str(task)].parameters())

    @hookimpl
    def configure_optimizer(self, run, exp) -> torch.optim.Optimizer:
        task = int(exp.task)
        trained = self._select(run, task)
        self._trained = self._regularised(run, task)
        return build_optimizer(trained, run.config.train)

    @hookimpl
    def loss_terms(self, run, batch, out) -> dict[str, torch.Tensor] | None:
        if self.config.lam == 0 or not self._trained:
            return None
        # the reference's reg="l2": sum over tensors of their (unsquared) L2 norms
        norms = torch._foreach_norm([p for p in self._trained])
        return {"clr_l2": self.config.lam * torch.stack(norms).sum()}

    @hookimpl
    def after_experience(self, run, exp) -> None:
        if self.anchor_bn is None:
            self._fix_anchor(run)
        backbone = run.model.backbone
        tensors = {**reprogramming_parameters(backbone), **batchnorm_tensors(backbone)}
        self.banks[int(exp.task)] = {k: v.detach().clone() for k, v in tensors.items()}
        self._trained = []

    def _bank(self, task: int) -> dict[str, torch.Tensor] | None:
        """The tensors to run the backbone with for ``task``: its bank, else the
        anchor (identity kernels), else ``None`` (the backbone as it is)."""
        if task in self.banks:
            return self.banks[task]
        return self.anchor_bn

    def features(self, run, x: torch.Tensor, task: int) -> torch.Tensor:
        """Backbone features of ``x`` with ``task``'s bank swapped in, in eval
        mode (BatchNorm uses the bank's statistics and neither the bank nor the
        live model changes). A task without a bank runs on the anchor (identity
        kernels); before the anchor exists, on the live backbone."""
        backbone = run.model.backbone
        bank = self._bank(task)
        was_training = backbone.training
        backbone.eval()
        try:
            if bank is None:
                return backbone(x)
            if task not in self.banks:  # the anchor: identity kernels
                bank = {**bank, **{k: _identity_like(v) for k, v in reprogramming_parameters(backbone).items()}}
            return functional_call(backbone, bank, (x,), strict=False)
        finally:
            backbone.train(was_training)

    @hookimpl
    def predict(self, run, batch) -> torch.Tensor:
        tasks = batch.t.unique().tolist()
        head = run.model.head
        if len(tasks) == 1:
            return head(self.features(run, batch.x, int(tasks[0])), batch.t).argmax(dim=1)
        out = torch.empty_like(batch.y)
        for t in tasks:
            idx = (batch.t == t).nonzero().squeeze(1)
            out[idx] = head(self.features(run, batch.x[idx], int(t)), batch.t[idx]).argmax(dim=1)
        return out

    # ---------------------------------------------------------------- state

    def _to_device(self, device: torch.device) -> None:
        if self.anchor_bn is not None:
            self.anchor_bn = {k: v.to(device) for k, v in self.anchor_bn.items()}
        self.banks = {t: {k: v.to(device) for k, v in b.items()} for t, b in self.banks.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"anchor_bn": self.anchor_bn, "banks": {int(t): dict(b) for t, b in self.banks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchor = state.get("anchor_bn")
        self.anchor_bn = dict(anchor) if anchor is not None else None
        self.banks = {int(t): dict(b) for t, b in state.get("banks", {}).items()}

    def restore(self, run, state: dict[str, Any]) -> None:
        """On resume: redo the surgery (no anchor file is read: the model's
        weights follow from the checkpoint), then load the banks; inside an
        experience, ``configure_optimizer`` sets what trains again."""
        self.load_state_dict(state)
        self._build(run, fresh=False)
        self._to_device(run.device)


def _identity_like(weight: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(weight)
    nn.init.dirac_(out, groups=weight.shape[0])
    return out
