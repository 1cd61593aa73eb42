"""Selective Synaptic Dampening's select-and-dampen step over all parameters in one pass.

SSD (Foster et al., "Fast Machine Unlearning Without Retraining Through Selective
Synaptic Dampening", AAAI 2024) compares the diagonal Fisher information of the
forget set ``F_f`` with that of the full training data ``F_D`` element by element
and shrinks the parameters that matter much more to the forget set::

    selected = F_f > alpha * F_D  and  F_f > 0
    theta    = theta * min(lam * F_D / F_f, 1)      where selected

Edge cases: ``F_f = 0`` is never selected (no division by zero); ``F_D = 0`` with
``F_f > 0`` is selected with factor 0, so theta becomes 0, as in the reference code.
A NaN or infinity in any theta, F_D or F_f raises ValueError naming the tensor and
leaves every parameter as it was. Arithmetic is fp32 whatever the storage dtype.

Bad arguments are refused before any parameter changes: ``alpha`` and ``lam`` must
be finite and >= 0 (ValueError; the paper's are positive, 0 is their limit), and
every tensor must be floating point (TypeError naming it; the Triton path takes
fp32, bf16 and fp16, the reference any floating dtype).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from . import _dispatch
from ._dispatch import Backend

__all__ = ["DampenPlan", "dampen_", "dampen_reference_"]

tl: Any = None  # triton.language once a kernel is built (see _dispatch.TritonKernel)

Tensors = _dispatch.Tensors


def _as_lists(
    params: Tensors, fisher_d: Tensors, fisher_f: Tensors
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    keys, (thetas, fds, ffs) = _dispatch.parallel_lists(
        "dampen_", {"params": params, "fisher_d": fisher_d, "fisher_f": fisher_f}
    )
    names = keys if keys is not None else [f"params[{k}]" for k in range(len(thetas))]
    for name, theta, fd, ff in zip(names, thetas, fds, ffs, strict=True):
        for label, t in (("", theta), ("F_D of ", fd), ("F_f of ", ff)):
            _dispatch.check_floating("dampen_", f"{label}{name}", t, "no parameter was changed")
    _dispatch.refuse_repeats("dampen_", names, thetas)
    _dispatch.refuse_overlaps("dampen_", names, thetas, "no parameter was changed")
    ptr = torch.Tensor.data_ptr
    shared = set(map(ptr, thetas)) & (set(map(ptr, fds)) | set(map(ptr, ffs))) - {0}  # C-level sweeps
    if shared:
        for name, theta in zip(names, thetas, strict=True):
            if theta.numel() and theta.data_ptr() in shared:
                label = "F_D" if any(t.data_ptr() == theta.data_ptr() for t in fds) else "F_f"
                raise ValueError(
                    f"dampen_: {name} is also passed as a {label} tensor; dampening it would change the "
                    f"importances it is selected by (pass a copy); no parameter was changed"
                )
    for name, theta, fd, ff in zip(names, thetas, fds, ffs, strict=True):
        if theta.shape != fd.shape or theta.shape != ff.shape:
            raise ValueError(
                f"dampen_: {name} has shape {tuple(theta.shape)} but its Fisher tensors "
                f"have {tuple(fd.shape)} and {tuple(ff.shape)}"
            )
        if fd.device != theta.device or ff.device != theta.device:
            raise ValueError(f"dampen_: {name} and its Fisher tensors are on different devices")
    return names, thetas, fds, ffs


def _nonfinite_error(
    name: str, theta: torch.Tensor, fd: torch.Tensor, ff: torch.Tensor
) -> ValueError:
    which = [
        label
        for label, t in (("theta", theta), ("F_D", fd), ("F_f", ff))
        if not bool(torch.isfinite(t).all())
    ]
    return ValueError(
        f"dampen_: non-finite values in {', '.join(which)} of {name}; no parameter was changed"
    )


def _first_nonfinite(tensors: list[torch.Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or an infinity, or None.

    A tensor's sum is finite when all its elements are, unless it overflows: the sums
    (one reduction per tensor, read back together) screen the tensors, and only a
    tensor whose sum is not finite is checked element by element. That is 5x faster
    on the CPU than an element-wise check of every tensor.
    """
    sums = [t.sum(dtype=torch.float32) for t in tensors]
    if len({s.device for s in sums}) > 1:  # parameters spread over several devices
        sums = [s.cpu() for s in sums]
    suspects = torch.nonzero(~torch.stack(sums).isfinite()).flatten().tolist() if sums else []
    return next((k for k in suspects if not bool(torch.isfinite(tensors[k]).all())), None)


