"""dampen_ (SSD's select-and-dampen): the Triton kernel against the reference, and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from contlearn.kernels import _dispatch, dampen

SIZES = [(1,), (7,), (1023,), (33, 31), (1025,), (4097,), (0,), (3, 5, 7)]
ALPHA, LAM = 2.0, 1.5


def _problem(
    device: torch.device,
    theta_dtype: torch.dtype = torch.float32,
    fisher_dtype: torch.dtype = torch.float32,
):
    thetas = [torch.randn(s, device=device).to(theta_dtype) for s in SIZES]
    fds = [torch.rand(s, device=device).to(fisher_dtype) for s in SIZES]
    ffs = [(torch.rand(s, device=device) * 4).to(fisher_dtype) for s in SIZES]
    return thetas, fds, ffs


def _ssd_loop(
    theta: torch.Tensor, fd: torch.Tensor, ff: torch.Tensor, alpha: float, lam: float
) -> None:
    """The published SSD update, written as its authors' loop does it (with F_f > 0 added)."""
    locations = torch.where((ff > fd * alpha) & (ff > 0))
    update = (fd * lam / ff)[locations]
    update[update > 1] = 1
    theta[locations] = theta[locations] * update


@pytest.mark.parametrize(
    ("theta_dtype", "fisher_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["fp32", "bf16-params", "bf16"],
)
def test_kernel_matches_reference(
    device: torch.device, theta_dtype: torch.dtype, fisher_dtype: torch.dtype
) -> None:
    thetas, fds, ffs = _problem(device, theta_dtype, fisher_dtype)
    want = [t.clone() for t in thetas]
    want_count = dampen.dampen_reference_(want, fds, ffs, ALPHA, LAM)
    count = dampen.dampen_(thetas, fds, ffs, ALPHA, LAM, backend="triton")
    assert count == want_count > 0
    for got, ref in zip(thetas, want, strict=True):
        if theta_dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
        else:  # the interpreter rounds fp32 -> bf16 towards zero, CUDA to nearest even
            torch.testing.assert_close(got, ref, rtol=2**-7, atol=0)


def test_reference_is_the_ssd_update() -> None:
    thetas, fds, ffs = _problem(torch.device("cpu"))
    fds[1][:3] = 0.0
    want = [t.clone() for t in thetas]
    for theta, fd, ff in zip(want, fds, ffs, strict=True):
        _ssd_loop(theta, fd, ff, ALPHA, LAM)
    dampen.dampen_reference_(thetas, fds, ffs, ALPHA, LAM)
    for got, ref in zip(thetas, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_finite_values_whose_sum_overflows_are_not_an_error(device: torch.device, backend: str) -> None:
    theta = torch.tensor([3e38, 3e38, 1.0], device=device)  # finite, though its sum is not
    fd = torch.tensor([1e38, 1.0, 1.0], device=device)
    ff = torch.tensor([3e38, 4.0, 4.0], device=device)
    assert dampen.dampen_([theta], [fd], [ff], alpha=2.0, lam=1.0, backend=backend) == 3
    assert theta.tolist() == pytest.approx([1e38, 0.75e38, 0.25])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_cases(device: torch.device, backend: str) -> None:
    theta = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], device=device)
    fd = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 2.0], device=device)
    ff = torch.tensor([0.0, 5.0, 0.0, 3.0, 1.0, 8.0], device=device)
    count = dampen.dampen_([theta], [fd], [ff], alpha=2.0, lam=4.0, backend=backend)
    # 0: F_f = 0 never selected; 1: F_D = 0 < F_f -> theta 0; 2: F_f = 0; 3: factor 4/3 capped at 1;
    # 4: F_f = F_D not selected; 5: factor 4*2/8 = 1 exactly.
    assert count == 3
    assert theta.tolist() == [1.0, 0.0, 3.0, 4.0, 5.0, 6.0]
    theta2 = torch.tensor([10.0], device=device)
    assert dampen.dampen_([theta2], [torch.tensor([1.0], device=device)], [torch.tensor([8.0], device=device)],
                          alpha=2.0, lam=2.0, backend=backend) == 1  # fmt: skip
    assert theta2.item() == 2.5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["theta", "fd", "ff"])
