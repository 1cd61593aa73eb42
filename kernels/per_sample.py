"""Exact sums of squared per-sample gradients of a Linear layer, without per-sample tensors.

For a Linear layer with inputs ``a`` [B, T, I] and output gradients ``d`` [B, T, O],
sample ``b``'s weight gradient is ``G_b = d_b^T a_b`` and its bias gradient is
``sum_t d_b[t]``. The diagonal empirical Fisher information (Kirkpatrick et al., 2017,
EWC) needs ``sum_b G_b**2``. For T = 1 that is one GEMM on squared operands,
``(d*d)^T (a*a)``; for T > 1 the Triton kernel forms each ``G_b`` tile by tile in
registers and accumulates its square over ``b``, so the B gradients never exist in
memory. Accumulation is in fp32 whatever the input dtype: fp32, bf16 and fp16 inputs
are read as they are, float64 inputs are rounded to fp32 first, and the result is
fp32. Inputs must be floating-point tensors (TypeError otherwise).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _dispatch
from ._dispatch import Backend

__all__ = [
    "per_sample_linear",
    "per_sample_linear_bmm",
    "per_sample_linear_bias",
    "per_sample_linear_reference",
    "per_sample_linear_bias_reference",
]

tl: Any = None  # triton.language once a kernel is built (see _dispatch.TritonKernel)

_REFERENCE_CHUNK = 1 << 24  # elements of per-sample gradients the reference holds at once


def _as_btx(x: torch.Tensor, name: str, op: str) -> torch.Tensor:
    _dispatch.check_floating(op, name, x)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [B, I] or [B, T, I]-shaped, got shape {tuple(x.shape)}")
    return x


def _fp64_rounded(x: torch.Tensor) -> torch.Tensor:
    """float64 rounded to fp32, as every path computes (the kernels take no float64)."""
    return x.float() if x.dtype == torch.float64 else x


def _check_pair(
    a: torch.Tensor, d: torch.Tensor, op: str = "per_sample_linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    a3, d3 = _as_btx(a, "a", op), _as_btx(d, "d", op)
    if a3.shape[:2] != d3.shape[:2]:
        raise ValueError(f"{op}: a {tuple(a.shape)} and d {tuple(d.shape)} disagree on [B, T]")
    if a.device != d.device:
        raise ValueError(f"{op}: a is on {a.device} but d is on {d.device}")
    return a3, d3


def per_sample_linear_reference(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``F[o, i] = sum_b (sum_t d[b,t,o] a[b,t,i])**2`` in plain torch (fp32), [O, I]
    (detached, as the Triton path's)."""
    return _reference(*_check_pair(a, d))


def _reference(a3: torch.Tensor, d3: torch.Tensor) -> torch.Tensor:
    """:func:`per_sample_linear_reference` of checked ``[B, T, X]`` inputs. Detaching
    them costs less host time than ``torch.no_grad``, which shows at T = 1, where the
    call is one GEMM."""
    a3, d3 = a3.detach().float(), d3.detach().float()
    n_batch, n_t, n_in = a3.shape
    n_out = d3.shape[2]
    if n_t == 1:
        return d3[:, 0].square().T @ a3[:, 0].square()
    out = torch.zeros(n_out, n_in, dtype=torch.float32, device=a3.device)
    chunk = _reference_chunk(a3.device, n_out * n_in)
    for start in range(0, n_batch, chunk):
        g = torch.bmm(d3[start : start + chunk].transpose(1, 2), a3[start : start + chunk])
        if chunk == 1:
            out.addcmul_(g[0], g[0])
        else:
            out += g.square().sum(0)
    return out