#: the largest alpha or lam: the kernels compare in fp32, where a larger one is infinite (inf * 0 = NaN)
MAX_SCALAR = float(torch.finfo(torch.float32).max)


def _check_scalars(alpha: float, lam: float) -> tuple[float, float]:
    """SSD's selection threshold ``alpha`` and dampening constant ``lam`` are positive
    (Foster et al., 2024); 0 is allowed as a limit: ``alpha = 0`` selects every element
    with ``F_f > 0`` and ``lam = 0`` zeroes the selected ones. Returns them as floats."""
    for name, value in (("alpha", alpha), ("lam", lam)):
        try:
            if isinstance(value, (str, bytes, bool)):
                raise TypeError
            number = float(value)  # a Python or NumPy number, a one-element tensor or array
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"dampen_: {name} must be a real number, got {value!r}") from None
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"dampen_: {name} must be finite and >= 0, got {name}={value}")
        if number > MAX_SCALAR:
            raise ValueError(f"dampen_: {name} must be at most {MAX_SCALAR:.4g} (fp32's largest), got {name}={value}")
    return float(alpha), float(lam)


@torch.no_grad()
def dampen_reference_(
    params: Tensors, fisher_d: Tensors, fisher_f: Tensors, alpha: float, lam: float
) -> int:
    """Plain-torch :func:`dampen_`: validates every tensor, then dampens them one by one."""
    alpha, lam = _check_scalars(alpha, lam)
    return _dampen_lists(*_as_lists(params, fisher_d, fisher_f), alpha, lam)


def _dampen_lists(
    names: list[str],
    thetas: list[torch.Tensor],
    fds: list[torch.Tensor],
    ffs: list[torch.Tensor],
    alpha: float,
    lam: float,
) -> int:
    bad = _first_nonfinite([t for row in zip(thetas, fds, ffs, strict=True) for t in row])
    if bad is not None:
        k = bad // 3
        raise _nonfinite_error(names[k], thetas[k], fds[k], ffs[k])
    counts = []
    for theta, fd, ff in zip(thetas, fds, ffs, strict=True):
        fd32, ff32 = fd.float(), ff.float()
        selected = (ff32 > alpha * fd32) & (ff32 > 0)
        factor = torch.clamp(lam * fd32 / ff32, max=1.0)
        theta.mul_(torch.where(selected, factor, 1.0))  # in fp32, rounded once to theta's dtype
        counts.append(selected.sum())
    return sum(int(c) for c in counts)  # read back once all updates are queued


