"""CLIP for contlearn: loading open_clip models, prompt ensembles, and a
:class:`~contlearn.models.ContinualModel` whose head is CLIP's text classifier.

- :func:`load_clip` builds an open_clip architecture by name, with weights
  from the local cache only (``open_clip.create_model_and_transforms`` on the
  cached file) or without weights; missing weights are one clear error naming
  the weights and every place they were looked for.
- ``contlearn-tiny-clip`` is a CLIP small enough to train on a CPU in seconds
  (CLIP's modified ResNet, one block per stage, width 8, 32x32 images; a
  transformer text tower of 2 layers, width 64), registered with open_clip's model-config registry
  (``open_clip.add_model_config``) so that it is built by name like any other.
- :class:`ClipClassifier` = :class:`ClipImageEncoder` (pixels -> normalised
  image feature ``v``) + :class:`ClipTextHead` (``scale * v . w_c``, with
  ``w_c`` the renormalised mean of the normalised embeddings of class ``c``'s
  prompts, as in Radford et al., "Learning Transferable Visual Models From
  Natural Language Supervision", ICML 2021). The head grows with ``adapt``.
- :func:`random_views` makes the augmented views of test-time methods, and
  :func:`train_contrastive` trains a CLIP on image-caption pairs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from contlearn.scenarios.stream import host_to_device
from torch import nn
from torch.nn import functional as F

from contlearn.errors import ConfigError, DataError, optional_import
from contlearn.models import ContinualModel

#: The 7 prompt templates of CLIP's ImageNet prompt ensemble (the subset chosen
#: in CLIP's prompt-engineering notebook, used by Tip-Adapter; DMN's reference
#: code uses them on ImageNet, with CuPL's generated prompts added by default).
CLIP_TEMPLATES: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

#: Templates for handwritten digits (``configs/digits-dmn.yaml``, the benchmark).
DIGIT_TEMPLATES: list[str] = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
]

DIGIT_NAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

#: Default class names of data sources, by ``Stream.name``, indexed by original label.
SOURCE_CLASS_NAMES: dict[str, list[str]] = {"digits": DIGIT_NAMES}

#: Tiny CLIP architectures, registered with open_clip by :func:`register_tiny_configs`.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "contlearn-tiny-clip": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip() -> ModuleType:
    return optional_import("open_clip", package="open_clip_torch", extra="clip", needed_for="a CLIP model")


def register_tiny_configs() -> None:
    """Register :data:`TINY_CONFIGS` with open_clip (idempotent), through its
    public ``add_model_config`` (which reads JSON files)."""
    open_clip = _open_clip()
    missing = [name for name in TINY_CONFIGS if name not in open_clip.list_models()]
    if not missing:
        return
    with tempfile.TemporaryDirectory(prefix="contlearn-clip-") as folder:
        for name in missing:
            (Path(folder) / f"{name}.json").write_text(json.dumps(TINY_CONFIGS[name]))
        open_clip.add_model_config(folder)


# ---------------------------------------------------------------------- loading


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip logs a warning when a model has no weights; here that was asked for."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@dataclass
class Preprocess:
    """How pixels reach the image tower: resized to ``image_size``, normalised."""

    image_size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD


def _cached_weight_files(name: str, tag: str, cache_dir: str | None) -> tuple[str | None, list[str], str]:
    """Where open_clip would cache the weights ``name``/``tag``: the first
    existing file (or ``None``), every place looked in, and what the weights are."""
    open_clip = _open_clip()
    cfg = open_clip.get_pretrained_cfg(name, tag)
    looked: list[str] = []
    what = f"open_clip '{name}' pretrained='{tag}'"
    if cfg.get("file"):
        looked.append(str(cfg["file"]))
        if os.path.isfile(cfg["file"]):
            return str(cfg["file"]), looked, what
    hub = cfg.get("hf_hub", "")
    if hub:
        what += f" (Hugging Face {hub})"
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        for fname in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
            looked.append(f"{cache_dir or HF_HUB_CACHE} [{repo}/{fname}]")
            if isinstance(found, str) and os.path.isfile(found):
                return found, looked, what
    url = cfg.get("url", "")
    if url:
        what += f" ({url})"
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        looked.append(path)
        if os.path.isfile(path):
            return path, looked, what
    return None, looked, what


def load_clip(
    name: str, pretrained: str | None = None, cache_dir: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Any, Preprocess]:
    """Build the open_clip model ``name`` (a ``CLIP`` or ``CustomTextCLIP``).

    :param name: an open_clip architecture (``open_clip.list_models()``), or one
        of :data:`TINY_CONFIGS`.
    :param pretrained: ``None`` for random weights; a tag such as ``openai`` or
        ``laion2b_s34b_b79k``, loaded from the local cache only; or a checkpoint file.
    :param cache_dir: where open_clip caches weights (default: Hugging Face's
        cache and ``~/.cache/clip``).
    :return: the model (eval mode) and how to preprocess its inputs.
    :raises ConfigError: for an unknown architecture or tag.
    :raises DataError: when the weights are not in the cache.
    """
    open_clip = _open_clip()
    register_tiny_configs()
    if name not in open_clip.list_models():
        raise ConfigError(
            f"unknown CLIP architecture '{name}'; use one of open_clip.list_models() "
            f"(e.g. 'ViT-B-16', 'ViT-B-32', 'RN50') or {', '.join(repr(n) for n in TINY_CONFIGS)}"
        )
    if pretrained is None:
        with _quiet_random_init_warning():
            model = open_clip.create_model(name, pretrained=None, device=device)
        cfg = open_clip.get_model_config(name)
        size = cfg["vision_cfg"].get("image_size", 224)
        return model.eval(), Preprocess(int(size if isinstance(size, int) else size[0]))
    if os.path.isfile(pretrained):
        path, tag_cfg = pretrained, {}
    else:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(
                f"'{pretrained}' is neither a checkpoint file nor a pretrained tag of CLIP '{name}'; "
                f"tags: {', '.join(tags) if tags else '(none)'}"
            )
        cached, looked, what = _cached_weight_files(name, pretrained, cache_dir)
        if cached is None:
            raise DataError(
                f"the weights {what} are not in the local cache; looked in: {'; '.join(looked)}. "
                f"Download them once where there is a network (python -c \"import open_clip; "
                f"open_clip.create_model_and_transforms('{name}', pretrained='{pretrained}')\"), "
                f"point plugins.dmn.cache_dir at the cache, or set pretrained to the checkpoint file"
            )
        path = cached
    kwargs: dict[str, Any] = {}
    if tag_cfg.get("mean"):
        kwargs.update(image_mean=tuple(tag_cfg["mean"]), image_std=tuple(tag_cfg["std"]))
    model, _, _ = open_clip.create_model_and_transforms(
        name,
        pretrained=path,
        cache_dir=cache_dir,
        device=device,
        force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        **kwargs,
    )
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", 224)
    return model.eval(), Preprocess(
        int(size if isinstance(size, int) else size[0]), tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD))
    )


# ------------------------------------------------------------------------ model


class ClipImageEncoder(nn.Module):
    """CLIP's image tower on contlearn inputs: ``[N, C, H, W]`` in ``[0, 1]``
    (one channel is replicated to three), resized to the tower's size,
    normalised; returns L2-normalised features ``v``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, visual: nn.Module, preprocess: Preprocess, out_features: int):
        super().__init__()
        self.visual = visual
        self.image_size = preprocess.image_size
        self.out_features = out_features
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, -1, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Three channels at the tower's resolution, still in ``[0, 1]``."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"CLIP needs images [N, 1 or 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def encode_prepared(self, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Features of images already :meth:`prepare`-d, ``chunk`` images at a time."""
        outs = [
            F.normalize(self.visual((part - self.mean) / self.std), dim=-1) for part in torch.split(x, chunk)
        ]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_prepared(self.prepare(x))


