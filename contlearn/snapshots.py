"""Copies of a model for plugins that remember the past.

A strategy that distils from an earlier model (LwF, PRD, a plugin of your own)
keeps a :func:`frozen_copy`; one that anchors parameters (EWC, L2) keeps a
:func:`snapshot`. Plugins save what they learnt as tensors in plain containers
(``state_dict``), so a teacher is saved as :func:`module_tensors` and, after a
resume, rebuilt in ``setup`` as a :func:`frozen_copy` of the model given those
tensors back with :func:`load_tensors`. A model's head grows from one
experience to the next, so the loading takes each tensor's saved shape, and
:func:`overlap` cuts a grown parameter to the part an anchor was taken of.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

__all__ = ["frozen_copy", "load_tensors", "module_tensors", "overlap", "selected_parameters", "snapshot"]


def overlap(param: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor | None:
    """The part of ``param`` that existed when ``anchor`` was taken.

    A parameter that grew since (new rows of an incremental head) is cut to the
    anchor's shape along every dimension; ``None`` when it cannot hold the anchor
    (fewer dimensions, or smaller along one), i.e. it is not the same parameter.
    """
    if param.dim() != anchor.dim() or any(p < a for p, a in zip(param.shape, anchor.shape, strict=True)):
        return None
    if param.shape == anchor.shape:
        return param
    return param[tuple(slice(0, a) for a in anchor.shape)]


def selected_parameters(
    model: nn.Module, pattern: re.Pattern[str] | str | None = None
) -> Iterator[tuple[str, nn.Parameter]]:
    """Trainable parameters whose name ``pattern`` (a regular expression) finds
    (``re.search``); all when ``None``."""
    if isinstance(pattern, str):
        pattern = re.compile(pattern)
    for name, p in model.named_parameters():
        if p.requires_grad and (pattern is None or pattern.search(name)):
            yield name, p


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def snapshot(model: nn.Module, pattern: re.Pattern[str] | str | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the selected parameters, by name."""
    return {name: p.detach().clone() for name, p in selected_parameters(model, pattern)}


def frozen_copy(model: ModuleT) -> ModuleT:
    """A copy of ``model`` in eval mode with gradients off (a teacher)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set ``module``'s parameters and buffers by name, shapes included (a copy of a
    model whose head has grown since can be given back its older, smaller head)."""
    own: dict[str, torch.Tensor] = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    missing = sorted(set(tensors) - set(own))
    if missing:
        raise KeyError(f"no parameters or buffers named {missing}")
    with torch.no_grad():
        for name, value in tensors.items():
            target = own[name]
            value = value.to(target.device)
            if target.shape == value.shape:
                target.copy_(value)
            else:
                target.data = value.clone()


def drop_unsaved_entries(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Remove from ``module`` the trailing entries of its ModuleLists that
    hold tensors, none of them in ``tensors``: a copy of a model that has grown
    since ``tensors`` were saved (a block added by MEMO or by model surgery) rolled
    back to the saved model's structure, as for a teacher rebuilt on resume."""
    for prefix, child in list(module.named_modules()):
        if not isinstance(child, nn.ModuleList):
            continue
        base = f"{prefix}." if prefix else ""
        while len(child):
            index = len(child) - 1
            names = [f"{base}{index}.{n}" for n, _ in (*child[index].named_parameters(), *child[index].named_buffers())]
            if not names or any(n in tensors for n in names):
                break
            del child[index]


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name, detached (for ``state_dict``)."""
    out = {name: p.detach() for name, p in module.named_parameters()}
    out.update({name: b.detach() for name, b in module.named_buffers()})
    return out
