"""accumulate_ and empirical_fisher against their references, hand computations and autograd."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from contlearn.kernels import accumulate, empirical, fisher
from torch import nn
from torch.nn import functional as F

from contlearn.models.heads import create_head

SIZES = [(1,), (7,), (1023,), (33, 31), (1025,), (4097,), (0,), (3, 5, 7)]


def _lists(device: torch.device, imp_dtype: torch.dtype, grad_dtype: torch.dtype):
    imps = [torch.rand(s, device=device).to(imp_dtype) for s in SIZES]
    grads = [torch.randn(s, device=device).to(grad_dtype) for s in SIZES]
    return imps, grads


@pytest.mark.parametrize(
    ("imp_dtype", "grad_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["fp32", "fp32+bf16grad", "bf16"],
)
def test_accumulate_matches_reference(
    device: torch.device, imp_dtype: torch.dtype, grad_dtype: torch.dtype
) -> None:
    imps, grads = _lists(device, imp_dtype, grad_dtype)
    want = [t.clone() for t in imps]
    fisher.accumulate_reference_(want, grads, scale=0.37)
    fisher.accumulate_(imps, grads, scale=0.37, backend="triton")
    for got, ref in zip(imps, want, strict=True):
        torch.testing.assert_close(got, ref)


def test_accumulate_is_one_launch_for_many_tensors(device: torch.device, count_launches) -> None:
    counter = count_launches(accumulate, "_accumulate_kernel")
    imps, grads = _lists(device, torch.float32, torch.float32)
    fisher.accumulate_(imps, grads, backend="triton")
    assert counter.launches == 1
    imps.append(torch.zeros(3, device=device, dtype=torch.bfloat16))
    grads.append(torch.ones(3, device=device))
    fisher.accumulate_(imps, grads, backend="triton")
    assert counter.launches == 3  # one more launch per extra dtype pair


def test_accumulate_fp32_sums_bf16_grads_in_fp32(device: torch.device) -> None:
    imp = torch.full((1000,), 256.0, device=device)
    grad = torch.full((1000,), 0.25, device=device, dtype=torch.bfloat16)
    for _ in range(4):
        fisher.accumulate_([imp], [grad], backend="triton")
    assert torch.all(imp == 256.25)  # 256 + 4/16 is exact in fp32, lost in bf16


def test_accumulate_non_contiguous_importance(device: torch.device) -> None:
    base = torch.zeros(13, 9, device=device)
    view = base.T
    grad = torch.randn(9, 13, device=device)
    fisher.accumulate_([view], [grad], backend="triton")
    torch.testing.assert_close(base, grad.square().T)


def test_accumulate_argument_errors() -> None:
    with pytest.raises(ValueError, match="got 2 importances, 1 grads"):
        fisher.accumulate_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)])
    with pytest.raises(ValueError, match=r"importances\[0\]"):
        fisher.accumulate_([torch.zeros(2)], [torch.zeros(3)])


# --------------------------------------------------------------------------- empirical_fisher


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def _xent(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def test_batch_mode_matches_hand_computation() -> None:
    model = nn.Linear(2, 1)
    w, c = model.weight.detach()[0].clone(), model.bias.detach()[0].clone()
    batches = [(torch.randn(4, 2), torch.randn(4, 1)), (torch.randn(3, 2), torch.randn(3, 1))]
    want_w, want_c = torch.zeros(2), torch.zeros(())
    for x, y in batches:  # L = mean_b (w.x_b + c - y_b)**2
        r = x @ w + c - y[:, 0]
        want_w += (2 * (r[:, None] * x).mean(0)) ** 2
        want_c += (2 * r.mean()) ** 2
    got = fisher.empirical_fisher(model, batches, _mse, mode="batch")
    assert list(got) == ["weight", "bias"]
    torch.testing.assert_close(got["weight"], (want_w / 2)[None])
    torch.testing.assert_close(got["bias"], (want_c / 2).reshape(1))


class _LinearNet(nn.Module):
    """Linear layers only, one of them called twice and followed by an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.mid = nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 5]
        h = F.relu(self.inp(x), inplace=True)
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h).mean(1)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, kernel_size=3)
        self.head = nn.Linear(4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 2, 6]
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _per_sample_loop(model: nn.Module, batches, loss_fn) -> dict[str, torch.Tensor]:
    """(1/N) sum_n (d l_n / d theta)**2 with one backward pass per sample."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: torch.zeros_like(p) for n, p in named}
    count = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            grads = torch.autograd.grad(
                loss_fn(model, x[i : i + 1], y[i : i + 1]), [p for _, p in named], allow_unused=True
            )
            for (n, _), g in zip(named, grads, strict=True):
                if g is not None:  # a parameter the sample's loss does not use (another task's head): 0
                    out[n] += g**2
            count += 1
    return {n: v / count for n, v in out.items()}


def _batch_loop(model: nn.Module, batches, loss_fn) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: torch.zeros_like(p) for n, p in named}
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(model, x, y), [p for _, p in named])
        for (n, _), g in zip(named, grads, strict=True):
            out[n] += g**2
    return {n: v / len(batches) for n, v in out.items()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_sample_mode_matches_autograd_loop(device: torch.device, backend: str) -> None:
    model = _LinearNet().to(device)
    batches = [
        (torch.randn(b, 4, 5, device=device), torch.randint(0, 3, (b,), device=device))
        for b in (3, 2)
    ]
    got = fisher.empirical_fisher(model, batches, _xent, mode="per_sample", backend=backend)
    want = _per_sample_loop(model, batches, _xent)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_sample_mode_falls_back_to_batch_mode_for_conv(
    device: torch.device, backend: str
) -> None:
    model = _ConvNet().to(device)
    batches = [
        (torch.randn(b, 2, 6, device=device), torch.randint(0, 3, (b,), device=device))
        for b in (4, 3)
    ]
    got = fisher.empirical_fisher(model, batches, _xent, mode="per_sample", backend=backend)
    per_sample, batch = _per_sample_loop(model, batches, _xent), _batch_loop(model, batches, _xent)
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(got[name], per_sample[name], rtol=1e-4, atol=1e-7)
    for name in ("conv.weight", "conv.bias"):
        torch.testing.assert_close(got[name], batch[name], rtol=1e-4, atol=1e-7)


class _HeadNet(nn.Module):
    """A Linear body under one of contlearn's classifier heads, called with task labels."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.head = create_head(head, 6)
        if head == "multi":
            self.head.adapt([0, 1], 0)
            self.head.adapt([2, 3], 1)
        else:
            self.head.grow(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 6]; column 5 is the task label
        return self.head(torch.tanh(self.body(x[:, :5])), x[:, 5].long())