@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"]
)
def test_non_finite_raises_and_leaves_params_untouched(
    device: torch.device, backend: str, where: str, value: float
) -> None:
    thetas, fds, ffs = _problem(device)
    bad = 5  # (1025,): earlier and later tensors have selected elements the kernel must restore
    {"theta": thetas, "fd": fds, "ff": ffs}[where][bad][700] = value
    before = [t.clone() for t in thetas]
    label = {"theta": "theta", "fd": "F_D", "ff": "F_f"}[where]
    with pytest.raises(ValueError, match=rf"{label} of params\[{bad}\]"):
        dampen.dampen_(thetas, fds, ffs, ALPHA, LAM, backend=backend)
    for got, ref in zip(thetas, before, strict=True):
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(
            got.nan_to_num(), ref.nan_to_num()
        )


def test_non_finite_restores_every_dtype_group(device: torch.device) -> None:
    thetas, fds, ffs = _problem(device)
    thetas[0] = thetas[0].to(torch.bfloat16)  # a second launch group
    thetas[2] = thetas[2].to(torch.bfloat16)
    ffs[-1][0, 0, 0] = float("nan")
    before = [t.clone() for t in thetas]
    with pytest.raises(ValueError, match=r"params\[7\]"):
        dampen.dampen_(thetas, fds, ffs, ALPHA, LAM, backend="triton")
    assert all(torch.equal(g, r) for g, r in zip(thetas, before, strict=True))
    thetas[3][0] = float("inf")  # an earlier tensor, in the other launch group
    before = [t.clone() for t in thetas]
    with pytest.raises(ValueError, match=r"non-finite values in theta of params\[3\]"):
        dampen.dampen_(thetas, fds, ffs, ALPHA, LAM, backend="triton")
    assert all(torch.equal(g, r) for g, r in zip(thetas, before, strict=True))


