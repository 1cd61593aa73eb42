"""Backbones from other libraries, by prefixed name: ``timm:<name>``,
``tv:<name>`` (torchvision) and ``clip:<arch>`` (open_clip image towers).

Each returns a module mapping images to pooled features, with its
classification layer removed and ``out_features`` set. With
``model.pretrained: true`` weights load through the library's own loader and
cache (Hugging Face hub cache for timm and open_clip, ``torch.hub`` for
torchvision); ``model.weights`` picks which. When they are neither cached nor
downloadable the error names the weights and where they were looked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from contlearn.errors import ConfigError, ContlearnError, one_line, optional_import


class WeightsError(ContlearnError):
    """Pretrained weights are neither cached nor downloadable."""

    exit_code = 1


def _hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a timm dependency
        return os.path.expanduser("~/.cache/huggingface/hub")


def _offline_hint(reachable: bool = True) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return " (HF_HUB_OFFLINE is set, so nothing was downloaded)"
    if not reachable:
        return " (the Hugging Face Hub cannot be reached from here, so nothing was downloaded)"
    return ""


def _why_not_downloaded(exc: BaseException, reachable: bool) -> str:
    """Why weights were not downloaded: offline, or the hub out of reach, when we
    know it (the hub client's own error then only repeats it at length), else the
    client's error (a missing repository, a refused token)."""
    known = _offline_hint(reachable)
    if known:
        return known
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f": {type(exc).__name__}: {first}" if first else f": {type(exc).__name__}"


@contextlib.contextmanager
def _hub_or_cache(probe_seconds: float = 3.0) -> Iterator[bool]:
    """Load through the Hugging Face Hub when it answers a short connection probe,
    and from its cache only otherwise: unreachable, the hub client retries for
    about a minute before it fails. Yields whether the hub was reachable.

    There is no probe (the hub is taken as reachable) when a proxy is configured,
    since a direct connection says nothing then. Offline mode is set in
    ``huggingface_hub.constants`` for the duration of the load: not for loads in
    other threads at the same time.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm and open_clip depend on it
        yield True
        return
    if constants.HF_HUB_OFFLINE or _url_answers(constants.ENDPOINT, probe_seconds):
        yield True
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = False


def _url_answers(url: str, seconds: float = 3.0) -> bool:
    """Whether the host of ``url`` answers a connection probe (taken as yes behind a proxy)."""
    if any(key in urllib.request.getproxies() for key in ("https", "http", "all")):
        return True
    where = urlparse(url)
    return _answers(where.hostname or "", where.port or (80 if where.scheme == "http" else 443), seconds)


def _answers(host: str, port: int, seconds: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``seconds``, name
    lookup included: ``create_connection``'s timeout does not bound the lookup,
    which a machine without a working DNS can spend half a minute on, so the
    probe runs in a daemon thread that is abandoned when it overruns."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, name="contlearn-hub-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(outcome) and outcome[0]


class _Features(nn.Module):
    """Wraps a feature extractor with ``out_features``."""

    def __init__(self, net: nn.Module, out_features: int, name: str):
        super().__init__()
        self.net, self.out_features, self.name = net, out_features, name

    def forward(self, x):
        return self.net(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_features={self.out_features}"


def check_input_shape(net: nn.Module, input_shape: Sequence[int], name: str) -> None:
    """Run ``net`` on one zero input of ``input_shape`` (evaluation mode, no
    gradient: nothing changes). :raises ConfigError: when it cannot take that
    shape (a ViT's fixed size, a CNN's smallest input)."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        raise ConfigError(
            f"backbone '{name}' cannot take inputs of shape {tuple(input_shape)}: {one_line(exc)}; resize "
            f"them with 'resize:N' in scenario.train_transform and eval_transform (224 for most pretrained models)"
        ) from None
    finally:
        net.train(was_training)