class _ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a LoRA-like layer: no longer F.linear alone
        return 2 * super().forward(x)


class _MarkedScaled(_ScaledLinear):
    per_sample_linear = True  # not on the class that defines forward: ignored


class _OwnLinear(nn.Module):
    """A third-party linear layer that vouches for its forward."""

    per_sample_linear = True

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(2, 2)), nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def test_which_modules_per_sample_mode_taps() -> None:
    tapped = [nn.Linear(2, 2), nn.MultiheadAttention(4, 2).out_proj, create_head("incremental", 2), _OwnLinear()]
    not_tapped = [create_head("cosine", 2), create_head("multi", 2), _ScaledLinear(2, 2), _MarkedScaled(2, 2),
                  nn.Conv1d(2, 2, 1)]
    assert [empirical.is_per_sample_linear(m) for m in tapped] == [True] * 4
    assert [empirical.is_per_sample_linear(m) for m in not_tapped] == [False] * 5


@pytest.mark.parametrize("head", ["incremental", "multi", "cosine"])
def test_per_sample_mode_is_exact_for_contlearn_heads_but_cosine(head: str) -> None:
    """EWC's per-sample Fisher must not give the head 1/B of its importance: incremental
    heads and each task's head of a multi-head are linear and tapped; a cosine head
    normalises its weight, so it falls back to batch mode (documented)."""
    torch.manual_seed(0)
    model = _HeadNet(head)
    x = torch.cat([torch.randn(8, 5), torch.tensor([0, 1] * 4, dtype=torch.float32)[:, None]], dim=1)
    y = torch.tensor([0, 2, 1, 3] * 2) if head == "multi" else torch.randint(0, 4, (8,))
    batches = [(x, y)]
    got = fisher.empirical_fisher(model, batches, _xent, mode="per_sample")
    per_sample, batch = _per_sample_loop(model, batches, _xent), _batch_loop(model, batches, _xent)
    exact = [n for n in got if n.startswith("body") or head != "cosine"]
    assert any(n.startswith("head") for n in exact) == (head != "cosine")
    for name in got:
        want = per_sample[name] if name in exact else batch[name]
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-7, msg=name)