@_dispatch.triton_kernel
def _dampen_kernel(
    theta_addrs,
    fd_addrs,
    ff_addrs,
    numels,
    block_first,
    block_tensor,
    backup_ptr,
    counts_ptr,
    alpha,
    lam,
    THETA: tl.constexpr,
    FD: tl.constexpr,
    FF: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    RESTORE: tl.constexpr,
):
    # Every lane decides alone (no block-wide reduction before the writes): a
    # selected theta is saved to its lane's slot of the backup (BLOCK slots per
    # program) and dampened. The selection reads only F_D and F_f, so RESTORE
    # replays it exactly and writes the backup back. A block adds its numbers of
    # selected and non-finite elements to counts[0] and counts[1] (int64).
    pid = tl.program_id(0)
    k = tl.load(block_tensor + pid)
    start = (pid - tl.load(block_first + k)) * BLOCK
    n = tl.load(numels + k)
    theta_ptr = tl.load(theta_addrs + k).to(tl.pointer_type(THETA))
    fd_ptr = tl.load(fd_addrs + k).to(tl.pointer_type(FD))
    ff_ptr = tl.load(ff_addrs + k).to(tl.pointer_type(FF))
    if ALIGNED:
        theta_ptr = tl.multiple_of(theta_ptr, 16)
        fd_ptr = tl.multiple_of(fd_ptr, 16)
        ff_ptr = tl.multiple_of(ff_ptr, 16)
    offs = start + tl.arange(0, BLOCK)
    theta_ptr += offs
    fd_ptr += offs
    ff_ptr += offs
    if start + BLOCK <= n:  # unmasked, so that the loads vectorise
        in_range = tl.full((BLOCK,), 1, tl.int1)
        fd = tl.load(fd_ptr).to(tl.float32)
        ff = tl.load(ff_ptr).to(tl.float32)
    else:
        in_range = offs < n
        fd = tl.load(fd_ptr, mask=in_range, other=0.0).to(tl.float32)
        ff = tl.load(ff_ptr, mask=in_range, other=0.0).to(tl.float32)
    selected = (ff > alpha * fd) & (ff > 0.0) & in_range
    backup = backup_ptr + pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if RESTORE:
        tl.store(theta_ptr, tl.load(backup, mask=selected), mask=selected)
    else:
        if start + BLOCK <= n:
            raw = tl.load(theta_ptr)
        else:
            raw = tl.load(theta_ptr, mask=in_range, other=0.0)
        theta = raw.to(tl.float32)
        inf = float("inf")
        finite = (tl.abs(theta) < inf) & (tl.abs(fd) < inf) & (tl.abs(ff) < inf)
        factor = tl.minimum(tl.math.div_rn(lam * fd, tl.where(ff > 0.0, ff, 1.0)), 1.0)
        tl.store(backup, raw, mask=selected)
        tl.store(theta_ptr, (theta * factor).to(THETA), mask=selected)
        n_selected = tl.reduce(selected.to(tl.int64), 0, tl.standard._sum_combine)
        n_bad = tl.reduce((~finite & in_range).to(tl.int64), 0, tl.standard._sum_combine)
        if n_selected > 0:
            tl.atomic_add(counts_ptr, n_selected, sem="relaxed")
        if n_bad > 0:
            tl.atomic_add(counts_ptr + 1, n_bad, sem="relaxed")


@torch.no_grad()
def dampen_(
    params: Tensors,
    fisher_d: Tensors,
    fisher_f: Tensors,
    alpha: float,
    lam: float,
    *,
    backend: Backend = "auto",
) -> int:
    """Dampen ``params`` in place where the forget-set Fisher ``fisher_f`` dominates ``fisher_d``.

    ``params``, ``fisher_d`` and ``fisher_f`` are parallel sequences of same-shaped
    tensors, or mappings keyed by parameter name (``params``'s keys are used). Returns
    the number of selected (dampened) elements. See the module docstring for the rule
    and its edge cases. ``dampen_(p, fd, ff, alpha, lam)`` is
    ``DampenPlan(p, fd, ff)(alpha, lam)``.
    """
    alpha, lam = _check_scalars(alpha, lam)
    keys, (thetas, fds, ffs) = _dispatch.parallel_lists(
        "dampen_", {"params": params, "fisher_d": fisher_d, "fisher_f": fisher_f}
    )

    def read() -> tuple[Tensors, Tensors, Tensors]:
        """The arguments as read (the caller's may be iterators, read once), by name if they were mappings."""
        if keys is None:
            return thetas, fds, ffs
        return tuple(dict(zip(keys, t, strict=True)) for t in (thetas, fds, ffs))  # type: ignore[return-value]

    first = thetas[0] if thetas else None
    if first is not None and not isinstance(first, torch.Tensor):
        _as_lists(*read())  # raises, naming it
    if _dispatch.surely_reference(backend, first):
        return dampen_reference_(*read(), alpha, lam)
    tensors = [*thetas, *fds, *ffs]
    try:
        signature = _dispatch.signature(tensors)
    except TypeError:  # something other than a tensor among them
        return DampenPlan(*read(), backend=backend)(alpha, lam)  # raises, saying why
    key = (backend, _dispatch.interpreter_enabled(), tuple(keys or ()), signature)
    cached = _PLANS.get(key) if signature is not None else None
    if cached is None:
        plan = DampenPlan(*read(), backend=backend)
        reusable = plan.without_tensors()
        if reusable is not None and signature is not None:
            _PLANS.put(key, reusable)
        return plan(alpha, lam)
    return cached.apply(thetas, fds, ffs, alpha, lam)


_PLANS = _dispatch.PlanCache()

