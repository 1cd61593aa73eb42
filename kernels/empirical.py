"""Diagonal empirical Fisher information of a model (Kirkpatrick et al., 2017, EWC).

Batch mode squares batch gradients, as the SSD (Foster et al., AAAI 2024) and EWC
reference codes do; per-sample mode is exact for Linear layers through
:func:`~contlearn.kernels.per_sample.per_sample_linear`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from ._dispatch import Backend
from .accumulate import accumulate_
from .per_sample import per_sample_linear, per_sample_linear_bias

__all__ = ["FisherMode", "empirical_fisher", "fisher_sums"]

#: how the Fisher is estimated: squared batch gradients, or exact per-sample ones
FisherMode = Literal["batch", "per_sample"]


def _unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if hasattr(batch, "x") and hasattr(batch, "y"):
        return batch.x, batch.y
    raise TypeError(
        f"empirical_fisher: a batch must be an (x, y, ...) sequence or have .x and .y, got {type(batch)}"
    )


def _leading_size(value: Any) -> int | None:
    """The batch size of an input: the leading dimension of its first tensor (inside
    a mapping or sequence too); None without one."""
    if torch.is_tensor(value):
        return value.shape[0] if value.dim() > 0 else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        size = _leading_size(item)
        if size is not None:
            return size
    return None


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if torch.is_tensor(value) else value


class _GradTap(torch.autograd.Function):
    """Identity whose backward stores the gradient reaching it in ``record[1]``.

    A tensor hook on the Linear output would be lost when the output is a view that a
    later op modifies in place (``relu_`` on a [B, T, O] output); the copy made here
    is an ordinary tensor, so in-place ops after it are chained behind this node.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, record: list) -> torch.Tensor:
        ctx.record = record
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.record[1] = grad.detach()
        return grad, None


def is_per_sample_linear(module: nn.Module) -> bool:
    """Whether per-sample mode taps ``module``: an ``nn.Linear``, or a module whose
    class sets ``per_sample_linear = True`` to say that its forward is
    ``F.linear(input, self.weight, self.bias)`` of its first argument (contlearn's
    incremental classifier heads). Both are judged by the class that defines
    ``forward``: a subclass with a forward of its own (a LoRA layer, a cosine
    head) is not tapped unless it sets the mark too."""
    owner = next((c for c in type(module).__mro__ if "forward" in vars(c)), None)
    return owner is nn.Linear or (owner is not None and vars(owner).get("per_sample_linear") is True)