def test_per_sample_mode_on_a_multi_head_model_in_training_with_one_task_per_batch() -> None:
    """In training a multi-head model runs only the heads of the batch's tasks: a
    batch without a task adds 0 to its head's per-sample sum, before or after the
    first batch that calls the head (exact; both were refused), in train and in
    eval mode (where every head runs)."""
    torch.manual_seed(0)
    model = _HeadNet("multi")
    assert model.training

    def batch(tasks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor(tasks, dtype=torch.float32)
        return torch.cat([torch.randn(len(tasks), 5), t[:, None]], dim=1), (2 * t).long() + torch.randint(0, 2, (len(tasks),))

    streams = {"mixed first": [batch([0, 1, 0, 1]), batch([0, 0, 0]), batch([1, 1])],
               "one task first": [batch([0, 0, 0]), batch([1, 1])]}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        for label, batches in streams.items():
            got = fisher.empirical_fisher(model, batches, _xent, mode="per_sample")
            want = _per_sample_loop(model, batches, _xent)
            assert float(got["head.heads.1.weight"].abs().sum()) > 0
            for name in got:
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=f"{mode}, {label}: {name}")


def test_leaves_grads_mode_and_frozen_params_alone() -> None:
    model = _ConvNet().eval()
    model.conv.bias.requires_grad_(False)
    sentinel = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = sentinel.clone()
    batches = [SimpleNamespace(x=torch.randn(3, 2, 6), y=torch.randint(0, 3, (3,)))]
    for mode in ("batch", "per_sample"):
        got = fisher.empirical_fisher(model, batches, _xent, mode=mode)
        assert list(got) == ["conv.weight", "head.weight", "head.bias"]
        assert all(v.dtype == torch.float32 for v in got.values())
    assert not model.training
    assert torch.equal(model.head.weight.grad, sentinel)
    assert model.conv.weight.grad is None and model.head.bias.grad is None
    assert not model.head._forward_hooks


def test_per_sample_with_shared_weight_falls_back() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied: its per-sample gradient spans two layers
    batches = [(torch.randn(3, 4), torch.randint(0, 4, (3,)))]
    got = fisher.empirical_fisher(model, batches, _xent, mode="per_sample")
    batch, per_sample = _batch_loop(model, batches, _xent), _per_sample_loop(model, batches, _xent)
    torch.testing.assert_close(got["0.weight"], batch["0.weight"])
    torch.testing.assert_close(got["2.bias"], per_sample["2.bias"])


class _ReusedWeight(nn.Module):
    """A layer called through its forward whose weight the model also uses directly."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h) + 0.5 * (h @ self.body.weight.T)[:, :3]


def test_per_sample_mode_leaves_a_weight_also_used_outside_its_layer_to_batch_mode() -> None:
    torch.manual_seed(0)
    model = _ReusedWeight()
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))), (torch.randn(3, 4), torch.randint(0, 3, (3,)))]
    got = fisher.empirical_fisher(model, batches, _xent, mode="per_sample")
    batch, per_sample = _batch_loop(model, batches, _xent), _per_sample_loop(model, batches, _xent)
    torch.testing.assert_close(got["body.weight"], batch["body.weight"])  # the taps would miss the second use
    for name in ("body.bias", "head.weight", "head.bias"):
        torch.testing.assert_close(got[name], per_sample[name], rtol=1e-4, atol=1e-7, msg=name)


def test_per_sample_mode_leaves_other_parameters_of_a_linear_layer_to_batch_mode() -> None:
    """Old-style weight_norm keeps nn.Linear's forward but trains weight_g and
    weight_v: they are not per-sample weights (they came back as 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API, still what some models use
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.utils.weight_norm(nn.Linear(4, 3)))
    batches = [(torch.randn(6, 5), torch.randint(0, 3, (6,)))]
    got = fisher.empirical_fisher(model, batches, _xent, mode="per_sample")
    batch, per_sample = _batch_loop(model, batches, _xent), _per_sample_loop(model, batches, _xent)
    for name in ("2.weight_g", "2.weight_v"):
        assert bool(got[name].abs().sum() > 0)
        torch.testing.assert_close(got[name], batch[name], msg=name)
    torch.testing.assert_close(got["2.bias"], per_sample["2.bias"])
    torch.testing.assert_close(got["0.weight"], per_sample["0.weight"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulate_refuses_an_expanded_importance_before_any_change(device: torch.device, backend: str) -> None:
    first = torch.zeros(3, device=device)
    wide = torch.zeros(1, device=device).expand(4)
    with pytest.raises(ValueError, match=r"importances\[1\] has elements that share memory.*no importance was changed"):
        fisher.accumulate_([first, wide], [torch.ones(3, device=device), torch.ones(4, device=device)], backend=backend)
    assert torch.equal(first, torch.zeros(3, device=device))


def test_empirical_fisher_argument_errors() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="mode"):
        fisher.empirical_fisher(model, [], _xent, mode="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="yielded nothing"):
        fisher.empirical_fisher(model, [], _xent)
    with pytest.raises(TypeError, match="batch must be"):
        fisher.empirical_fisher(model, [torch.randn(2, 2)], _xent)
    with pytest.raises(ValueError, match="scalar"):
        fisher.empirical_fisher(model, [(torch.randn(2, 2), None)], lambda m, x, y: m(x))
    batches = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1])), (torch.randn(0, 2), torch.zeros(0, dtype=torch.long))]
    by_key = [({"x": x}, None) for x, _ in batches]  # inputs in a mapping, no labels
    for mode in ("batch", "per_sample"):  # an empty batch would count as one: a Fisher too small by K/(K+1)
        with pytest.raises(ValueError, match="empirical_fisher: batch 1 is empty"):
            fisher.empirical_fisher(model, batches, _xent, mode=mode)
        with pytest.raises(ValueError, match="empirical_fisher: batch 1 is empty"):
            fisher.empirical_fisher(model, by_key, lambda m, x, y: m(x["x"]).square().mean(), mode=mode)
    # the inputs say how many samples a batch holds, not labels the loss ignores
    unlabelled = [(torch.randn(4, 2), torch.empty(0))]
    assert fisher.empirical_fisher(model, unlabelled, lambda m, x, y: m(x).square().mean())["weight"].abs().sum() > 0