class DampenPlan:
    """:func:`dampen_` for fixed tensors, validated once and applied any number of times.

    Validation (shapes, devices, dtypes) and the pointer tables are Python work over
    every tensor; a plan does them once, so that repeated dampening of the same tensors
    (an SSD sweep over ``alpha`` and ``lam`` on restored weights, or a benchmark) costs
    one kernel launch per dtype group and one read-back of the counts.

    The Triton path reads theta, F_D and F_f once and writes only the selected theta,
    saving their originals to a scratch buffer, so that a non-finite value found
    anywhere is undone without a second reading pass before the writes.
    """

    def __init__(
        self,
        params: Tensors,
        fisher_d: Tensors,
        fisher_f: Tensors,
        *,
        backend: Backend = "auto",
        config: _dispatch.LaunchConfig | None = None,
    ):
        self.names, self.thetas, self.fds, self.ffs = _as_lists(params, fisher_d, fisher_f)
        self.backend = _dispatch.resolve_backend(
            "dampen_", backend, self.thetas + self.fds + self.ffs
        )
        self.config = config or _dispatch.elementwise_config()
        self.groups: list[_dispatch.TensorGroup] = []
        self.metas: list[dict[str, Any]] = []  # each group's compile-time launch arguments
        if self.backend == "triton":
            self.groups = _dispatch.group_tensors(
                [self.thetas, self.fds, self.ffs], self.config.block
            )
            # Built before any launch: an unsupported dtype (TypeError) then changes nothing.
            self.metas = [
                dict(
                    THETA=_dispatch.triton_dtype(g.dtypes[0]),
                    FD=_dispatch.triton_dtype(g.dtypes[1]),
                    FF=_dispatch.triton_dtype(g.dtypes[2]),
                    BLOCK=self.config.block,
                    ALIGNED=g.table.aligned,
                    num_warps=self.config.num_warps,
                )
                for g in self.groups
            ]

    def __call__(self, alpha: float, lam: float) -> int:
        return self.apply(self.thetas, self.fds, self.ffs, alpha, lam)

    def without_tensors(self) -> DampenPlan | None:
        """A copy of this plan that holds no tensor, for :data:`_PLANS`; None when a
        launch group works on contiguous copies made for this plan only."""
        groups = [g.without_tensors() for g in self.groups]
        if any(g is None for g in groups):
            return None
        plan = copy.copy(self)
        plan.thetas = plan.fds = plan.ffs = []
        plan.groups = groups  # type: ignore[assignment]
        return plan

    @torch.no_grad()
    def apply(
        self,
        thetas: list[torch.Tensor],
        fds: list[torch.Tensor],
        ffs: list[torch.Tensor],
        alpha: float,
        lam: float,
    ) -> int:
        """Dampen ``thetas``: the plan's tensors, or tensors of its exact signature."""
        alpha, lam = _check_scalars(alpha, lam)
        if self.backend == "torch":
            return _dampen_lists(self.names, thetas, fds, ffs, alpha, lam)
        if not self.groups:
            return 0
        device = thetas[0].device
        counts = torch.zeros(2, dtype=torch.int64, device=device)  # selected, non-finite
        launches = []
        with _dispatch.device_guard(device):
            for group, meta in zip(self.groups, self.metas, strict=True):
                args = kernel_arguments(group, meta["BLOCK"], counts, float(alpha), float(lam))
                _dampen_kernel[(group.table.n_blocks,)](*args, RESTORE=False, **meta)
                launches.append((group, args, meta))
            selected, bad = counts.tolist()
            if bad:
                for group, args, meta in launches:
                    _dampen_kernel[(group.table.n_blocks,)](*args, RESTORE=True, **meta)
                first = _first_nonfinite([t for row in zip(thetas, fds, ffs, strict=True) for t in row])
                if first is None:  # the screen reads what the kernel read: not expected
                    raise ValueError("dampen_: non-finite values; no parameter was changed")
                k = first // 3
                raise _nonfinite_error(self.names[k], thetas[k], fds[k], ffs[k])
        for group, *_ in launches:
            group.write_back(thetas)
        return selected


def kernel_arguments(
    group: _dispatch.TensorGroup, block: int, counts: torch.Tensor, alpha: float, lam: float
) -> tuple[Any, ...]:
    """The positional arguments of one group's :func:`_dampen_kernel` launch, with a
    fresh undo buffer (``block`` slots per program) and the int64 ``counts`` of
    selected and non-finite elements that the launch adds to."""
    table = group.table
    backup = torch.empty(table.n_blocks * block, dtype=group.dtypes[0], device=counts.device)
    return (*table.addrs, table.numels, table.block_first, table.block_tensor, backup, counts, alpha, lam)
