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
    its tensor, so the list is processed like one flat buffer.
    """
    _check_lists(importances, grads)
    if (
        _dispatch.resolve_backend("accumulate_", backend, list(importances) + list(grads))
        == "torch"
    ):
        accumulate_reference_(importances, grads, scale)
    elif importances:
        with _dispatch.device_guard(importances[0].device):
            _accumulate_triton(importances, grads, float(scale))


def _accumulate_triton(
    importances: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float
) -> None:
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for k, (imp, g) in enumerate(zip(importances, grads, strict=True)):
        if imp.numel():
            groups.setdefault((imp.dtype, g.dtype), []).append(k)
    block = _dispatch.elementwise_block()
    for (imp_dtype, grad_dtype), index in groups.items():
        work = [_dispatch.contiguous_work(importances[k]) for k in index]
        table = _dispatch.launch_table([work, [grads[k].contiguous() for k in index]], block)
        _accumulate_kernel[(table.n_blocks,)](
            *table.addrs,
            table.numels,
            table.block_first,
            table.block_tensor,
            scale,
            IMP=_dispatch.triton_dtype(imp_dtype),
            GRAD=_dispatch.triton_dtype(grad_dtype),
            BLOCK=block,
            ALIGNED=table.aligned,
            num_warps=8,
        )
        for k, w in zip(index, work, strict=True):
            if w is not importances[k]:
                importances[k].copy_(w)
