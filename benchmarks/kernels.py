"""Benchmark contlearn.kernels against torch eager, torch._foreach_* and the memory-copy floor.

    python benchmarks/kernels.py                 # GPU when present: full sizes
    python benchmarks/kernels.py --device cpu --quick

On a GPU, times are CUDA-event medians after warm-up, in fp32 with TF32 off, so every
matmul is IEEE fp32. On the CPU (no GPU, or ``--device cpu``) the kernels' torch
references run on small sizes and wall-clock medians are reported; there the
``contlearn`` rows are the references, not Triton.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from contlearn.kernels import _dispatch, accumulate, dampen, fisher, per_sample
from torch.func import grad, vmap

SWEEP = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (8192, 8)]  # (block, num_warps), --sweep
ALPHA, LAM = 10.0, 1.0  # SSD's defaults: about 5% of uniform-random Fisher pairs are selected


def vit_shapes(
    width: int = 768, depth: int = 12, mlp: int = 3072, classes: int = 1000
) -> list[tuple[int, ...]]:
    """Parameter shapes of a ViT (ViT-B/16 by default: 86.6M parameters in 152 tensors)."""
    shapes: list[tuple[int, ...]] = [(width, 3, 16, 16), (width,), (1, 1, width), (1, 197, width)]
    for _ in range(depth):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (mlp, width), (mlp,), (width, mlp), (width,)]
    return shapes + [(width,), (width,), (classes, width), (classes,)]


class Timer:
    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn()``."""
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.reps):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def report(title: str, rows: list[tuple[str, float]], ours: str, notes: dict[str, str]) -> None:
    """Print times and, for every other row, ours/row (below 1: ours is faster)."""
    base = dict(rows)[ours]
    print(f"\n{title}")
    for name, ms in rows:
        ratio = "" if name == ours else f"{base / ms:7.2f}x  ({ours} / this)"
        print(f"  {name:<46} {ms:10.3f} ms  {ratio}  {notes.get(name, '')}".rstrip())