def test_accumulate_reuses_a_plan_that_holds_no_tensor(device: torch.device) -> None:
    import gc
    import weakref

    accumulate._PLANS.clear()
    imps = [torch.zeros(s, device=device) for s in ((3,), (1025,), (4, 7))]
    grads = [torch.randn(s, device=device) for s in ((3,), (1025,), (4, 7))]
    for _ in range(3):
        fisher.accumulate_(imps, grads, 0.5, backend="triton")
    assert len(accumulate._PLANS._plans) == 1
    for imp, g in zip(imps, grads, strict=True):
        torch.testing.assert_close(imp, 1.5 * g * g, rtol=1e-6, atol=1e-7)
    grad = weakref.ref(grads[0])
    del grads
    gc.collect()
    assert grad() is None


# --------------------------------------------------------------------------- bad arguments and mappings


def _named(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    imps = {"enc.weight": torch.zeros(4, 3, device=device), "head.bias": torch.zeros(1025, device=device)}
    grads = {name: torch.randn(t.shape, device=device) for name, t in reversed(imps.items())}
    return imps, grads


def test_accumulate_takes_mappings() -> None:
    imps, grads = _named(torch.device("cpu"))
    grads["unused"] = torch.ones(2)  # grads may hold more names than importances
    want = {name: 0.5 * grads[name] ** 2 for name in imps}
    fisher.accumulate_(imps, grads, 0.5)
    ref = {name: torch.zeros_like(t) for name, t in imps.items()}
    fisher.accumulate_reference_(ref, grads, 0.5)
    for name in imps:
        torch.testing.assert_close(imps[name], want[name])
        torch.testing.assert_close(ref[name], want[name])


def test_accumulate_mappings_on_the_triton_path_reuse_a_plan(device: torch.device, count_launches) -> None:
    accumulate._PLANS.clear()
    counter = count_launches(accumulate, "_accumulate_kernel")
    imps, grads = _named(device)
    for _ in range(3):
        fisher.accumulate_(imps, grads, 0.5, backend="triton")
    assert counter.launches == 3 and len(accumulate._PLANS._plans) == 1
    for name, imp in imps.items():
        torch.testing.assert_close(imp, 1.5 * grads[name] ** 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["accumulate_", "accumulate_reference_"])
def test_accumulate_container_errors(op: str) -> None:
    fn = getattr(fisher, op)
    z, g = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="importances is a single tensor; pass lists of tensors or mappings"):
        fn(z, g)
    with pytest.raises(TypeError, match="grads is a single tensor"):
        fn([z], g)
    with pytest.raises(ValueError, match=r"grads has no entry for \['b'\]"):
        fn({"a": z, "b": z.clone()}, {"a": g})
    with pytest.raises(TypeError, match="importances is a mapping, so grads must be a mapping too"):
        fn({"a": z}, [g])
    with pytest.raises(TypeError, match="grads is a mapping, so importances must be a mapping too"):
        fn([z], {"a": g})
    with pytest.raises(TypeError, match=r"grads\[0\] must be a torch.Tensor, got list"):
        fn([z], [[1.0, 1.0, 1.0]])
    assert torch.equal(z, torch.zeros(3))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op", ["accumulate_", "accumulate_reference_"])