def check_templates(templates: Sequence[str], key: str = "", default: str = "") -> None:
    """:raises ConfigError: no templates, or one without exactly one ``{}`` for the
    class name (``key``: the config field that gave them, ``default``: what leaving
    it unset gives, both for the message)."""
    if not templates or any(str(t).count("{}") != 1 for t in templates):
        where, unset = f"{key}: " if key else "", f" ({default})" if default else ""
        raise ConfigError(f"{where}every prompt template needs exactly one '{{}}' for the class name{unset}, "
                          f"got {list(templates)}")


class ClipTextHead(nn.Module):
    """The zero-shot classifier: ``scale * v . w_c`` where ``w_c`` is the
    renormalised mean of the normalised text embeddings of class ``c``'s prompts
    and ``scale`` is ``logit_scale``, or by default CLIP's own learnt
    temperature (``exp(logit_scale)`` clamped at 100: 100 for OpenAI's CLIPs).

    :param text_model: an open_clip model whose ``encode_text`` is used (its
        image tower may be removed).
    :param tokenizer: open_clip's tokenizer for it.
    :param class_names: the name of every model-side class of the stream.
    :param templates: prompt templates with one ``{}`` for the class name.

    The classifier is recomputed at every call in training mode with gradients
    on (so training reaches the text tower) and cached otherwise.
    """

    tokens: torch.Tensor
    text_model: Any  # an open_clip model: encode_text

    def __init__(
        self,
        text_model: nn.Module,
        tokenizer: Any,
        class_names: Sequence[str],
        templates: Sequence[str],
        logit_scale: float | None = None,
    ):
        super().__init__()
        check_templates(templates)
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        self.register_buffer("tokens", torch.zeros(0, len(self.templates), 1, dtype=torch.long), persistent=False)
        self._cache: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.tokens.shape[0]

    def grow(self, n_classes: int) -> bool:
        """Add the prompts of classes ``out_features .. n_classes - 1``."""
        old = self.out_features
        if n_classes <= old:
            return False
        if n_classes > len(self.class_names):
            raise ConfigError(f"the text head knows {len(self.class_names)} class names but class {n_classes - 1} arrived")
        prompts = [t.format(name) for name in self.class_names[old:n_classes] for t in self.templates]
        new = self.tokenizer(prompts).view(n_classes - old, len(self.templates), -1).to(self.tokens.device)
        self.tokens = new if old == 0 else torch.cat([self.tokens, new])
        self._cache = None
        return True

    def adapt(self, classes: Sequence[int], task: int = 0) -> None:
        self.grow(max(classes) + 1)

    def compute_classifier(self) -> torch.Tensor:
        """``[C, D]``: per class, the renormalised mean of its normalised prompt embeddings."""
        C, T, L = self.tokens.shape
        emb = F.normalize(self.text_model.encode_text(self.tokens.view(C * T, L)), dim=-1)
        return F.normalize(emb.view(C, T, -1).mean(dim=1), dim=-1)

    def classifier(self) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return self.compute_classifier()
        if self._cache is None or self._cache.shape[0] != self.out_features:
            with torch.no_grad():
                self._cache = self.compute_classifier()
        return self._cache

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True) -> ClipTextHead:
        self._cache = None
        return super().train(mode)

    def scale(self) -> torch.Tensor | float:
        """The fixed ``logit_scale``, or (``None``) CLIP's learnt one, clamped at 100."""
        if self.logit_scale is not None:
            return self.logit_scale
        learnt = getattr(self.text_model, "logit_scale", None)
        return learnt.exp().clamp(max=100.0) if learnt is not None else 100.0

    def forward(self, features: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale() * features @ self.classifier().t()


class ClipClassifier(ContinualModel):
    """A CLIP as a :class:`~contlearn.models.ContinualModel`: ``backbone`` is the
    image tower (:class:`ClipImageEncoder`), ``head`` the text classifier
    (:class:`ClipTextHead`, which holds the text tower); ``forward(x)`` returns
    ``Output(logits, v)`` and ``adapt`` adds the new classes' prompts."""

    backbone: ClipImageEncoder
    head: ClipTextHead

    @classmethod
    def build(
        cls,
        name: str,
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        pretrained: str | None = None,
        cache_dir: str | None = None,
        logit_scale: float | None = None,
        device: str | torch.device = "cpu",
    ) -> ClipClassifier:
        """Load the open_clip model ``name`` (see :func:`load_clip`) and split it
        into image encoder and text head."""
        open_clip = _open_clip()
        model, pre = load_clip(name, pretrained, cache_dir, device)
        visual = model.visual
        model.visual = None  # the text head keeps the rest; encode_text does not use it
        with torch.no_grad():
            dim = int(visual(torch.zeros(1, 3, pre.image_size, pre.image_size, device=device)).shape[-1])
        backbone = ClipImageEncoder(visual, pre, dim)
        head = ClipTextHead(
            model, open_clip.get_tokenizer(name), class_names, CLIP_TEMPLATES if templates is None else templates, logit_scale
        )
        return cls(backbone, head).to(device)

    def set_trainable(self, train: bool) -> ClipClassifier:
        """Train both towers (``True``) or freeze the model. The token-embedding
        table (49408 rows for CLIP's tokenizer) always stays frozen: it is most
        of a small CLIP's parameters and would dominate every optimizer step."""
        self.requires_grad_(train)
        for module in self.head.text_model.modules():
            if isinstance(module, nn.Embedding):
                module.requires_grad_(False)
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.head.clear_cache()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def class_names_for(stream_name: str, stream_class_names: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """The text name of every model-side class of a stream.

    :param names: names of the data set's labels in label order (label ``k`` is
        ``names[k]``), or ``None`` for the source's defaults
        (:data:`SOURCE_CLASS_NAMES`) or else the stream's own class names.
    """
    table = list(names) if names is not None else SOURCE_CLASS_NAMES.get(stream_name)
    if table is None:
        return list(stream_class_names)
    out = []
    for original in stream_class_names:
        if not str(original).lstrip("-").isdigit() or not 0 <= int(original) < len(table):
            raise ConfigError(
                f"class names are looked up by label, but the stream has label {original!r} "
                f"and {len(table)} names were given"
            )
        out.append(table[int(original)])
    return out


# ------------------------------------------------------------------------ views


def random_views(
    x: torch.Tensor,
    n_views: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """``[B, n_views, C, H, W]``: view 0 is ``x`` itself, the others
    :func:`random_crops` of it."""
    if n_views == 1:
        return x.unsqueeze(1)
    return torch.cat([x.unsqueeze(1), random_crops(x, n_views - 1, generator, scale, ratio, flip)], dim=1)


def random_crops(
    x: torch.Tensor,
    n_crops: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """``[B, n_crops, C, H, W]`` random resized crops of ``x`` (area fraction in
    ``scale``, aspect ratio in ``ratio``, at the input's size) with random
    horizontal flips. Crop parameters are drawn from ``generator`` (on the
    CPU), per image and crop."""
    B, C, H, W = x.shape
    n = B * n_crops
    u = torch.rand(5, n, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - w) * (2 * u[2] - 1)
    cy = (1 - h) * (2 * u[3] - 1)
    sign = torch.where(u[4] < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = host_to_device(theta, x.device).to(x.dtype)
    src = x.unsqueeze(1).expand(B, n_crops, C, H, W).reshape(n, C, H, W)
    grid = F.affine_grid(theta, [n, C, H, W], align_corners=False)
    crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return crops.view(B, n_crops, C, H, W)


# --------------------------------------------------------------------- training


def train_contrastive(
    model: ClipClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.1,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train both towers of ``model`` on image-caption pairs, CLIP's symmetric
    contrastive loss with its learnable temperature (Radford et al., 2021).

    Each image ``x[i]`` is paired with a caption of its class ``y[i]`` (a
    model-side class of ``model.head``) written with a template drawn at random.
    Pairs of the same class in a batch are positives of each other (the
    targets are spread over them), so repeated captions are not false
    negatives. AdamW with a cosine schedule; the token embeddings stay frozen
    (:meth:`ClipClassifier.set_trainable`). Returns the mean loss per epoch.
    """
    head, enc = model.head, model.backbone
    clip = head.text_model
    n_classes = int(y.max()) + 1
    head.grow(n_classes)
    tokens = head.tokens[:n_classes]  # [C, T, L]
    model.set_trainable(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    scale_param = getattr(clip, "logit_scale", None)
    model.train()
    losses = []
    for _ in range(epochs):
        order = host_to_device(torch.randperm(len(y), generator=generator), y.device)
        total, count = 0.0, 0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            t = host_to_device(torch.randint(tokens.shape[1], (len(idx),), generator=generator), y.device)
            img = enc(xb)
            txt = F.normalize(clip.encode_text(tokens[yb, t]), dim=-1)
            scale = scale_param.exp().clamp(max=100) if scale_param is not None else torch.tensor(100.0)
            logits = scale * img @ txt.t()
            same = (yb[:, None] == yb[None, :]).float()
            target = same / same.sum(dim=1, keepdim=True)
            loss = 0.5 * (
                torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
                + torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / count)
    model.eval()
    return losses