def _reference_chunk(device: torch.device, grad_numel: int) -> int:
    """Samples per batched GEMM in the reference: one on the CPU, where the accumulator then
    stays in cache, else as many as fit in ``_REFERENCE_CHUNK`` gradient elements."""
    if device.type == "cpu":
        return 1
    return max(1, _REFERENCE_CHUNK // max(1, grad_numel))


@torch.no_grad()
def per_sample_linear_bias_reference(d: torch.Tensor) -> torch.Tensor:
    """``F[o] = sum_b (sum_t d[b,t,o])**2`` in plain torch (fp32), [O] (detached)."""
    d3 = _as_btx(d, "d", "per_sample_linear_bias")
    return torch.sum(d3, dim=1, dtype=torch.float32).square().sum(0)


# (BLOCK_O, BLOCK_I, BLOCK_T, num_warps). IEEE fp32 tl.dot runs on FMA units and keeps
# both operand tiles in registers, so it needs more warps per tile than tensor cores
# (these are the shapes that compile for sm_90 without spilling).
_FMA_TILES = [
    (64, 64, 16, 8),
    (128, 64, 16, 16),
    (64, 128, 16, 16),
    (128, 32, 16, 8),
    (32, 128, 16, 8),
]
_MMA_TILES = [
    (64, 64, 16, 4),
    (128, 64, 16, 8),
    (64, 128, 16, 8),
    (128, 128, 16, 8),
    (64, 64, 32, 4),
]


def _gemm_configs(triton: Any) -> dict[str, Any]:
    def configs(tiles: list[tuple[int, int, int, int]]) -> list:
        return [
            triton.Config({"BLOCK_O": bo, "BLOCK_I": bi, "BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bo, bi, bt, w in tiles
            for s in (2, 3)
        ]

    fma, mma = configs(_FMA_TILES), configs(_MMA_TILES)

    def prune(_: list, nargs: dict[str, Any], **kwargs: Any) -> list:
        args = {**nargs, **kwargs}
        fp32_dot = args["SQUARE_INPUTS"] or args["a_ptr"].dtype == torch.float32
        return fma if fp32_dot and args["PRECISION"] == "ieee" else mma

    return {
        "configs": fma + mma,
        "key": ["n_out", "n_in", "n_t", "SQUARE_INPUTS", "PRECISION"],
        "prune_configs_by": {"early_config_prune": prune},
    }


@_dispatch.triton_kernel(autotune=_gemm_configs)
def _per_sample_kernel(
    a_ptr,
    d_ptr,
    f_ptr,
    n_b,
    n_t,
    n_out,
    n_in,
    s_ab,
    s_at,
    s_ai,
    s_db,
    s_dt,
    s_do,
    SQUARE_INPUTS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program owns the F[o-tile, i-tile]; it walks the samples b and, within a
    # sample, the rows t in BLOCK_T chunks. SQUARE_INPUTS is the T = 1 form: one
    # "sample" whose rows are the batch, operands squared on load, no final square.
    # UPCAST feeds 16-bit tiles to tl.dot as fp32 (the interpreter cannot dot bf16).
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < n_out
    mask_i = offs_i < n_in
    acc = tl.full((BLOCK_O, BLOCK_I), 0.0, tl.float32)
    a_b = a_ptr
    d_b = d_ptr
    for _b in range(0, n_b):
        g = tl.full((BLOCK_O, BLOCK_I), 0.0, tl.float32)
        a_t = a_b
        d_t = d_b
        for t0 in range(0, n_t, BLOCK_T):
            mask_t = (t0 + offs_t) < n_t
            d_tile = tl.load(
                d_t + offs_o[:, None] * s_do + offs_t[None, :] * s_dt,
                mask=mask_o[:, None] & mask_t[None, :],
                other=0.0,
            )
            a_tile = tl.load(
                a_t + offs_t[:, None] * s_at + offs_i[None, :] * s_ai,
                mask=mask_t[:, None] & mask_i[None, :],
                other=0.0,
            )
            if SQUARE_INPUTS or UPCAST:
                d_tile = d_tile.to(tl.float32)
                a_tile = a_tile.to(tl.float32)
            if SQUARE_INPUTS:
                d_tile = d_tile * d_tile
                a_tile = a_tile * a_tile
            g = tl.dot(d_tile, a_tile, g, input_precision=PRECISION)
            a_t += BLOCK_T * s_at
            d_t += BLOCK_T * s_dt
        if SQUARE_INPUTS:
            acc += g
        else:
            acc += g * g
        a_b += s_ab
        d_b += s_db
    tl.store(
        f_ptr + offs_o[:, None] * n_in + offs_i[None, :],
        acc,
        mask=mask_o[:, None] & mask_i[None, :],
    )


@_dispatch.triton_kernel
def _bias_kernel(
    d_ptr,
    out_ptr,
    n_b,
    n_t,
    n_out,
    SPLIT,
    s_db,
    s_dt,
    s_do,
    BLOCK_O: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Program (o-tile, s) sums (sum_t d[b, t, o])**2 over the samples b = s, s + SPLIT, ...
    pid_s = tl.program_id(1)
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < n_out
    acc = tl.full((BLOCK_O,), 0.0, tl.float32)
    d_b = d_ptr + pid_s * s_db
    for _b in range(pid_s, n_b, SPLIT):
        s = tl.full((BLOCK_O,), 0.0, tl.float32)
        d_t = d_b
        for t0 in range(0, n_t, BLOCK_T):
            mask_t = (t0 + offs_t) < n_t
            tile = tl.load(
                d_t + offs_t[:, None] * s_dt + offs_o[None, :] * s_do,
                mask=mask_t[:, None] & mask_o[None, :],
                other=0.0,
            )
            s += tl.reduce(tile.to(tl.float32), 0, tl.standard._sum_combine)
            d_t += BLOCK_T * s_dt
        acc += s * s
        d_b += SPLIT * s_db
    tl.store(out_ptr + pid_s * n_out + offs_o, acc, mask=mask_o)


@_dispatch.triton_kernel
def _square_sum_kernel(g_ptr, out_ptr, n_g, numel, BLOCK: tl.constexpr):
    # out[j] += sum_c g[c, j]**2 over the n_g per-sample gradients in the scratch buffer.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # a layer may pass 2^31
    mask = offs < numel
    acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
    g_c = g_ptr + offs
    for _c in range(0, n_g):
        g = tl.load(g_c, mask=mask, other=0.0).to(tl.float32)
        acc += g * g
        g_c += numel
    tl.store(out_ptr + offs, acc, mask=mask)


_BMM_SCRATCH = 1 << 28  # most elements of per-sample gradients one batched GEMM writes


def per_sample_linear_bmm(
    a: torch.Tensor, d: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """:func:`per_sample_linear` as batched GEMMs into a scratch buffer plus a Triton
    square-and-sum pass, ``chunk`` samples at a time (default: the largest power of two
    of samples whose gradients fit in 256M elements, 1 GiB; 64 for a ViT-B MLP layer,
    the fastest of 16, 28, 32 and 64 on an H200; on an H100, 128 (2 GiB) was 2% faster).

    The per-sample gradients exist, but only ``chunk`` at a time: the GEMMs run at the
    speed of the vendor library (whose fp32 GEMM outpaces a Triton FMA tile loop), and
    the extra memory traffic is one write and one read of each gradient. This is what
    ``per_sample_linear`` runs for T > 1 on a GPU.
    """
    a3, d3 = _check_pair(a, d, "per_sample_linear_bmm")
    # formed and squared in fp32 (float64 rounded first); detached: bmm into a buffer (out=) refuses
    # autograd, and the result is detached on every path
    a3, d3 = a3.detach().float(), d3.detach().float()
    _dispatch.resolve_backend("per_sample_linear_bmm", "triton", [a3, d3])
    n_batch, _, n_in = a3.shape
    n_out = d3.shape[2]
    out = torch.zeros(n_out, n_in, dtype=torch.float32, device=a3.device)
    numel = n_out * n_in
    if n_batch == 0 or numel == 0:
        return out
    if chunk is None:
        fit = max(1, min(n_batch, _BMM_SCRATCH // numel))
        chunk = 1 << (fit.bit_length() - 1)
    chunk = max(1, min(n_batch, chunk))
    scratch = torch.empty(chunk, n_out, n_in, dtype=a3.dtype, device=a3.device)
    block = 1024
    with _dispatch.device_guard(a3.device):
        for start in range(0, n_batch, chunk):
            stop = min(n_batch, start + chunk)
            g = scratch[: stop - start]
            torch.bmm(d3[start:stop].transpose(1, 2), a3[start:stop], out=g)
            _square_sum_kernel[(_cdiv(numel, block),)](g, out, stop - start, numel, BLOCK=block)
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _per_sample_triton(a3: torch.Tensor, d3: torch.Tensor) -> torch.Tensor:
    n_batch, n_t, n_in = a3.shape
    n_out = d3.shape[2]
    if a3.dtype != d3.dtype:
        a3, d3 = a3.float(), d3.float()
    out = torch.empty(n_out, n_in, dtype=torch.float32, device=a3.device)
    if n_out == 0 or n_in == 0:
        return out
    if n_batch == 0:
        return out.zero_()
    square = n_t == 1
    if square:  # the batch becomes the rows of one sample
        strides = (0, a3.stride(0), a3.stride(2), 0, d3.stride(0), d3.stride(2))
        n_b, n_rows = 1, n_batch
    else:
        strides = (
            a3.stride(0),
            a3.stride(1),
            a3.stride(2),
            d3.stride(0),
            d3.stride(1),
            d3.stride(2),
        )
        n_b, n_rows = n_batch, n_t
    kernel = _per_sample_kernel
    meta: dict[str, int] = {} if kernel.tuned else {"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_T": 16}

    def grid(m: dict[str, int]) -> tuple[int, int]:
        return (_cdiv(n_out, m["BLOCK_O"]), _cdiv(n_in, m["BLOCK_I"]))

    kernel[grid](
        a3,
        d3,
        out,
        n_b,
        n_rows,
        n_out,
        n_in,
        *strides,
        SQUARE_INPUTS=square,
        UPCAST=_dispatch.interpreter_enabled() and a3.dtype != torch.float32,
        PRECISION=_dot_precision(a3.dtype),
        **meta,
    )
    return out


def per_sample_linear(
    a: torch.Tensor, d: torch.Tensor, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Sum over samples of squared per-sample weight gradients of a Linear layer.

    ``a`` is the layer input [B, T, I] (or [B, I] for T = 1) and ``d`` the gradient of
    the loss with respect to its output [B, T, O] (or [B, O]). Returns fp32
    ``F[o, i] = sum_b (sum_t d[b,t,o] a[b,t,i])**2`` [O, I], the exact sum of the squared
    per-sample gradients, whatever the input dtype (fp32 accumulation; float64 inputs
    are rounded to fp32 first; fp32 products follow
    ``torch.backends.cuda.matmul.allow_tf32``). ``a`` and ``d`` must be floating-point
    tensors (TypeError otherwise).

    On CUDA with ``backend="auto"``, T = 1 is one cuBLAS GEMM on squared operands and
    fp32 T > 1 is :func:`per_sample_linear_bmm` (cuBLAS batched GEMMs and a Triton
    square-and-sum). ``backend="triton"`` forces the fused Triton kernel, which runs
    both the T = 1 squared GEMM and the T > 1 per-sample reduction in registers: no
    per-sample gradient is ever written, at the price of a slower fp32 GEMM than the
    vendor library's.
    """
    a3, d3 = (_fp64_rounded(x) for x in _check_pair(a, d))
    chosen = _dispatch.resolve_backend("per_sample_linear", backend, [a3, d3])
    if chosen == "torch" or (backend == "auto" and a3.shape[1] == 1):
        return _reference(a3, d3)
    if backend == "auto" and a3.dtype == d3.dtype == torch.float32:
        return per_sample_linear_bmm(a3, d3)
    with _dispatch.device_guard(a3.device):
        return _per_sample_triton(a3, d3)


def per_sample_linear_bias(d: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Sum over samples of squared per-sample bias gradients of a Linear layer.

    ``d`` is the output gradient [B, T, O] (or [B, O]), a floating-point tensor
    (TypeError otherwise); returns fp32 ``F[o] = sum_b (sum_t d[b,t,o])**2`` [O].
    """
    d3 = _fp64_rounded(_as_btx(d, "d", "per_sample_linear_bias"))
    if _dispatch.resolve_backend("per_sample_linear_bias", backend, [d3]) == "torch":
        return per_sample_linear_bias_reference(d3)
    with _dispatch.device_guard(d3.device):
        return _bias_triton(d3)


def _bias_triton(d3: torch.Tensor) -> torch.Tensor:
    n_batch, n_t, n_out = d3.shape
    if n_batch == 0 or n_out == 0:
        return torch.zeros(n_out, dtype=torch.float32, device=d3.device)
    block_o = 128 if n_out >= 128 else 32
    block_t = min(32, max(1, 1 << (n_t - 1).bit_length()))
    n_o = _cdiv(n_out, block_o)
    split = (
        min(n_batch, 2)
        if _dispatch.interpreter_enabled()
        else max(1, min(n_batch, _cdiv(512, n_o)))
    )
    partial = torch.empty(split, n_out, dtype=torch.float32, device=d3.device)
    _bias_kernel[(n_o, split)](
        d3,
        partial,
        n_batch,
        n_t,
        n_out,
        split,
        d3.stride(0),
        d3.stride(1),
        d3.stride(2),
        BLOCK_O=block_o,
        BLOCK_T=block_t,
    )
    return partial.sum(0)