def test_accumulate_refuses_a_non_finite_scale(op: str, scale: float) -> None:
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=f"scale must be finite, got {scale}"):
        getattr(fisher, op)([z], [torch.ones(3)], scale)
    assert torch.equal(z, torch.zeros(3))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_accumulate_non_floating_tensors_fail_before_any_change(backend: str) -> None:
    imps = [torch.zeros(3), torch.zeros(3, dtype=torch.int64)]
    with pytest.raises(TypeError, match=r"importances\[1\] must be floating point, got torch.int64"):
        fisher.accumulate_(imps, [torch.ones(3), torch.ones(3)], backend=backend)
    imps = {"a": torch.zeros(3), "b": torch.zeros(3)}
    with pytest.raises(TypeError, match=r"grads\['b'\] must be floating point, got torch.bool"):
        fisher.accumulate_(imps, {"a": torch.ones(3), "b": torch.ones(3, dtype=torch.bool)}, backend=backend)
    assert all(torch.equal(t, torch.zeros(3)) for t in imps.values())


def test_accumulate_unsupported_dtype_on_triton_fails_before_any_launch(device: torch.device) -> None:
    imps = [torch.zeros(3, device=device), torch.zeros(3, device=device, dtype=torch.float64)]
    grads = [torch.ones(3, device=device), torch.ones(3, device=device, dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"accumulate_: backend='triton' takes float32, bfloat16 and float16 tensors, "
                                        r"got torch.float64; use backend='torch' or 'auto'"):
        fisher.accumulate_(imps, grads, backend="triton")
    assert torch.equal(imps[0], torch.zeros(3, device=device))  # the fp32 group was not launched first
    fisher.accumulate_(imps, grads, backend="auto")  # auto runs the reference for them, on a GPU too
    assert all(torch.equal(t, torch.ones(3, device=device, dtype=t.dtype)) for t in imps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulate_refuses_an_importance_passed_twice(device: torch.device, backend: str) -> None:
    z = torch.zeros(3, device=device)  # one launch would add both squares to it at once: a race
    with pytest.raises(ValueError, match=r"importances\[0\] and importances\[1\] are the same tensor"):
        fisher.accumulate_([z, z], [torch.ones(3, device=device)] * 2, backend=backend)
    assert torch.equal(z, torch.zeros(3, device=device))


def test_empirical_fisher_refuses_a_model_without_trainable_parameters() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"model \(Linear\) has no trainable parameters"):
        fisher.empirical_fisher(model, [(torch.randn(2, 2), torch.tensor([0, 1]))], _xent)


# ------------------------------------------------------------------ edges found by mutation testing


@pytest.mark.parametrize("n", [7, 1023, 1025])
def test_accumulate_writes_nothing_past_a_tensor_end(device: torch.device, n: int) -> None:
    """Kills tail-mask off-by-one mutants (offs <= n; full-block test start+BLOCK <= n+1):
    the importance is a view into a larger buffer, whose next element must stay 0."""
    base, gbase = torch.zeros(n + 64, device=device), torch.ones(n + 64, device=device)
    fisher.accumulate_([base[:n]], [gbase[:n]], backend="triton")
    assert bool(base[:n].eq(1).all()) and bool(base[n:].eq(0).all())


def test_accumulate_mixed_grad_dtypes_under_one_importance_dtype(device: torch.device) -> None:
    """fp32 importances (what empirical_fisher makes) with fp32 and bf16 grads in one
    list: each (imp, grad) dtype pair must get its own launch meta."""
    shapes = [(7,), (1025,), (33, 31), (5,)]
    imps = [torch.rand(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device).to(dt)
             for s, dt in zip(shapes, [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16], strict=True)]
    want = [t.clone() for t in imps]
    fisher.accumulate_reference_(want, grads, 0.37)
    fisher.accumulate_(imps, grads, 0.37, backend="triton")
    for got, ref in zip(imps, want, strict=True):
        torch.testing.assert_close(got, ref)


def test_accumulate_float16_on_the_triton_path(device: torch.device) -> None:
    imps = [torch.rand(s, device=device).half() for s in [(7,), (1025,)]]
    grads = [torch.randn(t.shape, device=device).half() for t in imps]
    want = [t.clone() for t in imps]
    fisher.accumulate_reference_(want, grads, 0.5)
    fisher.accumulate_(imps, grads, 0.5, backend="triton")
    for got, ref in zip(imps, want, strict=True):
        torch.testing.assert_close(got, ref)


def test_reference_applies_scale_to_every_tensor_of_a_mixed_dtype_list() -> None:
    imps = [torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)]
    fisher.accumulate_reference_(imps, [torch.ones(3), torch.ones(3)], 0.5)
    assert imps[0].tolist() == [0.5] * 3 and imps[1].tolist() == [0.5] * 3


