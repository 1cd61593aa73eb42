"""Squared-gradient accumulation, ``importances[k] += scale * grads[k]**2``, over many tensors.

This is the inner update of the diagonal Fisher information (Kirkpatrick et al.,
2017, EWC) as SSD (Foster et al., AAAI 2024) and EWC estimate it. The Triton kernel
handles the whole list of tensors in one launch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import _dispatch
from ._dispatch import Backend

__all__ = ["accumulate_", "accumulate_reference_"]

tl: Any = None  # triton.language once a kernel is built (see _dispatch.TritonKernel)


def _check_lists(importances: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    if len(importances) != len(grads):
        raise ValueError(f"accumulate_: {len(importances)} importances but {len(grads)} grads")
    for k, (imp, g) in enumerate(zip(importances, grads, strict=True)):
        if imp.shape != g.shape or imp.device != g.device:
            raise ValueError(
                f"accumulate_: importances[{k}] is {tuple(imp.shape)} on {imp.device} "
                f"but grads[{k}] is {tuple(g.shape)} on {g.device}"
            )
        if not imp.is_floating_point():
            raise TypeError(
                f"accumulate_: importances[{k}] must be floating point, got {imp.dtype}"
            )


@torch.no_grad()
def accumulate_reference_(
    importances: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float = 1.0
) -> None:
    """``importances[k] += scale * grads[k]**2`` tensor by tensor, computed in fp32."""
    _check_lists(importances, grads)
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
    importances: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: float = 1.0,
    *,
    backend: Backend = "auto",
) -> None:
    """``importances[k] += scale * grads[k]**2`` for every k, in place, fp32 arithmetic.

    The Triton path is one launch per (importance dtype, grad dtype) pair, normally
    one: a table of tensor addresses and a block->tensor map let every program find
    its tensor, so the list is processed like one flat buffer. The checks and the
    table are kept (without the tensors) for the next call on tensors of the same
    addresses, shapes, strides and dtypes: an accumulation per batch pays them once.
    """
    if _dispatch.surely_reference(backend, importances[0] if importances else None):
        accumulate_reference_(importances, grads, scale)
        return
    tensors = [*importances, *grads]
    key = (backend, _dispatch.interpreter_enabled(), len(importances), _dispatch.signature(tensors))
    plan = _PLANS.get(key)
    if plan is None:
        _check_lists(importances, grads)
        if _dispatch.resolve_backend("accumulate_", backend, tensors) == "torch":
            accumulate_reference_(importances, grads, scale)
            return
        config = _dispatch.elementwise_config()
        plan = config, _dispatch.group_tensors([importances, grads], config.block)
        reusable = [g.without_tensors() for g in plan[1]]
        if all(g is not None for g in reusable):
            _PLANS.put(key, (config, reusable))
    config, groups = plan
    if groups:
        with _dispatch.device_guard(importances[0].device):
            _launch(groups, importances, float(scale), config)


_PLANS = _dispatch.PlanCache()


def _launch(
    groups: list[_dispatch.TensorGroup],
    importances: Sequence[torch.Tensor],
    scale: float,
    config: _dispatch.LaunchConfig,
) -> None:
    for group in groups:
        imp_dtype, grad_dtype = group.dtypes
        table = group.table
        _accumulate_kernel[(table.n_blocks,)](
            *table.addrs,
            table.numels,
            table.block_first,
            table.block_tensor,
            scale,
            IMP=_dispatch.triton_dtype(imp_dtype),
            GRAD=_dispatch.triton_dtype(grad_dtype),
            BLOCK=config.block,
            ALIGNED=table.aligned,
            num_warps=config.num_warps,
        )
        group.write_back(importances)
