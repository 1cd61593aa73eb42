"""Training overhead of contlearn against a hand-written PyTorch loop and Avalanche.

The workload (docs/performance.md): class-incremental split digits, MLP
64-256-256-10, SGD lr 0.05, batch 32, 20 epochs per experience, seed 0. Every
contender trains the same model (same initial weights: contlearn's model built
with the same seed, its head grown to the experience's classes as contlearn
does) on the same data in the same sample order where it can; the plain loop
sees exactly contlearn's order, so their accuracies must be equal.

Timed: training only (evaluation excluded), median over ``--repeats`` runs,
contenders interleaved. Prints train seconds, the ratio to the plain loop and
the final average accuracy of each.

    python benchmarks/overhead.py                 # CPU, digits workload
    python benchmarks/overhead.py --device cuda   # GPU: torchvision ResNet18, random 32x32 data

Exit status 1 when a target in docs/performance.md is missed (--check).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from contlearn.scenarios import Stream
from torch.nn import functional as F

from contlearn import Experiment, load_config
from contlearn.experiment import seed_everything, stream_of
from contlearn.models import create_model

WORKLOAD = [
    "model.backbone=mlp",
    "model.hidden=[256,256]",
    "train.optimizer=sgd",
    "train.lr=0.05",
    "train.batch_size=32",
    "train.epochs=20",
    "eval.fwt=false",
    "device=cpu",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accuracy(model: torch.nn.Module, stream: Stream, forward: Callable | None = None) -> float:
    """Final average accuracy over every experience's test data."""
    forward = forward or (lambda x, t: model(x, t).logits)
    model.eval()
    accs = []
    with torch.no_grad():
        for exp in stream:
            pred = forward(exp.test.x, exp.test.t).argmax(1)
            accs.append((pred == exp.test.y).double().mean().item())
    return sum(accs) / len(accs)


def plain_loop(overrides: list[str], amp: bool = False) -> tuple[float, float]:
    """A hand-written loop: tensors on the device, batches by index, one
    optimizer per experience; the sample order drawn as contlearn draws it.
    ``amp``: forward and loss in bf16 autocast."""
    cfg = load_config(None, ["plugins={}", *overrides])
    stream = stream_of(cfg)
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    stream.to(device)
    model = create_model(cfg.model, stream.input_shape).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    seconds = 0.0
    for exp in stream:
        _sync(device)
        t0 = time.perf_counter()
        model.adapt(exp.classes, exp.task)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
        x, y, t = exp.train.x, exp.train.y, exp.train.t
        n, bs = len(y), cfg.train.batch_size
        for _ in range(cfg.train.epochs):
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                if amp:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        loss = F.cross_entropy(model(x[idx], t[idx]).logits, y[idx])
                else:  # no context at all: the fp32 loop stays the bare minimum
                    loss = F.cross_entropy(model(x[idx], t[idx]).logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        _sync(device)
        seconds += time.perf_counter() - t0
    return seconds, accuracy(model, stream)


def contlearn_run(overrides: list[str], plugins: list[str]) -> tuple[float, float]:
    cfg = load_config(None, ["plugins={}", *plugins, *overrides])
    results = Experiment(cfg).run()
    return results.timings["train_seconds"], results.average_accuracy


def avalanche_run(overrides: list[str], strategy: str) -> tuple[float, float]:
    """Avalanche 0.6's Naive / Replay(200) / EWC on the same stream and model."""
    warnings.filterwarnings("ignore")
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import EWC, Naive, Replay

    cfg = load_config(None, ["plugins={}", *overrides])
    stream = stream_of(cfg)
    benchmark = tensors_benchmark(
        train_tensors=[(e.train.x, e.train.y) for e in stream],
        test_tensors=[(e.test.x, e.test.y) for e in stream],
        task_labels=[0] * len(stream),
    )
    seed_everything(cfg.seed)
    model = create_model(cfg.model, stream.input_shape)
    for exp in stream:  # a fixed head over all classes: Avalanche's Naive does not grow heads
        model.adapt(exp.classes, exp.task)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).logits

    net = Logits(model)
    common = dict(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=cfg.train.lr),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=cfg.train.batch_size,
        train_epochs=cfg.train.epochs,
        eval_mb_size=512,
        device="cpu",
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if strategy == "Naive":
        learner = Naive(**common)
    elif strategy == "Replay":
        learner = Replay(mem_size=200, **common)
    else:
        learner = EWC(ewc_lambda=100.0, **common)
    seconds = 0.0
    for exp in benchmark.train_stream:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # Avalanche's own filters let its DeprecationWarnings through
            warnings.simplefilter("ignore")
            learner.train(exp, num_workers=0)
        seconds += time.perf_counter() - t0
    return seconds, accuracy(net, stream, lambda x, t: net(x))