def _rgb(name: str, input_shape: Sequence[int]) -> None:
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise ConfigError(
            f"backbone '{name}' needs RGB image inputs [3, H, W], the data has shape {tuple(input_shape)}; "
            f"add 'rgb' (and maybe 'resize:224') to scenario.train_transform and eval_transform"
        )


@contextlib.contextmanager
def _no_log_records() -> Iterator[None]:
    """Silence logging meanwhile: a library that logs its failure before raising
    would print a second message beside ours."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def timm_backbone(arch: str, input_shape: Sequence[int], pretrained: bool, weights: str | None) -> nn.Module:
    """``timm.create_model(arch, num_classes=0)``: pooled features; ``weights``
    is a pretrained tag (``resnet50.a1_in1k`` is ``arch=resnet50, weights=a1_in1k``)."""
    timm = optional_import("timm", package="timm", extra="timm", needed_for=f"backbone 'timm:{arch}'")
    if len(input_shape) != 3:
        raise ConfigError(f"backbone 'timm:{arch}' needs image inputs [C, H, W], got {tuple(input_shape)}")
    base, _, tag = arch.partition(".")
    if not timm.is_model(base):
        raise ConfigError(f"unknown timm model '{arch}' (backbone 'timm:{arch}'); list them with timm.list_models()")
    if tag and weights:
        raise ConfigError(f"backbone 'timm:{arch}' names the tag '{tag}' and model.weights names '{weights}': give one")
    if tag and not pretrained:  # as model.weights without model.pretrained: a tag chooses pretrained weights
        raise ConfigError(
            f"the tag '{tag}' of backbone 'timm:{arch}' chooses pretrained weights: it needs model.pretrained=true "
            f"(or use timm:{base})"
        )
    name = f"{arch}.{weights}" if weights else arch
    if pretrained:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
        if not tags:  # before the hub probe and a download that cannot succeed
            raise ConfigError(f"timm model '{base}' has no pretrained weights (backbone 'timm:{arch}'); "
                              f"set model.pretrained=false")
        if "." in name and name.partition(".")[2] not in tags:
            raise ConfigError(
                f"'{name.partition('.')[2]}' is not a pretrained tag of timm model '{base}'; valid: "
                f"{', '.join(tags)}"
            )
    reachable = True
    try:
        with _hub_or_cache() if pretrained else contextlib.nullcontext(True) as reachable:
            net = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=int(input_shape[0]))
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise ConfigError(f"cannot build timm model '{name}': {exc}") from None
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except (AttributeError, RuntimeError):
            cfg = None
        hub = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or name
        raise WeightsError(
            f"pretrained weights for timm model '{name}' ({hub}) are not in the Hugging Face cache "
            f"'{_hf_cache()}' and could not be downloaded{_why_not_downloaded(exc, reachable)}; connect once to "
            f"fill the cache, or set model.pretrained=false (and model.weights=null)"
        ) from None
    return _Features(net, int(net.num_features), f"timm:{name}")


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(f"torchvision model {type(net).__name__} has no linear classifier to remove")
    return found[-1]


def torchvision_backbone(arch: str, input_shape: Sequence[int], pretrained: bool, weights: str | None) -> nn.Module:
    """``torchvision.models.get_model(arch)`` with its last linear layer (the
    classifier) replaced by the identity; ``weights`` is the weights enum's
    member name (default ``DEFAULT``)."""
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        if arch in torchvision.models.list_models(module=torchvision.models.quantization):
            raise ConfigError(f"'{arch}' is a quantized torchvision model (backbone 'tv:{arch}'); use its float "
                              f"version, tv:{arch.removeprefix('quantized_')}")
        known = arch in torchvision.models.list_models()
        what = "not a torchvision classification model" if known else "not a torchvision model"
        raise ConfigError(f"'{arch}' is {what} (backbone 'tv:{arch}'); list the classification "
                          f"models with torchvision.models.list_models(module=torchvision.models)")
    _rgb(f"tv:{arch}", input_shape)
    if not pretrained:
        # googlenet and inception_v3 warn unless told how to initialise: their current (truncated normal) way
        options = {"init_weights": True} if arch in ("googlenet", "inception_v3") else {}
        net = torchvision.models.get_model(arch, weights=None, **options)
    else:
        enum = torchvision.models.get_model_weights(arch)
        tag = weights or "DEFAULT"
        try:
            chosen = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise ConfigError(f"model.weights '{tag}' is not a weight of tv:{arch}; valid: "
                              f"{', '.join(dict.fromkeys(['DEFAULT', *enum.__members__]))}") from None
        file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(chosen.url))

        def missing(why: str) -> WeightsError:
            return WeightsError(
                f"pretrained weights {chosen} for tv:{arch} are not cached at '{file}' and could not be "
                f"downloaded from {chosen.url}: {why}; connect once to fill the cache (TORCH_HOME moves it), "
                f"or set model.pretrained=false (and model.weights=null)"
            )

        # torch.hub prints "Downloading: ..." before it tries: only try when the host answers
        if not os.path.exists(file) and not _url_answers(chosen.url):
            raise missing(f"{urlparse(chosen.url).hostname} cannot be reached from here")
        try:  # torchvision's builder: weights may set the architecture (googlenet's transform_input, SWAG sizes)
            net = torchvision.models.get_model(arch, weights=chosen, progress=False)
        except (OSError, RuntimeError) as exc:
            raise missing(f"{type(exc).__name__}: {exc}") from None
    if getattr(net, "aux_logits", False):  # googlenet, inception_v3: features only, not the auxiliary heads
        net.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(net, aux):
                setattr(net, aux, None)
    if arch.startswith("squeezenet"):  # a convolutional classifier: keep the pooled 512 feature channels
        net.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return _Features(net, 512, f"tv:{arch}")
    name, layer = _last_linear(net)
    out_features = layer.in_features
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return _Features(net, out_features, f"tv:{arch}")


def clip_backbone(arch: str, input_shape: Sequence[int], pretrained: bool, weights: str | None) -> nn.Module:
    """The image tower (``model.visual``) of open_clip's ``arch``; ``weights`` is
    a pretrained tag (default: the first open_clip lists for ``arch``).
    Needs the ``clip`` extra (``pip install contlearn[clip]``)."""
    open_clip = optional_import("open_clip", package="open_clip_torch", extra="clip", needed_for=f"backbone 'clip:{arch}'")
    if arch not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model '{arch}' (backbone 'clip:{arch}'); "
                          f"list them with open_clip.list_models()")
    _rgb(f"clip:{arch}", input_shape)
    tag = None
    if pretrained:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        tag = weights or (tags[0] if tags else None)
        if tag is None or tag not in tags:
            raise ConfigError(f"model.weights '{tag}' is not a pretrained tag of clip:{arch}; valid: {', '.join(tags) or '(none)'}")
    reachable = True
    try:
        with _hub_or_cache() if tag else contextlib.nullcontext(True) as reachable, _no_log_records():
            model = open_clip.create_model(arch, pretrained=tag)  # it logs a failed download, then raises
    except (OSError, RuntimeError) as exc:
        cfg: Any = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        hub = cfg.get("hf_hub") or cfg.get("url") or tag
        raise WeightsError(
            f"pretrained weights '{tag}' for clip:{arch} ({hub}) are not in the Hugging Face cache "
            f"'{_hf_cache()}' and could not be downloaded{_why_not_downloaded(exc, reachable)}; connect once to "
            f"fill the cache, or set model.pretrained=false (and model.weights=null)"
        ) from None
    visual = model.visual
    out_features = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[1])
    return _Features(visual, out_features, f"clip:{arch}" + (f"@{tag}" if tag else ""))


#: Backbone name prefixes: ``prefix:name`` -> factory(name, input_shape, pretrained, weights).
EXTERNAL = {"timm": timm_backbone, "tv": torchvision_backbone, "clip": clip_backbone}