def test_plan_cache_tells_apart_views_at_one_address(device: torch.device) -> None:
    """Same data_ptr and dtype, different shape: a cached plan must not be reused."""
    accumulate._PLANS.clear()
    base, g = torch.zeros(2048, device=device), torch.ones(2048, device=device)
    fisher.accumulate_([base[:8]], [g[:8]], backend="triton")
    fisher.accumulate_([base[:2000]], [g[:2000]], backend="triton")
    assert base[:8].eq(2).all() and base[8:2000].eq(1).all() and base[2000:].eq(0).all()


@pytest.mark.parametrize("mode", ["batch", "per_sample"])
def test_empirical_fisher_is_fp32_for_a_bf16_model(mode: str) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    batches = [(torch.randn(6, 4).bfloat16(), torch.randint(0, 3, (6,))) for _ in range(3)]
    got = fisher.empirical_fisher(model, batches, _xent, mode=mode)
    assert all(v.dtype == torch.float32 for v in got.values())


class _SeqFirst(nn.Module):
    """Applies its Linear to a [T, B, I] (sequence-first) tensor: batch not leading."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 4]
        return self.lin(x.transpose(0, 1)).mean(0)


def test_per_sample_refuses_a_linear_whose_input_is_not_batch_first() -> None:
    batches = [(torch.randn(3, 5, 4), torch.randint(0, 3, (3,)))]
    with pytest.raises(ValueError, match="leading dimension"):
        fisher.empirical_fisher(_SeqFirst(), batches, _xent, mode="per_sample")


class _LateHead(nn.Module):
    """Head 1 is first called in batch 2, where its weight is also used outside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.h0, self.h1 = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x[:, :4]))
        if float(x[0, 4]) == 0:
            return self.h0(h)
        return self.h1(h) + 0.5 * (h @ self.h1.weight.T)


def test_per_sample_judges_functional_uses_of_a_layer_first_called_later() -> None:
    torch.manual_seed(0)
    model = _LateHead()

    def batch(task: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([torch.randn(b, 4), torch.full((b, 1), float(task))], 1), torch.randint(0, 3, (b,))

    batches = [batch(0, 4), batch(1, 3)]
    got = fisher.empirical_fisher(model, batches, _xent, mode="per_sample")
    (g,) = torch.autograd.grad(_xent(model, *batches[1]), [model.h1.weight])
    torch.testing.assert_close(got["h1.weight"], g**2 / 2)  # batch formula over K = 2 batches


class _SometimesFunctional(nn.Module):
    """Calls its head in batches flagged 0, reaches the head's weight through F.linear in those flagged 1."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x[:, :4]))
        return self.head(h) if float(x[0, 4]) == 0 else F.linear(h, self.head.weight, self.head.bias)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_per_sample_refuses_a_layer_some_batches_reach_through_f_linear(order: tuple[int, int]) -> None:
    """The taps see a layer's calls only: per-sample gradients of the batches that
    bypass it cannot be told apart, whichever comes first."""
    torch.manual_seed(0)
    batches = [(torch.cat([torch.randn(3, 4), torch.full((3, 1), float(flag))], 1), torch.randint(0, 3, (3,)))
               for flag in order]
    with pytest.raises(RuntimeError, match=r"F\.linear on its weight"):
        fisher.empirical_fisher(_SometimesFunctional(), batches, _xent, mode="per_sample")
    assert fisher.empirical_fisher(_SometimesFunctional(), batches, _xent, mode="batch")  # batch mode is fine
