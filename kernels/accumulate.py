"""Squared-gradient accumulation, ``importances[k] += scale * grads[k]**2``, over many tensors.

This is the inner update of the diagonal Fisher information (Kirkpatrick et al.,
2017, EWC) as SSD (Foster et al., AAAI 2024) and EWC estimate it. The Triton kernel
handles the whole list of tensors in one launch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

from . import _dispatch
from ._dispatch import Backend

__all__ = ["accumulate_", "accumulate_reference_"]

tl: Any = None  # triton.language once a kernel is built (see _dispatch.TritonKernel)

Tensors = _dispatch.Tensors


def _as_lists(importances: Tensors, grads: Tensors) -> tuple[list[Any] | None, list[Any], list[Any]]:
    """``importances`` and ``grads`` as parallel lists, with ``importances``'s keys
    (None for sequences). Checks the containers only, not the tensors in them."""
    keys, (imps, gs) = _dispatch.parallel_lists("accumulate_", {"importances": importances, "grads": grads})
    return keys, imps, gs


def _check_scale(scale: float) -> None:
    try:
        finite = math.isfinite(scale)
    except TypeError:
        raise TypeError(f"accumulate_: scale must be a real number, got {scale!r}") from None
    if not finite:
        raise ValueError(f"accumulate_: scale must be finite, got {scale}")


_SHAPE = operator.attrgetter("shape")
_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")
_FLOATING = torch.Tensor.is_floating_point


def _check_lists(keys: list[Any] | None, importances: list[Any], grads: list[Any]) -> None:
    """Raise, naming the first bad pair, unless every pair is two same-shaped
    floating-point tensors on one device and no importance is passed twice."""
    try:  # C-level maps over the lists: a few microseconds for hundreds of tensors
        ptrs = list(map(torch.Tensor.data_ptr, importances))
        if (
            len(importances) == len(grads)
            and all(map(_FLOATING, importances))
            and all(map(_FLOATING, grads))
            and list(map(_SHAPE, importances)) == list(map(_SHAPE, grads))
            and list(map(_DEVICE, importances)) == list(map(_DEVICE, grads))
            and len(set(ptrs)) == len(ptrs)
            and all(map(torch.Tensor.is_contiguous, importances))
        ):
            return
    except TypeError:  # something other than a tensor
        pass
    _explain(keys, importances, grads)


def _explain(keys: list[Any] | None, importances: list[Any], grads: list[Any]) -> None:
    def at(k: int) -> str:
        return f"[{k}]" if keys is None else f"[{keys[k]!r}]"

    for k, (imp, g) in enumerate(zip(importances, grads, strict=True)):
        for label, t in (("importances", imp), ("grads", g)):
            _dispatch.check_floating("accumulate_", f"{label}{at(k)}", t, "no importance was changed")
        if imp.shape != g.shape or imp.device != g.device:
            raise ValueError(
                f"accumulate_: importances{at(k)} is {tuple(imp.shape)} on {imp.device} "
                f"but grads{at(k)} is {tuple(g.shape)} on {g.device}"
            )
    names = [f"importances{at(k)}" for k in range(len(importances))]
    _dispatch.refuse_repeats("accumulate_", names, importances)
    _dispatch.refuse_overlaps("accumulate_", names, importances, "no importance was changed")


@torch.no_grad()
def accumulate_reference_(importances: Tensors, grads: Tensors, scale: float = 1.0) -> None:
    """``importances[k] += scale * grads[k]**2`` tensor by tensor, computed in fp32.

    Takes parallel lists or mappings, like :func:`accumulate_`, and checks them all
    before changing any importance."""
    _check_scale(scale)
    keys, imps, gs = _as_lists(importances, grads)
    _check_lists(keys, imps, gs)
    _accumulate_lists(imps, gs, scale)


def _accumulate_lists(importances: list[torch.Tensor], grads: list[torch.Tensor], scale: float) -> None:
    if set(map(_DTYPE, importances)) == {torch.float32}:  # one call: a third of a loop's time on the CPU
        torch._foreach_addcmul_(importances, grads, grads, value=scale)
        return
    for imp, g in zip(importances, grads, strict=True):
        if imp.dtype == torch.float32:
            imp.addcmul_(g, g, value=scale)
        else:
            imp.copy_(imp.float().addcmul_(g, g, value=scale))


@_dispatch.triton_kernel
def _accumulate_kernel(
    imp_addrs,
    grad_addrs,
    numels,
    block_first,
    block_tensor,
    scale,
    IMP: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.load(block_tensor + pid)
    start = (pid - tl.load(block_first + k)) * BLOCK
    n = tl.load(numels + k)
    imp_ptr = tl.load(imp_addrs + k).to(tl.pointer_type(IMP))
    grad_ptr = tl.load(grad_addrs + k).to(tl.pointer_type(GRAD))
    if ALIGNED:
        imp_ptr = tl.multiple_of(imp_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
    offs = start + tl.arange(0, BLOCK)
    imp_ptr += offs
    grad_ptr += offs
    # Full blocks go unmasked: a mask against a length read from memory keeps the
    # compiler from vectorising the accesses.
    if start + BLOCK <= n:
        g = tl.load(grad_ptr).to(tl.float32)
        tl.store(imp_ptr, (tl.load(imp_ptr).to(tl.float32) + (g * g) * scale).to(IMP))
    else:
        mask = offs < n
        g = tl.load(grad_ptr, mask=mask, other=0.0).to(tl.float32)
        imp = tl.load(imp_ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(imp_ptr, (imp + (g * g) * scale).to(IMP), mask=mask)


@torch.no_grad()
def accumulate_(
    importances: Tensors,
    grads: Tensors,
    scale: float = 1.0,
    *,
    backend: Backend = "auto",
) -> None:
    """``importances[k] += scale * grads[k]**2`` for every k, in place, fp32 arithmetic.

    ``importances`` and ``grads`` are parallel sequences of same-shaped floating-point
    tensors, or mappings keyed by name (``importances``'s keys; ``grads`` must hold
    each of them, and may hold more). ``scale`` must be finite. Bad arguments raise
    before any importance changes.

    The Triton path is one launch per (importance dtype, grad dtype) pair, normally
    one: a table of tensor addresses and a block->tensor map let every program find
    its tensor, so the list is processed like one flat buffer. The checks and the
    table are kept (without the tensors) for the next call on tensors of the same
    addresses, shapes and dtypes (contiguous): an accumulation per batch pays them once.
    """
    _check_scale(scale)
    keys, imps, gs = _as_lists(importances, grads)
    first = imps[0] if imps else None
    if first is not None and not isinstance(first, torch.Tensor):
        _check_lists(keys, imps, gs)  # raises, naming it
    if _dispatch.surely_reference(backend, first):
        _check_lists(keys, imps, gs)
        _accumulate_lists(imps, gs, scale)
        return
    tensors = [*imps, *gs]
    try:
        signature = _dispatch.signature(tensors)
    except TypeError:  # something other than a tensor among them
        _check_lists(keys, imps, gs)
        raise
    key = (backend, _dispatch.interpreter_enabled(), len(imps), signature)
    plan = _PLANS.get(key) if signature is not None else None
    if plan is None:
        _check_lists(keys, imps, gs)
        if _dispatch.resolve_backend("accumulate_", backend, tensors) == "torch":
            _accumulate_lists(imps, gs, scale)
            return
        config = _dispatch.elementwise_config()
        groups = _dispatch.group_tensors([imps, gs], config.block)
        metas = _metas(groups, config)  # before any launch: an unsupported dtype then changes nothing
        plan = groups, metas
        reusable = [g.without_tensors() for g in groups]
        if signature is not None and all(g is not None for g in reusable):
            _PLANS.put(key, (reusable, metas))
    groups, metas = plan
    if groups:
        with _dispatch.device_guard(imps[0].device):
            _launch(groups, imps, float(scale), metas=metas)


_PLANS = _dispatch.PlanCache()


def _metas(groups: list[_dispatch.TensorGroup], config: _dispatch.LaunchConfig) -> list[dict[str, Any]]:
    """Each group's compile-time launch arguments (TypeError for a dtype Triton is not given)."""
    return [
        dict(
            IMP=_dispatch.triton_dtype(g.dtypes[0]),
            GRAD=_dispatch.triton_dtype(g.dtypes[1]),
            BLOCK=config.block,
            ALIGNED=g.table.aligned,
            num_warps=config.num_warps,
        )
        for g in groups
    ]


def _launch(
    groups: list[_dispatch.TensorGroup],
    importances: Sequence[torch.Tensor],
    scale: float,
    config: _dispatch.LaunchConfig | None = None,
    *,
    metas: list[dict[str, Any]] | None = None,
) -> None:
    """Launch every group: with ``metas`` from :func:`_metas`, or built from ``config``."""
    if metas is None:
        metas = _metas(groups, config or _dispatch.elementwise_config())
    for group, meta in zip(groups, metas, strict=True):
        table = group.table
        _accumulate_kernel[(table.n_blocks,)](
            *table.addrs, table.numels, table.block_first, table.block_tensor, scale, **meta
        )
    for group in groups:
        group.write_back(importances)