def test_many_programs_dampen_and_restore_exactly(device: torch.device) -> None:
    thetas, fds, ffs = _problem(device)
    config = _dispatch.LaunchConfig(128, 4)  # many programs, each with a different selection
    plan = dampen.DampenPlan(thetas, fds, ffs, backend="triton", config=config)
    want = [t.clone() for t in thetas]
    assert plan(ALPHA, LAM) == dampen.dampen_reference_(want, fds, ffs, ALPHA, LAM)
    for got, ref in zip(thetas, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    ffs[5][700] = float("nan")
    with pytest.raises(ValueError, match=r"F_f of params\[5\]"):
        plan(ALPHA, LAM)
    assert all(torch.equal(g, r) for g, r in zip(thetas, want, strict=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mappings_name_the_offending_parameter(device: torch.device, backend: str) -> None:
    params = {
        "encoder.weight": torch.ones(4, device=device),
        "head.bias": torch.ones(3, device=device),
    }
    fd = {name: torch.zeros_like(t) for name, t in params.items()}
    ff = {name: torch.ones_like(t) for name, t in params.items()}
    assert dampen.dampen_(params, fd, ff, 1.0, 1.0, backend=backend) == 7
    assert all(torch.equal(t, torch.zeros_like(t)) for t in params.values())
    ff["head.bias"][1] = float("inf")
    with pytest.raises(ValueError, match="F_f of head.bias"):
        dampen.dampen_(params, fd, ff, 1.0, 1.0, backend=backend)


def test_one_launch_for_all_tensors(device: torch.device, count_launches) -> None:
    counter = count_launches(dampen, "_dampen_kernel")
    dampen.dampen_(*_problem(device), ALPHA, LAM, backend="triton")
    assert counter.launches == 1


def test_non_contiguous_params(device: torch.device) -> None:
    base = torch.randn(17, 9, device=device)
    fd, ff = torch.rand(9, 17, device=device), torch.rand(9, 17, device=device) * 4
    want = base.T.clone()
    want_count = dampen.dampen_reference_([want], [fd], [ff], ALPHA, LAM)
    assert dampen.dampen_([base.T], [fd], [ff], ALPHA, LAM, backend="triton") == want_count
    torch.testing.assert_close(base.T, want, rtol=1e-6, atol=0)


def test_parameters_with_requires_grad(device: torch.device) -> None:
    p = torch.nn.Parameter(torch.ones(5, device=device))
    assert (
        dampen.dampen_(
            [p], [torch.zeros(5, device=device)], [torch.ones(5, device=device)], 1.0, 1.0
        )
        == 5
    )
    assert torch.equal(p.detach(), torch.zeros(5, device=device))


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        dampen.dampen_([torch.ones(3)], [torch.ones(2)], [torch.ones(3)], 1.0, 1.0)
    with pytest.raises(ValueError, match="1 params, 2 fisher_d"):
        dampen.dampen_([torch.ones(3)], [torch.ones(3)] * 2, [torch.ones(3)], 1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        dampen.dampen_([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], float("nan"), 1.0)
    with pytest.raises(ValueError, match=r"fisher_d has no entry for \[.w.\]"):
        dampen.dampen_({"w": torch.ones(1)}, {}, {}, 1.0, 1.0)


def test_a_plan_applies_the_same_update_every_time(device: torch.device, count_launches) -> None:
    thetas, fds, ffs = _problem(device)
    want = [t.clone() for t in thetas]
    plan = dampen.DampenPlan(
        thetas, fds, ffs, backend="triton", config=_dispatch.LaunchConfig(128, 4)
    )
    counter = count_launches(dampen, "_dampen_kernel")
    counts = [plan(ALPHA, LAM), plan(ALPHA, LAM)]
    assert counter.launches == 2
    want_counts = [dampen.dampen_reference_(want, fds, ffs, ALPHA, LAM) for _ in range(2)]
    assert counts == want_counts
    for got, ref in zip(thetas, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_repeated_calls_reuse_a_plan_that_holds_no_tensor(device: torch.device) -> None:
    import gc
    import weakref

    dampen._PLANS.clear()
    thetas, fds, ffs = _problem(device)
    want = [t.clone() for t in thetas]
    for _ in range(2):
        assert dampen.dampen_(thetas, fds, ffs, ALPHA, LAM, backend="triton") == dampen.dampen_reference_(
            want, fds, ffs, ALPHA, LAM
        )
    assert len(dampen._PLANS._plans) == 1
    for got, ref in zip(thetas, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    fisher = weakref.ref(fds[0])
    del fds
    gc.collect()
    assert fisher() is None  # the cached plan keeps no Fisher tensor alive


def test_non_contiguous_tensors_are_dampened_but_not_cached(device: torch.device) -> None:
    dampen._PLANS.clear()
    theta = torch.randn(6, 5, device=device).T  # a transposed view
    fd, ff = torch.rand(5, 6, device=device), torch.rand(5, 6, device=device) * 8
    want = theta.clone()
    count = dampen.dampen_([theta], [fd], [ff], ALPHA, LAM, backend="triton")
    assert count == dampen.dampen_reference_([want], [fd], [ff], ALPHA, LAM) > 0
    torch.testing.assert_close(theta, want, rtol=1e-6, atol=0)
    assert not dampen._PLANS._plans


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_tensor_passed_twice_is_refused(device: torch.device, backend: str) -> None:
    w = torch.full((4,), 2.0, device=device)
    fd, ff = torch.zeros(4, device=device), torch.ones(4, device=device)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] are the same tensor"):
        dampen.dampen_([w, w], [fd, fd], [ff, ff], 1.0, 1.0, backend=backend)
    assert torch.equal(w, torch.full((4,), 2.0, device=device))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_expanded_or_fisher_aliased_parameter_is_refused_before_any_change(device: torch.device, backend: str) -> None:
    first = torch.ones(3, device=device)
    wide = torch.ones(1, device=device).expand(4)  # four elements, one memory location
    fds = [torch.zeros(3, device=device), torch.zeros(4, device=device)]
    ffs = [torch.ones(3, device=device), torch.ones(4, device=device)]
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory.*no parameter was changed"):
        dampen.dampen_([first, wide], fds, ffs, 1.0, 1.0, backend=backend)
    theta = torch.full((3,), 4.0, device=device)
    with pytest.raises(ValueError, match=r"params\[1\] is also passed as a F_f tensor"):
        dampen.dampen_([first, theta], fds[:1] * 2, [ffs[0], theta], 2.0, 0.5, backend=backend)
    assert torch.equal(first, torch.ones(3, device=device)) and torch.equal(theta, torch.full((3,), 4.0, device=device))


def test_an_unsupported_dtype_fails_before_any_tensor_changes(device: torch.device) -> None:
    thetas = [torch.ones(3, device=device), torch.ones(3, device=device, dtype=torch.float64)]
    fds = [torch.zeros(3, device=device), torch.zeros(3, device=device, dtype=torch.float64)]
    ffs = [torch.ones(3, device=device), torch.ones(3, device=device, dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"dampen_: backend='triton' takes float32, bfloat16 and float16 tensors, got torch.float64"):
        dampen.dampen_(thetas, fds, ffs, 1.0, 1.0, backend="triton")
    assert all(torch.equal(t, torch.ones_like(t)) for t in thetas)
    assert dampen.dampen_(thetas, fds, ffs, 1.0, 1.0, backend="auto") == 6  # the reference, on a GPU too
    assert all(torch.equal(t, torch.zeros_like(t)) for t in thetas)


def test_argument_shape_errors_are_not_hidden_by_the_plan_cache(device: torch.device) -> None:
    a, b, c, d, e, g = (torch.rand(2, device=device) for _ in range(6))
    dampen.dampen_([a, b], [c, d], [e, g], 1.0, 1.0, backend="triton")
    with pytest.raises(ValueError, match="got 2 params, 1 fisher_d, 3 fisher_f"):
        dampen.dampen_([a, b], [c], [d, e, g], 1.0, 1.0, backend="triton")
    with pytest.raises(TypeError, match="must be mappings too"):
        dampen.dampen_({"a": a}, [c], [e], 1.0, 1.0, backend="triton")


# --------------------------------------------------------------------------- bad arguments


def _int_problem(device: torch.device, where: str, dtype: torch.dtype):
    """Two parameters; tensor 1 of ``where`` has the non-floating ``dtype``. Parameter 0 would be dampened."""
    thetas = [torch.ones(3, device=device), torch.ones(3, device=device)]
    fds = [torch.ones(3, device=device), torch.ones(3, device=device)]
    ffs = [torch.full((3,), 5.0, device=device), torch.full((3,), 5.0, device=device)]
    lists = {"theta": thetas, "fd": fds, "ff": ffs}[where]
    lists[1] = lists[1].to(dtype)
    return thetas, fds, ffs


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=["int64", "bool"])
@pytest.mark.parametrize("where", ["theta", "fd", "ff"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_non_floating_tensor_fails_before_any_parameter_changes(
    backend: str, where: str, dtype: torch.dtype
) -> None:
    thetas, fds, ffs = _int_problem(torch.device("cpu"), where, dtype)
    label = {"theta": "", "fd": "F_D of ", "ff": "F_f of "}[where]
    with pytest.raises(TypeError, match=rf"{label}params\[1\] must be floating point, got {dtype}"):
        dampen.dampen_(thetas, fds, ffs, 1.0, 0.5, backend=backend)
    assert torch.equal(thetas[0], torch.ones(3))


def test_a_non_floating_tensor_is_named_on_the_triton_path_and_by_key(device: torch.device) -> None:
    thetas, fds, ffs = _int_problem(device, "theta", torch.int32)
    with pytest.raises(TypeError, match=r"params\[1\] must be floating point, got torch.int32"):
        dampen.dampen_(thetas, fds, ffs, 1.0, 0.5, backend="triton")
    params = {"a": thetas[0], "b": thetas[0].clone()}
    fd = {"a": fds[0], "b": fds[1].to(torch.int64)}
    with pytest.raises(TypeError, match="F_D of b must be floating point, got torch.int64"):
        dampen.dampen_(params, fd, {"a": ffs[0], "b": ffs[1]}, 1.0, 0.5, backend="triton")
    assert torch.equal(thetas[0], torch.ones(3, device=device))


def test_the_reference_takes_float64() -> None:
    thetas, fds, ffs = _problem(torch.device("cpu"))
    want = [t.clone() for t in thetas]
    count = dampen.dampen_reference_(want, fds, ffs, ALPHA, LAM)
    wide = [t.double() for t in thetas]
    assert dampen.dampen_(wide, [f.double() for f in fds], [f.double() for f in ffs], ALPHA, LAM) == count
    for got, ref in zip(wide, want, strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.float(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("alpha", "lam", "message"),
    [
        (-1.0, 1.0, "alpha must be finite and >= 0, got alpha=-1.0"),
        (1.0, -0.5, "lam must be finite and >= 0, got lam=-0.5"),
        (1.0, float("inf"), "lam must be finite and >= 0, got lam=inf"),
        (float("-inf"), 1.0, "alpha must be finite"),
        (1e39, 1.0, r"alpha must be at most 3.403e\+38 \(fp32's largest\), got alpha=1e\+39"),
    ],
)
def test_negative_or_infinite_alpha_and_lam_are_refused(alpha: float, lam: float, message: str) -> None:
    theta = torch.ones(3)
    with pytest.raises(ValueError, match=message):
        dampen.dampen_([theta], [torch.zeros(3)], [torch.ones(3)], alpha, lam)
    plan = dampen.DampenPlan([theta], [torch.zeros(3)], [torch.ones(3)], backend="torch")
    with pytest.raises(ValueError, match=message):
        plan(alpha, lam)
    assert torch.equal(theta, torch.ones(3))


def test_alpha_and_lam_are_numbers_not_strings() -> None:
    theta = torch.ones(3)
    with pytest.raises(TypeError, match="alpha must be a real number, got '1'"):
        dampen.dampen_([theta], [torch.zeros(3)], [torch.ones(3)], "1", 1.0)  # type: ignore[arg-type]
    assert dampen.dampen_([theta], [torch.zeros(3)], [torch.ones(3)], torch.tensor(1.0), 1.0) == 3
    assert dampen.dampen_([theta], [torch.zeros(3)], [torch.ones(3)], np.array(1.0), torch.tensor([1.0])) == 3


def test_zero_alpha_and_zero_lam_are_the_limits() -> None:
    theta = torch.tensor([1.0, 2.0, 3.0])
    fd, ff = torch.tensor([5.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 2.0])
    # alpha = 0 selects every element with F_f > 0; lam = 0 zeroes what is selected.
    assert dampen.dampen_([theta], [fd], [ff], alpha=0.0, lam=0.0) == 2
    assert theta.tolist() == [0.0, 2.0, 0.0]


def test_single_tensors_and_non_tensors_are_refused() -> None:
    w = torch.ones(2, 3)
    with pytest.raises(TypeError, match="params is a single tensor; pass lists of tensors or mappings"):
        dampen.dampen_(w, [torch.ones(2, 3)], [torch.ones(2, 3)], 1.0, 1.0)
    with pytest.raises(TypeError, match="fisher_f is a single tensor"):
        dampen.dampen_([w], [torch.ones(2, 3)], torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(TypeError, match=r"F_D of params\[0\] must be a torch.Tensor, got list"):
        dampen.dampen_([w], [[1.0, 2.0, 3.0]], [torch.ones(2, 3)], 1.0, 1.0)
    assert torch.equal(w, torch.ones(2, 3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_iterators_are_read_once(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    thetas = [torch.ones(5), torch.ones(3)]
    fds = [torch.ones(5), torch.ones(3)]
    ffs = [torch.full((5,), 4.0), torch.full((3,), 4.0)]
    for _ in range(2):  # the second call finds its plan cached
        n = dampen.dampen_(iter(thetas), iter(fds), iter(ffs), alpha=1.0, lam=0.5, backend=backend)
        assert n == 8
    assert torch.equal(thetas[0], torch.full((5,), 0.125**2)) and torch.equal(thetas[1], torch.full((3,), 0.125**2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dampen_exact_tie_is_not_selected(device: torch.device, backend: str) -> None:
    """F_f == alpha * F_D exactly (fp32) is not selected (strict >), also fp32."""
    theta = torch.tensor([3.0, 3.0], device=device)
    fd, ff = torch.tensor([1.0, 1.0], device=device), torch.tensor([2.0, 4.0], device=device)
    assert dampen.dampen_([theta], [fd], [ff], alpha=2.0, lam=1.0, backend=backend) == 1
    assert theta.tolist() == [3.0, 0.75]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dampen_refuses_a_parameter_passed_as_a_F_D_tensor(device: torch.device, backend: str) -> None:
    first, theta = torch.ones(3, device=device), torch.full((3,), 4.0, device=device)
    fds, ffs = [torch.zeros(3, device=device), theta], [torch.ones(3, device=device)] * 2
    with pytest.raises(ValueError, match=r"params\[1\] is also passed as a F_D tensor"):
        dampen.dampen_([first, theta], fds, [ffs[0], ffs[1].clone()], 0.1, 0.5, backend=backend)
    assert torch.equal(first, torch.ones(3, device=device))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dampen_refuses_a_broadcastable_F_f(device: torch.device, backend: str) -> None:
    theta = torch.ones(3, device=device)
    with pytest.raises(ValueError, match="shape"):
        dampen.dampen_([theta], [torch.ones(3, device=device)], [torch.full((1,), 5.0, device=device)], 1.0, 1.0,
                       backend=backend)
    assert torch.equal(theta, torch.ones(3, device=device))


def test_dampen_error_names_the_key_of_this_call_after_a_cached_plan(device: torch.device) -> None:
    dampen._PLANS.clear()
    t, fd, ff = torch.ones(4, device=device), torch.ones(4, device=device), torch.ones(4, device=device)
    dampen.dampen_({"a": t}, {"a": fd}, {"a": ff}, 1.0, 1.0, backend="triton")
    ff[0] = float("nan")
    with pytest.raises(ValueError, match="F_f of b;"):
        dampen.dampen_({"b": t}, {"b": fd}, {"b": ff}, 1.0, 1.0, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dampen_takes_several_empty_parameters(device: torch.device, backend: str) -> None:
    thetas = [torch.zeros(0, device=device), torch.zeros(0, device=device), torch.ones(2, device=device)]
    fds = [torch.zeros(t.shape, device=device) for t in thetas]
    ffs = [torch.ones(t.shape, device=device) for t in thetas]
    assert dampen.dampen_(thetas, fds, ffs, 1.0, 1.0, backend=backend) == 2


def test_dampen_float16_on_the_triton_path(device: torch.device) -> None:
    thetas = [torch.randn(s, device=device).half() for s in [(7,), (1025,)]]
    fds = [torch.rand(t.shape, device=device).half() for t in thetas]
    ffs = [(torch.rand(t.shape, device=device) * 4).half() for t in thetas]
    ref = [t.clone() for t in thetas]
    assert dampen.dampen_(thetas, fds, ffs, 2.0, 1.5, backend="triton") == dampen.dampen_reference_(ref, fds, ffs, 2.0, 1.5)
    for got, r in zip(thetas, ref, strict=True):
        torch.testing.assert_close(got, r, rtol=2**-9, atol=0)