def amortized(fn: Callable[[], object], n: int = 50) -> float:
    """Milliseconds per call of ``n`` back-to-back calls on the GPU: launch overhead
    hidden behind the queue, so this is the kernel's own time."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def _dampen_kernel_only(thetas, fds, ffs, config: _dispatch.LaunchConfig) -> Callable[[], None]:
    """The dampening kernel launched on prepared arguments: no checks, no read-back."""
    plan = dampen.DampenPlan(thetas, fds, ffs, backend="triton", config=config)
    (group,) = plan.groups
    counts = torch.zeros(2, dtype=torch.int64, device=thetas[0].device)
    args = dampen.kernel_arguments(group, config.block, counts, ALPHA, LAM)
    meta = {**plan.metas[0], "RESTORE": False}
    grid = (group.table.n_blocks,)
    return lambda: dampen._dampen_kernel[grid](*args, **meta)


def _eager_dampen(thetas, fds, ffs) -> None:
    for theta, fd, ff in zip(thetas, fds, ffs, strict=True):
        selected = (ff > ALPHA * fd) & (ff > 0)
        factor = (LAM * fd / ff).clamp_(max=1.0)
        theta.copy_(torch.where(selected, theta * factor, theta))


def _foreach_dampen(thetas, fds, ffs) -> None:
    selected = torch._foreach_sub(ffs, torch._foreach_mul(fds, ALPHA))
    torch._foreach_sign_(selected)
    torch._foreach_clamp_min_(selected, 0.0)  # 1 where F_f > alpha F_D (F_f > 0 in this data)
    factor = torch._foreach_mul(fds, LAM)
    torch._foreach_div_(factor, ffs)
    torch._foreach_clamp_max_(factor, 1.0)
    torch._foreach_sub_(factor, 1.0)
    torch._foreach_mul_(factor, selected)
    torch._foreach_add_(factor, 1.0)
    torch._foreach_mul_(thetas, factor)


def bench_dampen(
    device: torch.device, shapes: list[tuple[int, ...]], timer: Timer, label: str, sweep: bool
) -> None:
    thetas = [torch.randn(s, device=device) for s in shapes]
    fds = [torch.rand(s, device=device) for s in shapes]
    ffs = [torch.rand(s, device=device) + 1e-6 for s in shapes]
    n = sum(t.numel() for t in thetas)
    check = [t.clone() for t in thetas]
    dampen.dampen_(check, fds, ffs, ALPHA, LAM)
    for fn in (_eager_dampen, _foreach_dampen):
        out = [t.clone() for t in thetas]
        fn(out, fds, ffs)
        for a, b in zip(out, check, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    src = torch.empty(2 * n, device=device)
    dst = torch.empty_like(src)
    ours = "contlearn dampen_" + (" (Triton)" if device.type == "cuda" else " (reference)")
    plan = dampen.DampenPlan(thetas, fds, ffs)
    rows = [
        (ours, timer(lambda: dampen.dampen_(thetas, fds, ffs, ALPHA, LAM))),
        ("contlearn DampenPlan (validated once)", timer(lambda: plan(ALPHA, LAM))),
    ]
    rows += [
        ("eager per-tensor loop", timer(lambda: _eager_dampen(thetas, fds, ffs))),
        ("torch._foreach_*", timer(lambda: _foreach_dampen(thetas, fds, ffs))),
        ("copy, 16 B/param", timer(lambda: dst.copy_(src))),
    ]
    notes = (
        {"copy, 16 B/param": "target on H100: ours/copy <= 1.25"} if device.type == "cuda" else {}
    )
    if sweep and device.type == "cuda":
        floor = amortized(lambda: dst.copy_(src))
        rows.append(("copy, 16 B/param, back to back", floor))
        for block, warps in SWEEP:
            launch = _dampen_kernel_only(thetas, fds, ffs, _dispatch.LaunchConfig(block, warps))
            name = f"kernel, back to back, {block}/{warps}w"
            rows.append((name, amortized(launch)))
            notes[name] = f"{rows[-1][1] / floor:.2f}x the back-to-back copy"
    report(
        f"dampen_: {n / 1e6:.1f}M params in {len(shapes)} tensors ({label}), fp32",
        rows,
        ours,
        notes,
    )


def bench_accumulate(
    device: torch.device, shapes: list[tuple[int, ...]], timer: Timer, label: str, sweep: bool
) -> None:
    imps = [torch.zeros(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    n = sum(t.numel() for t in imps)
    src = torch.empty(n * 3 // 2, device=device)
    dst = torch.empty_like(src)
    ours = "contlearn accumulate_" + (" (Triton)" if device.type == "cuda" else " (reference)")

    def loop() -> None:
        for imp, g in zip(imps, grads, strict=True):
            imp.addcmul_(g, g, value=0.5)

    check = [t.clone() for t in imps]
    fisher.accumulate_(check, grads, 0.5)
    for baseline in (loop, lambda: torch._foreach_addcmul_(imps, grads, grads, value=0.5)):
        baseline()  # on zeroed importances, as accumulate_ was
        for a, b in zip(imps, check, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for imp in imps:
            imp.zero_()
    rows = [
        (ours, timer(lambda: fisher.accumulate_(imps, grads, 0.5))),
        ("eager per-tensor addcmul_", timer(loop)),
        (
            "torch._foreach_addcmul_",
            timer(lambda: torch._foreach_addcmul_(imps, grads, grads, value=0.5)),
        ),
        ("copy, 12 B/param", timer(lambda: dst.copy_(src))),
    ]
    if sweep and device.type == "cuda":
        rows.append(("copy, 12 B/param, back to back", amortized(lambda: dst.copy_(src))))
        for block, warps in SWEEP:
            config = _dispatch.LaunchConfig(block, warps)
            groups = _dispatch.group_tensors([imps, grads], block)
            rows.append(
                (
                    f"kernel only, back to back, {block}/{warps}w",
                    amortized(lambda g=groups, c=config: accumulate._launch(g, imps, 0.5, c)),
                )
            )
    report(
        f"accumulate_: {n / 1e6:.1f}M params in {len(shapes)} tensors ({label}), fp32",
        rows,
        ours,
        {},
    )


def _vmap_fisher(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(d.shape[-1], a.shape[-1], device=a.device)

    def loss(w: torch.Tensor, a_b: torch.Tensor, d_b: torch.Tensor) -> torch.Tensor:
        return ((a_b @ w.T) * d_b).sum()  # d loss / d w = d_b^T a_b

    return vmap(grad(loss), in_dims=(None, 0, 0))(w, a, d).square().sum(0)


def _loop_fisher(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(d.shape[-1], a.shape[-1], device=a.device)
    for b in range(a.shape[0]):
        g = d[b].T @ a[b]
        out.addcmul_(g, g)
    return out


def _chunk_sweep(a: torch.Tensor, d: torch.Tensor, timer: Timer) -> list[tuple[str, float]]:
    """Rows for chunk sizes of the bmm path. Small chunks keep the per-sample gradients
    in L2 (50 MB on an H100: 2 to 4 gradients of a ViT-B MLP layer), so that neither the
    batched GEMM's writes nor the squaring's reads reach HBM; then launches are many,
    and the per-sample ``addcmul_`` rows show what the Triton launcher costs."""
    n_batch, n_out, n_in = a.shape[0], d.shape[2], a.shape[2]
    grad_mb = n_out * n_in * 4 / 2**20
    l2_mb = torch.cuda.get_device_properties(a.device).L2_cache_size / 2**20
    rows = []
    for chunk in (1, 2, 4, 8, 16, 64, 128):
        name = f"bmm + square-sum, chunk {chunk} ({chunk * grad_mb:.0f} MB; L2 {l2_mb:.0f} MB)"
        rows.append((name, timer(lambda c=chunk: per_sample.per_sample_linear_bmm(a, d, chunk=c))))

    def bmm_addcmul(chunk: int) -> torch.Tensor:
        out = torch.zeros(n_out, n_in, device=a.device)
        scratch = torch.empty(chunk, n_out, n_in, device=a.device)
        for s in range(0, n_batch, chunk):
            g = scratch[: min(chunk, n_batch - s)]
            torch.bmm(d[s : s + chunk].transpose(1, 2), a[s : s + chunk], out=g)
            for g_b in g:
                out.addcmul_(g_b, g_b)
        return out

    want = per_sample.per_sample_linear_bmm(a, d)
    for chunk in (1, 2, 4):
        torch.testing.assert_close(bmm_addcmul(chunk), want, rtol=1e-4, atol=1e-3)
        rows.append((f"bmm + addcmul_ per sample, chunk {chunk}", timer(lambda c=chunk: bmm_addcmul(c))))
    for chunk in (2, 4, 32):
        scratch = torch.empty(chunk, n_out, n_in, device=a.device)

        def bmm_only(c: int = chunk, out: torch.Tensor = scratch) -> None:
            for s in range(0, n_batch - c + 1, c):
                torch.bmm(d[s : s + c].transpose(1, 2), a[s : s + c], out=out)

        rows.append((f"bmm alone, chunk {chunk} (no squaring)", timer(bmm_only)))
    return rows


def bench_per_sample(
    device: torch.device, b: int, t: int, n_in: int, n_out: int, timer: Timer, sweep: bool
) -> None:
    a = torch.randn(b, t, n_in, device=device)
    d = torch.randn(b, t, n_out, device=device)
    want = per_sample.per_sample_linear(a, d)
    for fn in (_vmap_fisher, _loop_fisher):
        torch.testing.assert_close(fn(a, d), want, rtol=1e-4, atol=1e-3)
    a2, d2 = a.reshape(-1, n_in), d.reshape(-1, n_out)
    on_gpu = device.type == "cuda"
    ours = "per_sample_linear" + (" (auto)" if on_gpu else " (reference)")
    rows = [(ours, timer(lambda: per_sample.per_sample_linear(a, d)))]
    if on_gpu:
        rows.append(
            (
                "per_sample_linear (fused Triton kernel)",
                timer(lambda: per_sample.per_sample_linear(a, d, backend="triton")),
            )
        )
    if on_gpu and t > 1:
        rows.append(
            (
                "torch reference (chunked bmm)",
                timer(lambda: per_sample.per_sample_linear_reference(a, d)),
            )
        )
        if sweep:
            rows += _chunk_sweep(a, d, timer)
    rows += [
        ("torch.func.vmap per-sample grads", timer(lambda: _vmap_fisher(a, d))),
        ("per-sample loop", timer(lambda: _loop_fisher(a, d))),
        ("weight-gradient GEMM, same FLOPs", timer(lambda: d2.T @ a2)),
    ]
    target = "2" if t == 1 else "1.3"
    notes = (
        {"weight-gradient GEMM, same FLOPs": f"target on H100: ours/GEMM <= {target}"}
        if on_gpu
        else {}
    )
    if on_gpu:
        notes["torch.func.vmap per-sample grads"] = "target: ours/vmap <= 1"
    gflop = 2 * b * t * n_in * n_out / 1e9
    report(
        f"per_sample_linear: B={b}, T={t}, {n_in}->{n_out} ({gflop:.1f} GFLOP), fp32",
        rows,
        ours,
        notes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if gpu else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats; smaller CPU sizes")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=["dampen", "accumulate", "per_sample"],
        default=["dampen", "accumulate", "per_sample"],
        help="which benchmarks to run (default: all)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="GPU: also time other launch shapes and chunk sizes"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not gpu:
        parser.error("--device cuda but no GPU is visible")
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    timer = Timer(device, warmup=2 if args.quick else 5, reps=5 if args.quick else 20)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        print(f"device: {name}; precision: fp32 IEEE (TF32 off); CUDA-event medians")
        shapes, label = vit_shapes(), "ViT-B/16 shapes"
        cases = [(1024, 1, 1024, 1024), (256, 197, 768, 3072)]
    else:
        # One thread keeps timings steady on a shared machine, and flush-to-zero (set
        # per thread) keeps repeatedly dampened weights out of slow denormals.
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        print(
            f"device: CPU, {args.threads} thread(s); precision: fp32; the contlearn rows run "
            "the torch references, not Triton; wall-clock medians"
        )
        if args.quick:
            shapes = vit_shapes(width=96, depth=2, mlp=384, classes=10)
            label = "ViT shapes, width 96, depth 2"
            cases = [(64, 1, 128, 128), (8, 17, 48, 192)]
        else:
            shapes = vit_shapes(width=384, depth=4, mlp=1536, classes=100)
            label = "ViT shapes, width 384, depth 4"
            cases = [(256, 1, 512, 512), (32, 65, 192, 768)]
    if "dampen" in args.ops:
        bench_dampen(device, shapes, timer, label, args.sweep)
    if "accumulate" in args.ops:
        bench_accumulate(device, shapes, timer, label, args.sweep)
    for case in cases if "per_sample" in args.ops else ():
        bench_per_sample(device, *case, timer, args.sweep)


if __name__ == "__main__":
    main()
