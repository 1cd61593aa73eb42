"""per_sample_linear(_bias): Triton kernels against the torch references and autograd."""

from __future__ import annotations

import pytest
import torch
from contlearn.kernels import per_sample

SHAPES = [  # (B, T, I, O)
    (1, 1, 1, 1),
    (5, 1, 33, 17),  # T = 1: the squared-operand GEMM
    (3, 7, 9, 5),
    (2, 37, 20, 40),  # T and O beyond one tile, ragged edges
]


def _autograd_loop(a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared per-sample weight and bias gradients, one backward pass per sample."""
    lin = torch.nn.Linear(a.shape[-1], d.shape[-1]).double().to(a.device)
    fw = torch.zeros_like(lin.weight)
    fb = torch.zeros_like(lin.bias)
    for b in range(a.shape[0]):
        loss = (lin(a[b].double()) * d[b].double()).sum()
        gw, gb = torch.autograd.grad(loss, [lin.weight, lin.bias])
        fw += gw**2
        fb += gb**2
    return fw.float(), fb.float()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference(
    device: torch.device, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    b, t, n_in, n_out = shape
    a = torch.randn(b, t, n_in, device=device).to(dtype)
    d = torch.randn(b, t, n_out, device=device).to(dtype)
    got = per_sample.per_sample_linear(a, d, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (n_out, n_in)
    torch.testing.assert_close(
        got, per_sample.per_sample_linear_reference(a, d), rtol=1e-5, atol=1e-5
    )
    got_b = per_sample.per_sample_linear_bias(d, backend="triton")
    torch.testing.assert_close(
        got_b, per_sample.per_sample_linear_bias_reference(d), rtol=1e-5, atol=1e-5
    )


def test_two_dimensional_inputs_mean_t_equals_one(device: torch.device) -> None:
    a, d = torch.randn(6, 11, device=device), torch.randn(6, 3, device=device)
    want = per_sample.per_sample_linear_reference(a[:, None], d[:, None])
    torch.testing.assert_close(per_sample.per_sample_linear(a, d, backend="triton"), want)
    torch.testing.assert_close(per_sample.per_sample_linear(a, d), want)
    torch.testing.assert_close(
        per_sample.per_sample_linear_bias(d, backend="triton"), d.square().sum(0)
    )


def test_non_contiguous_inputs(device: torch.device) -> None:
    a = torch.randn(9, 3, 4, device=device).transpose(0, 2)  # [4, 3, 9], strided
    d = torch.randn(4, 5, 3, device=device).transpose(1, 2)  # [4, 3, 5], strided
    torch.testing.assert_close(
        per_sample.per_sample_linear(a, d, backend="triton"),
        per_sample.per_sample_linear_reference(a, d),
    )


@pytest.mark.parametrize("shape", [(4, 1, 6, 3), (3, 5, 7, 2)], ids=["T1", "T5"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_autograd_per_sample_loop(
    device: torch.device, shape: tuple[int, ...], backend: str
) -> None:
    b, t, n_in, n_out = shape
    a, d = torch.randn(b, t, n_in, device=device), torch.randn(b, t, n_out, device=device)
    want_w, want_b = _autograd_loop(a, d)
    torch.testing.assert_close(
        per_sample.per_sample_linear(a, d, backend=backend), want_w, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        per_sample.per_sample_linear_bias(d, backend=backend), want_b, rtol=1e-5, atol=1e-5
    )


def test_reference_chunks_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    a, d = torch.randn(7, 3, 4), torch.randn(7, 3, 5)
    one_by_one = per_sample.per_sample_linear_reference(a, d)
    monkeypatch.setattr(per_sample, "_reference_chunk", lambda device, numel: 3)
    torch.testing.assert_close(per_sample.per_sample_linear_reference(a, d), one_by_one)


def test_every_backend_returns_a_detached_result(device: torch.device) -> None:
    a = torch.randn(3, 2, 4, device=device, requires_grad=True)
    d = torch.randn(3, 2, 5, device=device, requires_grad=True)
    for backend in ("auto", "torch", "triton"):
        assert not per_sample.per_sample_linear(a, d, backend=backend).requires_grad, backend
        assert not per_sample.per_sample_linear_bias(d, backend=backend).requires_grad, backend
    # what "auto" runs for fp32 T > 1 on a GPU: its batched GEMMs write into a buffer, which autograd refuses
    assert not per_sample.per_sample_linear_bmm(a, d).requires_grad


def test_empty_batch(device: torch.device) -> None:
    a, d = torch.randn(0, 3, 4, device=device), torch.randn(0, 3, 5, device=device)
    assert torch.equal(
        per_sample.per_sample_linear(a, d, backend="triton"), torch.zeros(5, 4, device=device)
    )
    assert torch.equal(
        per_sample.per_sample_linear_bias(d, backend="triton"), torch.zeros(5, device=device)
    )


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="disagree"):
        per_sample.per_sample_linear(torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="must be"):
        per_sample.per_sample_linear(torch.randn(4), torch.randn(4))


@pytest.mark.parametrize("chunk", [1, 3, None], ids=["chunk1", "chunk3", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_batched_gemm_path_matches_reference(
    device: torch.device, chunk: int | None, dtype: torch.dtype
) -> None:
    a = torch.randn(7, 13, 21, device=device).to(dtype)
    d = torch.randn(7, 13, 1030, device=device).to(dtype)  # O x I beyond one square-sum block
    got = per_sample.per_sample_linear_bmm(a, d, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (1030, 21)
    torch.testing.assert_close(
        got, per_sample.per_sample_linear_reference(a, d), rtol=1e-5, atol=1e-5
    )
    assert per_sample.per_sample_linear_bmm(a[:0], d[:0]).abs().sum() == 0


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_non_tensors_and_non_floating_tensors_are_refused(backend: str) -> None:
    a, d = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(TypeError, match="per_sample_linear: a must be floating point, got torch.int64"):
        per_sample.per_sample_linear(torch.ones(4, 3, dtype=torch.int64), d, backend=backend)
    with pytest.raises(TypeError, match="d must be floating point, got torch.bool"):
        per_sample.per_sample_linear(a, d > 0, backend=backend)
    with pytest.raises(TypeError, match="a must be a torch.Tensor, got ndarray"):
        per_sample.per_sample_linear(a.numpy(), d, backend=backend)
    with pytest.raises(TypeError, match="per_sample_linear_bias: d must be floating point, got torch.int32"):
        per_sample.per_sample_linear_bias(torch.ones(4, 2, dtype=torch.int32), backend=backend)
    with pytest.raises(TypeError, match="d must be a torch.Tensor, got list"):
        per_sample.per_sample_linear_bias([[1.0, 2.0]], backend=backend)


@pytest.mark.parametrize("t", [1, 5], ids=["T1", "T5"])
def test_float64_is_rounded_to_fp32_as_documented(device: torch.device, t: int) -> None:
    a = torch.randn(3, t, 6, device=device, dtype=torch.float64)
    d = torch.randn(3, t, 4, device=device, dtype=torch.float64)
    want = per_sample.per_sample_linear_reference(a.float(), d.float())
    for backend in ("torch", "triton"):
        got = per_sample.per_sample_linear(a, d, backend=backend)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got_b = per_sample.per_sample_linear_bias(d, backend=backend)
        assert got_b.dtype == torch.float32
        torch.testing.assert_close(got_b, per_sample.per_sample_linear_bias_reference(d.float()))
    # Values fp32 cannot hold tell rounding-first from computing in fp64 and rounding the result:
    # T = 1: 1 + 2**-24 rounds to 1 (F = 1), where (1 + 2**-24)**2 in fp64 rounds to 1 + 2**-23;
    # T = 2: 1 + 2**-30 and -1 cancel to 0 in fp32, to 2**-30 (F = 2**-60) in fp64.
    x = [[1 + 2**-24]] if t == 1 else [[1 + 2**-30], [-1.0]] + [[0.0]] * (t - 2)
    a = torch.tensor([x], device=device, dtype=torch.float64)
    d = torch.ones(1, t, 1, device=device, dtype=torch.float64)
    for backend in ("torch", "triton"):
        assert per_sample.per_sample_linear(a, d, backend=backend).item() == (1.0 if t == 1 else 0.0)