GPU_WORKLOAD = [
    "model.backbone=tv:resnet18",
    "train.optimizer=sgd",
    "train.lr=0.05",
    "train.batch_size=128",
    "train.epochs=2",
    "eval.fwt=false",
    "scenario.source=npz",
    "scenario.n_experiences=5",
]


def gpu_main(args: argparse.Namespace) -> int:
    """torchvision ResNet18 on random 32x32 data (10 classes, 5 experiences of 2),
    batch 128: a device-resident plain loop against contlearn in fp32, with
    ``train.amp`` (bf16 autocast) and with ``train.compile``."""
    import tempfile

    import numpy as np

    rng = np.random.default_rng(0)
    scratch = tempfile.TemporaryDirectory()
    path = scratch.name + "/random32.npz"  # 135 MB, removed when the benchmark ends
    np.savez(
        path,
        x=rng.standard_normal((10_000, 3, 32, 32), dtype=np.float32),
        y=np.repeat(np.arange(10), 1_000),
        x_test=rng.standard_normal((1_000, 3, 32, 32), dtype=np.float32),
        y_test=np.repeat(np.arange(10), 100),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    overrides = [*GPU_WORKLOAD, f"scenario.path={path}", f"device={args.device}"]
    finetune = ["plugins.finetune={}"]
    variants = {
        "contlearn fp32": [],
        "contlearn amp": ["train.amp=true"],
        "contlearn amp+channels_last": ["train.amp=true", "train.channels_last=true"],
        "contlearn amp+compile": ["train.amp=true", "train.compile=true"],
        "contlearn compile": ["train.compile=true"],
    }
    contenders: dict[str, Callable[[], tuple[float, float]]] = {
        "plain loop (device)": lambda: plain_loop(overrides),
        "plain loop amp": lambda: plain_loop(overrides, amp=True),
    }
    for name, extra in variants.items():
        contenders[name] = lambda extra=extra: contlearn_run([*overrides, *extra], finetune)

    def with_cudnn_benchmark(fn: Callable[[], tuple[float, float]]) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            torch.backends.cudnn.benchmark = True
            try:
                return fn()
            finally:
                torch.backends.cudnn.benchmark = False

        return run

    for mode in args.compile_modes:
        compiled = ["train.compile=true", f"train.compile_mode={mode}"]
        contenders[f"contlearn amp+compile {mode}"] = lambda c=compiled: contlearn_run(
            [*overrides, "train.amp=true", *c], finetune
        )
        contenders[f"contlearn compile {mode}"] = lambda c=compiled: contlearn_run([*overrides, *c], finetune)
    contenders["plain loop, cudnn.benchmark"] = with_cudnn_benchmark(contenders["plain loop (device)"])
    contenders["contlearn fp32, cudnn.benchmark"] = with_cudnn_benchmark(contenders["contlearn fp32"])
    contenders["contlearn amp+compile, cudnn.benchmark"] = with_cudnn_benchmark(contenders["contlearn amp+compile"])
    if args.only:
        keep = {"plain loop (device)", "contlearn fp32", "contlearn amp+compile"}
        contenders = {k: v for k, v in contenders.items() if k in keep or any(o in k for o in args.only)}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for name, fn in list(contenders.items()):  # warm-up: cudnn heuristics, compilation
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # a torch.compile failure must not hide the other rows
            print(f"{name}: failed ({type(exc).__name__}: {str(exc)[:300]}); left out")
            del contenders[name], times[name]
            continue
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    lost = [k for k in ("plain loop (device)", "contlearn fp32") if k not in contenders]
    if lost:
        print(f"no ratio to report: {' and '.join(lost)} failed (above)")
        return 1
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            times[name].append(fn()[0])
    plain = statistics.median(times["plain loop (device)"])
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}, IEEE fp32 (TF32 off) unless amp"
    )
    print(f"{'contender':<40} {'train s':>8} {'ratio':>6}")
    for name in contenders:
        t = statistics.median(times[name])
        print(f"{name:<40} {t:8.3f} {t / plain:6.2f}")
    ratio = statistics.median(times["contlearn fp32"]) / plain
    compiled = [k for k in times if k.startswith("contlearn amp+compile") and "cudnn" not in k] or ["contlearn amp"]
    fastest = min(compiled, key=lambda k: statistics.median(times[k]))
    amp_ratio = statistics.median(times[fastest]) / plain
    missed = ratio > 1.05 or amp_ratio >= 1.0
    print(
        ("MISSED" if ratio > 1.05 else "met")
        + f": contlearn fp32 / plain loop = {ratio:.3f} (target <= 1.05)"
    )
    print(
        ("MISSED" if amp_ratio >= 1 else "met")
        + f": {fastest} / plain fp32 loop = {amp_ratio:.3f} (target < 1)"
    )
    return 1 if (missed and args.check) else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-avalanche", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--compile-modes",
        nargs="+",
        default=[],
        help="GPU: also time amp+compile and compile in these torch.compile modes (e.g. reduce-overhead)",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="GPU: only the contenders whose names contain one of these"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.device != "cpu":
        if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
            parser.error(f"--device {args.device}: the GPU benchmark needs a visible CUDA device")
        return gpu_main(args)

    from contlearn._registry import BUILTIN_PLUGINS

    contenders: dict[str, Callable[[], tuple[float, float]]] = {
        "plain loop": lambda: plain_loop(WORKLOAD),
        "contlearn finetune": lambda: contlearn_run(WORKLOAD, ["plugins.finetune={}"]),
    }
    if "replay" in BUILTIN_PLUGINS:
        contenders["contlearn replay(200)"] = lambda: contlearn_run(
            WORKLOAD, ["plugins.replay.size=200"]
        )
    if "ewc" in BUILTIN_PLUGINS:
        contenders["contlearn ewc"] = lambda: contlearn_run(WORKLOAD, ["plugins.ewc={}"])
    if not args.no_avalanche:
        try:
            import avalanche  # noqa: F401

            for name in ("Naive", "Replay", "EWC"):
                contenders[f"avalanche {name}"] = lambda name=name: avalanche_run(WORKLOAD, name)
        except ImportError:
            print(
                "avalanche-lib is not installed: skipping its contenders (pip install 'contlearn[avalanche]')"
            )

    times: dict[str, list[float]] = {k: [] for k in contenders}
    accs: dict[str, float] = {}
    for fn in contenders.values():  # one untimed round: first-use costs (optimizer, data) go to no contender
        fn()
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            seconds, acc = fn()
            times[name].append(seconds)
            accs[name] = acc

    plain = statistics.median(times["plain loop"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, fp32; median of {args.repeats}"
    )
    print(f"{'contender':<24} {'train s':>8} {'ratio':>6} {'final avg acc':>14}")
    for name in contenders:
        t = statistics.median(times[name])
        print(f"{name:<24} {t:8.3f} {t / plain:6.2f} {accs[name]:14.4f}")

    failures = []
    ratio = statistics.median(times["contlearn finetune"]) / plain
    if ratio > 1.10:
        failures.append(f"contlearn finetune / plain loop = {ratio:.2f} > 1.10")
    if abs(accs["contlearn finetune"] - accs["plain loop"]) > 1e-9:
        failures.append("contlearn finetune and the plain loop differ in accuracy")
    for ours, theirs in (
        ("contlearn replay(200)", "avalanche Replay"),
        ("contlearn ewc", "avalanche EWC"),
    ):
        if ours in times and theirs in times:
            speedup = statistics.median(times[theirs]) / statistics.median(times[ours])
            print(f"{ours} is {speedup:.1f}x faster than {theirs}")
            if speedup < 2.0:
                failures.append(f"{ours} only {speedup:.2f}x faster than {theirs}")
            if accs[ours] < accs[theirs] - 0.01:
                failures.append(
                    f"{ours} accuracy {accs[ours]:.3f} below {theirs} {accs[theirs]:.3f}"
                )
    for f in failures:
        print("MISSED:", f)
    return 1 if (failures and args.check) else 0


if __name__ == "__main__":
    raise SystemExit(main())