class _LinearTaps:
    """Records each call's input and output gradient of the model's Linear layers."""

    def __init__(self, model: nn.Module, trainable: set[int]):
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self.modules = [
            m
            for m in model.modules()
            if is_per_sample_linear(m)
            and any(id(p) in trainable for p in m.parameters(recurse=False))
        ]
        # Only weight and bias are computed per sample; any other parameter of a tapped
        # layer (old-style weight_norm's weight_g and weight_v) falls back to batch mode.
        self.exclusive = {
            id(p)
            for m in self.modules
            for p in (m.weight, getattr(m, "bias", None))
            if isinstance(p, nn.Parameter) and owners.get(id(p)) == 1 and id(p) in trainable
        }
        self.calls: dict[nn.Module, list[list[torch.Tensor | None]]] = {m: [] for m in self.modules}
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]

    def _hook(
        self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor | None:
        a = args[0] if args else kwargs["input"]
        record: list[torch.Tensor | None] = [a.detach(), None]
        self.calls[module].append(record)
        return _GradTap.apply(output, record) if output.requires_grad else None

    def fired(self) -> frozenset[nn.Module]:
        return frozenset(m for m, calls in self.calls.items() if calls)

    def stacked(
        self, module: nn.Module, batch_size: int | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Inputs [B, T, I] and output gradients [B, T, O] of every call, calls along T."""
        pairs = [(a, d) for a, d in self.calls[module] if a is not None and d is not None]  # a: the input, always set
        if not pairs:
            return None
        for a, _ in pairs:
            if a.dim() < 2 or (batch_size is not None and a.shape[0] != batch_size):
                raise ValueError(
                    f"empirical_fisher(per_sample): a Linear layer saw input {tuple(a.shape)}; per-sample mode "
                    f"needs the batch ({batch_size} samples) as the leading dimension of every Linear input"
                )
        b = pairs[0][0].shape[0]
        a_all = torch.cat([a.reshape(b, -1, a.shape[-1]) for a, _ in pairs], dim=1)
        d_all = torch.cat([d.reshape(b, -1, d.shape[-1]) for _, d in pairs], dim=1)
        return a_all, d_all

    def drop_functional_uses(self, loss: torch.Tensor, modules: Iterable[nn.Module] | None = None) -> None:
        """Leave to batch mode a tapped parameter that ``loss`` also uses outside its
        layer's forward (``x @ layer.weight.T`` elsewhere in the model): the taps see
        only the forward's share of its per-sample gradient. Every use is one edge
        into the parameter's gradient accumulator in the autograd graph, and every
        forward call one; more edges than calls is a use the taps miss. ``modules``:
        only these layers' parameters are judged (default: every tapped layer)."""
        judged = self.modules if modules is None else list(modules)
        calls = {id(p): len(self.calls[m]) for m in judged for p in m.parameters(recurse=False)}
        edges = dict.fromkeys(self.exclusive & calls.keys(), 0)
        seen: set[Any] = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for child, _ in node.next_functions:
                variable = getattr(child, "variable", None)
                if variable is not None and id(variable) in edges:
                    edges[id(variable)] += 1
                stack.append(child)
        self.exclusive -= {k for k, n in edges.items() if n > calls[k]}

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any, Any], torch.Tensor],
    mode: FisherMode = "batch",
    *,
    backend: Backend = "auto",
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher information of ``model``'s trainable parameters over ``batches``.

    Batch protocol: each item of ``batches`` is an ``(x, y, ...)`` tuple/list or an
    object with ``.x`` and ``.y``; tensors among x and y are moved to the device of the
    model's first trainable parameter. ``loss_fn(model, x, y)`` returns the scalar MEAN
    over the batch of the per-sample losses (e.g. ``F.cross_entropy(model(x), y)``).

    ``mode="batch"`` (the SSD and EWC reference codes): with ``L_k`` the mean loss of
    batch k of K, ``F = (1/K) sum_k (dL_k/dtheta)**2``.

    ``mode="per_sample"``: the standard empirical Fisher ``F = (1/N) sum_n
    (dl_n/dtheta)**2`` over all N samples, with ``l_n`` the per-sample loss, computed
    exactly for the parameters of ``nn.Linear`` modules (and of modules marked as
    linear, :func:`is_per_sample_linear`: contlearn's incremental heads, each task's
    head of a multi-head model) called through their forward (hooks record inputs
    and output gradients; since ``L_k`` is a mean over B_k samples, ``dl_n/dtheta =
    B_k * dL_k/dtheta`` restricted to sample n). Parameters of other modules
    (convolutions, cosine heads), Linear layers bypassed by functional calls (e.g.
    ``nn.MultiheadAttention.out_proj``), parameters shared between modules and
    parameters that the loss also uses outside their layer's forward (found in the
    first batch's autograd graph) fall back to the batch-mode formula, which is
    smaller in scale: at most the per-sample value, about 1/B of it for uncorrelated
    per-sample gradients, without a lower bound where gradients cancel in a batch.
    Per-sample mode assumes samples do not interact (BatchNorm in eval mode) and that
    the batch is the leading dimension of every Linear input. An empty batch (no
    samples in the inputs' first tensor) is a ValueError: it would count as a batch.

    Returns fp32 tensors keyed by ``model.named_parameters()`` names (only those with
    ``requires_grad``; a model with none raises ValueError). The model's mode is left as the caller set it and no ``.grad``
    is written (gradients come from ``torch.autograd.grad``).
    """
    sums, divisors, _ = fisher_sums(model, batches, loss_fn, mode, backend=backend)
    for name, value in sums.items():
        value /= divisors[name]
    return sums


def fisher_sums(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any, Any], torch.Tensor],
    mode: FisherMode = "batch",
    *,
    backend: Backend = "auto",
) -> tuple[dict[str, torch.Tensor], dict[str, int], frozenset[str]]:
    """The sums of squared gradients behind :func:`empirical_fisher`, by
    parameter name what divides each (the number of samples for a parameter
    computed per sample, of batches otherwise), and the names of the parameters
    computed per sample. Sums and divisors of disjoint shares of the batches add
    up to those of all of them (a Fisher pass shared out between processes)."""
    if mode not in ("batch", "per_sample"):
        raise ValueError(f"empirical_fisher: mode must be 'batch' or 'per_sample', got {mode!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"empirical_fisher: the model ({type(model).__name__}) has no trainable parameters "
            "(none with requires_grad=True), so there is no Fisher information to estimate"
        )
    device = named[0][1].device
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in named}
    taps = _LinearTaps(model, {id(p) for _, p in named}) if mode == "per_sample" else None
    per_sample_modules: frozenset[nn.Module] | None = None
    fallback_used: set[int] = set()  # parameters that got a batch-formula gradient so far
    n_batches = n_samples = 0
    try:
        for batch in batches:
            x, y = (_to(v, device) for v in _unpack(batch))
            batch_size = _leading_size(x)
            batch_size = _leading_size(y) if batch_size is None else batch_size
            if batch_size == 0:
                raise ValueError(f"empirical_fisher: batch {n_batches} is empty (it would count as a batch)")
            with torch.enable_grad():
                loss = loss_fn(model, x, y)
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise ValueError(
                    "empirical_fisher: loss_fn must return a scalar tensor (the batch-mean loss)"
                )
            if taps is None:
                _accumulate_batch(fisher, named, loss, backend)
            else:
                fired = taps.fired()
                if per_sample_modules is None:
                    per_sample_modules = fired
                    taps.drop_functional_uses(loss)
                elif not fired <= per_sample_modules:
                    # a layer first called now (a task's head): exact per sample from here, its earlier
                    # samples' gradients being 0, unless an earlier batch reached its weights another way
                    new = fired - per_sample_modules
                    reached = [m for m in new if any(id(p) in fallback_used for p in m.parameters(recurse=False))]
                    if reached:
                        raise RuntimeError(
                            f"empirical_fisher(per_sample): batch {n_batches} calls a Linear layer whose "
                            "parameters earlier batches reached without calling it (F.linear on its weight): "
                            "its per-sample gradients cannot be told apart"
                        )
                    per_sample_modules = per_sample_modules | new
                    taps.drop_functional_uses(loss, new)
                n_samples += _accumulate_per_sample(
                    fisher, named, taps, per_sample_modules, loss, batch_size, backend, fallback_used, n_batches
                )
                taps.clear()
            n_batches += 1
    finally:
        if taps is not None:
            taps.remove()
    if n_batches == 0:
        raise ValueError("empirical_fisher: batches yielded nothing")
    sample_params = _sample_params(taps, per_sample_modules)
    divisors = {n: n_samples if id(p) in sample_params else n_batches for n, p in named}
    return fisher, divisors, frozenset(n for n, p in named if id(p) in sample_params)


def _sample_params(taps: _LinearTaps | None, modules: frozenset[nn.Module] | None) -> set[int]:
    if taps is None or modules is None:
        return set()
    return {id(p) for m in modules for p in m.parameters(recurse=False) if id(p) in taps.exclusive}


def _accumulate_batch(
    fisher: dict[str, torch.Tensor],
    named: list[tuple[str, nn.Parameter]],
    loss: torch.Tensor,
    backend: Backend,
) -> None:
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    used = [(fisher[n], g) for (n, _), g in zip(named, grads, strict=True) if g is not None]
    accumulate_([f for f, _ in used], [g for _, g in used], backend=backend)


def _accumulate_per_sample(
    fisher: dict[str, torch.Tensor],
    named: list[tuple[str, nn.Parameter]],
    taps: _LinearTaps,
    modules: frozenset[nn.Module],
    loss: torch.Tensor,
    batch_size: int | None,
    backend: Backend,
    fallback_used: set[int],
    batch_index: int,
) -> int:
    sample_params = _sample_params(taps, modules)
    fallback = [(n, p) for n, p in named if id(p) not in sample_params]
    # Asking autograd for one parameter per tapped layer makes it run every output
    # hook while skipping those layers' batch weight-gradient GEMMs.
    anchored: list[tuple[nn.Module, nn.Parameter]] = []
    for m in modules:
        own = [p for p in (m.bias, m.weight) if isinstance(p, nn.Parameter) and id(p) in sample_params]
        anchored.extend((m, p) for p in own[:1])
    grads = torch.autograd.grad(loss, [p for _, p in fallback] + [p for _, p in anchored], allow_unused=True)
    fired = taps.fired()
    for (m, _), g in zip(anchored, grads[len(fallback):], strict=True):
        if g is not None and m not in fired:  # the taps saw no call, yet the loss reaches the layer
            raise RuntimeError(
                f"empirical_fisher(per_sample): batch {batch_index} uses a Linear layer's parameters without "
                "calling it (F.linear on its weight), after a batch that called it: its per-sample gradients "
                "cannot be told apart"
            )
    used = [
        (fisher[n], g)
        for (n, _), g in zip(fallback, grads[: len(fallback)], strict=True)
        if g is not None
    ]
    fallback_used.update(id(p) for (_, p), g in zip(fallback, grads[: len(fallback)], strict=True) if g is not None)
    accumulate_([f for f, _ in used], [g for _, g in used], backend=backend)

    names = {id(p): n for n, p in named}
    b = batch_size
    for m in modules:
        stacked = taps.stacked(m, batch_size)
        if stacked is None:
            continue
        a, d = stacked
        b = a.shape[0]
        if id(m.weight) in sample_params:
            fisher[names[id(m.weight)]] += per_sample_linear(a, d, backend=backend).mul_(b * b)
        if m.bias is not None and id(m.bias) in sample_params:
            fisher[names[id(m.bias)]] += per_sample_linear_bias(d, backend=backend).mul_(b * b)
    if b is None and sample_params:
        raise ValueError(
            "empirical_fisher(per_sample): cannot tell the batch size (x and y are not tensors)"
        )
    return b or 0
