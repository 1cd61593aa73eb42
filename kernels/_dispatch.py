"""Backend choice, lazy Triton loading and multi-tensor launch tables for the kernels.

Triton is optional: nothing here imports it until a Triton kernel is launched. Kernel
bodies are plain functions handed to ``triton.jit`` at their first launch, so the
``TRITON_INTERPRET`` switch is read then and not when the module is imported. The
bodies call only Triton builtins: ``tl.sum`` and ``tl.zeros`` are themselves jitted
when Triton is imported, and then cannot run in an interpreter switched on later, so
sums are ``tl.reduce(x, axis, tl.standard._sum_combine)`` (what ``tl.sum`` expands
to) and zeros are ``tl.full``.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

_TRUTHY = {"1", "true", "on", "yes"}


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU (Triton's truthy values)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


@functools.cache
def _load_triton() -> tuple[ModuleType | None, str]:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising at import
        return None, f"{type(exc).__name__}: {exc}"
    return triton, ""


def triton_available() -> bool:
    """Whether ``import triton`` succeeds here."""
    return _load_triton()[0] is not None


def import_triton() -> ModuleType:
    """Return the ``triton`` module, or raise RuntimeError saying why it cannot be imported."""
    triton, reason = _load_triton()
    if triton is None:
        raise RuntimeError(f"triton is not importable ({reason})")
    return triton


#: the dtypes the Triton kernels load and store
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(
    op: str, backend: str, tensors: Sequence[torch.Tensor]
) -> Literal["triton", "torch"]:
    """Pick the implementation of ``op`` for ``tensors``.

    ``auto`` runs Triton when every tensor is on a CUDA device, of a dtype the kernels
    take (:data:`TRITON_DTYPES`) and Triton imports, and the torch reference otherwise.
    ``triton`` runs Triton on CUDA tensors, or on CPU tensors through the interpreter
    when ``TRITON_INTERPRET=1``; anything else raises RuntimeError saying why (TypeError
    for another dtype). ``torch`` always runs the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    devices = {t.device for t in tensors}
    kinds = {d.type for d in devices}
    others = sorted({str(t.dtype) for t in tensors if t.dtype not in TRITON_DTYPES})
    if backend == "auto":
        runs = kinds == {"cuda"} and len(devices) == 1 and not others and triton_available()
        return "triton" if runs else "torch"
    if others:
        raise TypeError(
            f"{op}: backend='triton' takes float32, bfloat16 and float16 tensors, got {', '.join(others)}; "
            f"use backend='torch' or 'auto'"
        )
    triton, reason = _load_triton()
    if triton is None:
        raise RuntimeError(
            f"{op}: backend='triton' requested but triton is not importable ({reason})"
        )
    if len(devices) > 1:
        raise RuntimeError(
            f"{op}: backend='triton' needs all tensors on one device, got {sorted(map(str, devices))}"
        )
    if kinds <= {"cuda"}:
        return "triton"
    if kinds == {"cpu"} and interpreter_enabled():
        return "triton"
    raise RuntimeError(
        f"{op}: backend='triton' cannot run on {sorted(kinds)} tensors: Triton needs CUDA tensors, "
        "or CPU tensors with TRITON_INTERPRET=1 in the environment (its interpreter)"
    )


def surely_reference(backend: str, first: torch.Tensor | None) -> bool:
    """Whether :func:`resolve_backend` would pick the torch reference, known from
    the first tensor alone (``auto`` runs Triton only when every tensor is on
    CUDA): lets an op skip its per-tensor work on the CPU."""
    return backend == "torch" or (backend == "auto" and (first is None or not first.is_cuda))


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching: Triton launches on the current CUDA device.
    (Entering ``torch.cuda.device`` costs a few microseconds; it is skipped when the
    device is current already.)"""
    if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class TritonKernel:
    """A kernel body that becomes a ``triton.jit`` function at its first launch.

    The module holding ``fn`` must define a global ``tl`` placeholder: it is bound to
    ``triton.language`` when the kernel is first built. ``autotune`` maps the triton
    module to the keyword arguments of ``triton.autotune``; it applies on the GPU only,
    and in the interpreter the launcher passes fixed block sizes instead (see
    :attr:`tuned`).
    """

    def __init__(
        self,
        fn: Callable[..., None],
        autotune: Callable[[ModuleType], dict[str, Any]] | None = None,
    ):
        self.fn = fn
        self.autotune = autotune
        self._built: dict[bool, Any] = {}
        # not a callable wrapper (launches go through __getitem__): only fn's name and doc are copied
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def build(self) -> Any:
        interpret = interpreter_enabled()
        kernel = self._built.get(interpret)
        if kernel is None:
            triton = import_triton()
            self.fn.__globals__["tl"] = triton.language
            kernel = triton.jit(self.fn)
            if self.autotune is not None and not interpret:
                kernel = triton.autotune(**self.autotune(triton))(kernel)
            self._built[interpret] = kernel
        return kernel

    @property
    def tuned(self) -> bool:
        """Whether launches on this machine go through ``triton.autotune``."""
        return self.autotune is not None and not interpreter_enabled()

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.build()[grid]


def triton_kernel(
    fn: Callable[..., None] | None = None,
    *,
    autotune: Callable[[ModuleType], dict[str, Any]] | None = None,
) -> Any:
    """Decorator form of :class:`TritonKernel`."""
    if fn is None:
        return lambda f: TritonKernel(f, autotune)
    return TritonKernel(fn, autotune)


@dataclass(frozen=True)
class LaunchConfig:
    """Elements per program and warps per program of the multi-tensor kernels."""

    block: int
    num_warps: int


def elementwise_config() -> LaunchConfig:
    """The multi-tensor kernels' launch shape: 1024 elements over 4 warps (8 per thread).

    ``benchmarks/kernels.py --sweep`` times 1024/4, 2048/4, 2048/8, 4096/4 and 8192/8.
    On an H100, dampening at 1024/4 took 0.538-0.549 ms in five runs, the fastest
    shape in four of them (2048/4: 0.594-0.607 ms; 0.522 ms once, in the first run);
    on an H200 the two tied. Accumulation runs at the copy's speed with any of
    them. The interpreter uses the same shape.
    """
    return LaunchConfig(1024, 4)


@dataclass
class LaunchTable:
    """Device-side description of a list of same-dtype tensors processed in one launch.

    Program ``p`` works on tensor ``block_tensor[p]``, elements
    ``[(p - block_first[k]) * block, ...)`` of it, reading each operand ``j`` at
    address ``addrs[j][k]``.
    """

    addrs: list[torch.Tensor]
    numels: torch.Tensor
    block_first: torch.Tensor
    block_tensor: torch.Tensor
    n_blocks: int
    aligned: bool


def launch_table(operands: Sequence[Sequence[torch.Tensor]], block: int) -> LaunchTable:
    """The pointer table for ``operands`` (lists of contiguous tensors, one list per operand).

    It travels to the device in one host-to-device copy, and the block->tensor map
    is expanded there, without a synchronisation. Tables are not cached here: the
    ops keep whole validated plans (:class:`PlanCache`), tables included.
    """
    numels = [t.numel() for t in operands[0]]
    addrs = [[t.data_ptr() for t in ops] for ops in operands]
    return _build_table(operands[0][0].device, addrs, numels, block)


def _build_table(
    device: torch.device, addrs: list[list[int]], numels: list[int], block: int
) -> LaunchTable:
    n = len(numels)
    blocks = [-(-m // block) for m in numels]
    block_first, nb = [], 0
    for b in blocks:
        block_first.append(nb)
        nb += b
    aligned = all(a % 16 == 0 for row in addrs for a in row)
    host = torch.tensor(
        [a for row in addrs for a in row] + numels + block_first + blocks,
        dtype=torch.int64,
    )
    meta = host.to(device, non_blocking=device.type == "cuda")
    rows = meta.view(len(addrs) + 3, n)
    block_tensor = torch.repeat_interleave(torch.arange(n, device=device), rows[-1], output_size=nb)
    return LaunchTable(
        addrs=[rows[j] for j in range(len(addrs))],
        numels=rows[-3],
        block_first=rows[-2],
        block_tensor=block_tensor,
        n_blocks=nb,
        aligned=aligned,
    )


def triton_dtype(dtype: torch.dtype) -> Any:
    """The ``triton.language`` dtype matching a floating torch dtype."""
    tl = import_triton().language
    table = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if dtype not in table:
        raise TypeError(f"unsupported dtype {dtype}; expected one of {list(table)}")
    return table[dtype]


@dataclass
class TensorGroup:
    """Tensors at positions ``index`` of the caller's lists, all with the same dtypes.

    ``operands[j]`` are contiguous tensors for operand ``j``: the caller's own where
    they are contiguous, contiguous copies otherwise. Operand 0 is the one written;
    :meth:`write_back` copies its copies back into the caller's tensors.
    """

    index: list[int]
    dtypes: tuple[torch.dtype, ...]
    operands: list[list[torch.Tensor]]
    table: LaunchTable
    copied: bool  # whether any operand is a contiguous copy made for this call

    def write_back(self, targets: Sequence[torch.Tensor]) -> None:
        if not self.operands:  # a cached group: every tensor was the caller's own
            return
        for k, work in zip(self.index, self.operands[0], strict=True):
            if work is not targets[k]:
                targets[k].copy_(work)

    def without_tensors(self) -> TensorGroup | None:
        """This group with no tensor references, for a plan cache; None where it holds
        contiguous copies (those exist per call, so the plan cannot be reused)."""
        if self.copied:
            return None
        return TensorGroup(self.index, self.dtypes, [], self.table, False)


def group_tensors(operands: Sequence[Sequence[torch.Tensor]], block: int) -> list[TensorGroup]:
    """Split parallel tensor lists into one launch group per dtype combination.

    Empty tensors are left out. Each group gets its :func:`launch_table`, so a
    multi-tensor kernel processes a group in one launch, whatever its number of tensors.
    """
    by_dtypes: dict[tuple[torch.dtype, ...], list[int]] = {}
    for k, row in enumerate(zip(*operands, strict=True)):
        if row[0].numel():
            by_dtypes.setdefault(tuple(t.dtype for t in row), []).append(k)
    groups = []
    for dtypes, index in by_dtypes.items():
        ops = [[operand[k].contiguous() for k in index] for operand in operands]
        copied = any(
            w is not operand[k]
            for operand, op in zip(operands, ops, strict=True)
            for k, w in zip(index, op, strict=True)
        )
        groups.append(TensorGroup(index, dtypes, ops, launch_table(ops, block), copied))
    return groups


Tensors = Iterable[torch.Tensor] | Mapping[str, torch.Tensor]


def parallel_lists(op: str, args: dict[str, Any]) -> tuple[list[str] | None, list[list[Any]]]:
    """The tensor arguments of a multi-tensor op as parallel lists, with the names
    of the first argument's entries (None for sequences).

    ``args`` maps each argument's name to the caller's value, the written one
    first. Sequences are taken as they are; mappings are read by the first
    one's keys, which every other mapping must hold (it may hold more). Only the
    containers are checked here, not the tensors in them.

    :raises TypeError: a lone tensor, or mappings mixed with sequences.
    :raises ValueError: a key missing from a mapping, or sequences of different lengths.
    """
    for label, value in args.items():
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {label} is a single tensor; pass lists of tensors or mappings of names to tensors")
    (first, head), *rest = args.items()
    kinds = {label: isinstance(value, Mapping) for label, value in args.items()}
    if len(set(kinds.values())) > 1:
        mappings = [label for label, is_mapping in kinds.items() if is_mapping]
        others = [label for label, is_mapping in kinds.items() if not is_mapping]
        raise TypeError(f"{op}: {' and '.join(mappings)} {'is a mapping' if len(mappings) == 1 else 'are mappings'}, "
                        f"so {' and '.join(others)} must be {'a mapping' if len(others) == 1 else 'mappings'} too")
    if kinds[first]:
        keys = list(head)
        for label, value in rest:
            missing = [k for k in keys if k not in value]
            if missing:
                raise ValueError(f"{op}: {label} has no entry for {missing[:5]}")
        return keys, [list(head.values()), *([value[k] for k in keys] for _, value in rest)]
    lists = [value if type(value) is list else list(value) for value in args.values()]
    if len({len(values) for values in lists}) > 1:
        raise ValueError(f"{op}: got " + ", ".join(f"{len(v)} {label}" for label, v in zip(args, lists, strict=True)))
    return None, lists


def check_floating(op: str, what: str, value: Any, note: str = "") -> None:
    """:raises TypeError: ``value`` (named ``what``) is not a floating-point tensor;
    ``note`` is appended to the message."""
    suffix = f"; {note}" if note else ""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(value).__name__}{suffix}")
    if not value.is_floating_point():
        raise TypeError(f"{op}: {what} must be floating point, got {value.dtype}{suffix}")


def refuse_overlaps(op: str, names: Sequence[str], tensors: Sequence[torch.Tensor], unchanged: str) -> None:
    """:raises ValueError: a tensor to be written whose elements share memory (an
    expanded tensor): an in-place write cannot give each element its own value.
    Contiguous tensors, nearly all, are passed in one C-level sweep."""
    if all(map(torch.Tensor.is_contiguous, tensors)):
        return
    for name, t in zip(names, tensors, strict=True):
        if not t.is_contiguous() and (
            torch._debug_has_internal_overlap(t) == 1 or any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True))
        ):
            raise ValueError(
                f"{op}: {name} has elements that share memory (an expanded tensor?), so it cannot be written in "
                f"place; pass a tensor of its own (.clone()); {unchanged}"
            )


def refuse_repeats(op: str, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """:raises ValueError: one tensor is written twice (tied weights): one launch
    would race on it, and an undo would restore it once."""
    seen: dict[int, str] = {}
    for name, t in zip(names, tensors, strict=True):
        if t.numel() and t.data_ptr() in seen:
            raise ValueError(f"{op}: {seen[t.data_ptr()]} and {name} are the same tensor; pass it once")
        seen[t.data_ptr()] = name


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


def signature(tensors: Sequence[torch.Tensor]) -> tuple | None:
    """What a validated multi-tensor plan for contiguous tensors depends on: every
    tensor's address, shape and dtype (the address also fixes the device; being
    contiguous, the strides follow from the shape). None when a tensor is not
    contiguous: its plan works on a copy made for the call and is not cached.
    Cheap: C-level maps, no Python loop over the tensors."""
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        return None
    return (
        tuple(map(torch.Tensor.data_ptr, tensors)),
        tuple(map(_SHAPE, tensors)),
        tuple(map(_DTYPE, tensors)),
    )


class PlanCache:
    """The last few plans of one op, keyed by :func:`signature` and the caller's extras.

    A plan validates its tensors and builds its launch tables once; calling the op
    again on the same tensors (an accumulation per batch, a sweep of dampening
    strengths) then skips that Python work, which for a model's ~150 parameter
    tensors costs as much as the kernel itself. Cached plans hold no tensor (see
    :meth:`TensorGroup.without_tensors`), so the cache never keeps memory alive; a
    plan found for new contiguous tensors at the same addresses, shapes and dtypes
    is exactly the plan those tensors need.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._plans: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple) -> Any:
        """The plan stored under ``key``, or None. (One lookup: a key is long to
        hash, so a hit does not move it; the oldest plan made is dropped first.)"""
        return self._plans.get(key)

    def put(self, key: tuple, plan: Any) -> None:
        self._plans[key] = plan
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()
