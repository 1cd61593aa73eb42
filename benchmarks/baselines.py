"""The baseline strategies on class- and domain-incremental digits, one table per setting.

Runs finetune, replay (200 samples), ewc, l2, lwf and joint with the same model,
epochs and seed (each strategy with its documented defaults) on

* split digits: class-incremental, 5 experiences of 2 classes (``split-digits``);
* permuted digits: domain-incremental, 10 pixel permutations (``permuted-digits``);

prints a Markdown table per setting (final average accuracy, forgetting, BWT,
seconds) and checks what the literature leads one to expect, exiting with 1
when a check fails:

* split digits: joint >= replay (200) >= 0.85 > finetune;
* permuted digits: each of ewc, l2 and lwf beats finetune.

    python benchmarks/baselines.py                     # both settings (about 9 minutes on one idle core)
    python benchmarks/baselines.py --settings split --device cuda
    python benchmarks/baselines.py --sweep             # how the defaults were chosen

``--sweep`` reruns the search that chose the defaults of ``ewc.lam``,
``l2.lam`` and ``lwf.alpha``: permuted digits with 20% of each experience's
training data held out as its evaluation set (the test sets are not read).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from contlearn import Experiment, TrainingError, load_config
from contlearn.experiment import stream_of

#: strategy label -> plugin overrides (each plugin otherwise at its documented defaults)
STRATEGIES: dict[str, list[str]] = {
    "finetune": ["plugins.finetune={}"],
    "replay (200)": ["plugins.replay.size=200"],
    "ewc": ["plugins.ewc={}"],
    "l2": ["plugins.l2={}"],
    "lwf": ["plugins.lwf={}"],
    "joint": ["plugins.joint={}"],
}

#: short name -> (title, shipped config)
SETTINGS: dict[str, tuple[str, str]] = {
    "split": ("Split digits (class-incremental, 5 experiences x 2 classes)", "split-digits"),
    "permuted": ("Permuted digits (domain-incremental, 10 permutations)", "permuted-digits"),
}


@dataclass
class Row:
    strategy: str
    average_accuracy: float
    forgetting: float
    bwt: float
    seconds: float


def run_setting(config: str, strategies: list[str], common: list[str]) -> list[Row]:
    rows = []
    for label in strategies:
        cfg = load_config(config, ["plugins={}", "eval.fwt=false", *common, *STRATEGIES[label]])
        t0 = time.perf_counter()
        results = Experiment(cfg).run()
        seconds = time.perf_counter() - t0
        rows.append(Row(label, results.average_accuracy, results.forgetting, results.bwt, seconds))
        print(f"  {label}: {results.average_accuracy:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| strategy | final avg acc | forgetting | BWT | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.strategy} | {r.average_accuracy:.3f} | {r.forgetting:.3f} | {r.bwt:+.3f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def checks(setting: str, rows: list[Row]) -> list[tuple[str, bool]]:
    """The expectations of a setting that the strategies run allow to check."""
    acc = {r.strategy: r.average_accuracy for r in rows}
    out: list[tuple[str, bool]] = []
    if setting == "split":
        if {"joint", "replay (200)"} <= acc.keys():
            out.append(("joint >= replay (200)", acc["joint"] >= acc["replay (200)"]))
        if "replay (200)" in acc:
            out.append(("replay (200) >= 0.85", acc["replay (200)"] >= 0.85))
        if "finetune" in acc:
            out.append(("0.85 > finetune", 0.85 > acc["finetune"]))
    elif setting == "permuted" and "finetune" in acc:
        for name in ("ewc", "l2", "lwf"):
            if name in acc:
                out.append((f"{name} > finetune", acc[name] > acc["finetune"]))
    return out


#: the grids searched on validation data (docs/results.md)
SWEEP: dict[str, list[float]] = {
    "ewc.lam": [10, 30, 100, 300, 1000, 3000, 10000],
    "l2.lam": [0.003, 0.01, 0.03, 0.1, 1, 3],
    "lwf.alpha": [1, 2, 4, 8],
}


def validation_accuracy(config: str, overrides: list[str]) -> float | None:
    """Final average accuracy on validation data carved from the training data
    (each experience's test set replaced by it); ``None`` if training diverged."""
    cfg = load_config(config, ["plugins={}", "eval.fwt=false", "scenario.validation_fraction=0.2", *overrides])
    stream = stream_of(cfg)
    for exp in stream:
        exp.test, exp.val = exp.val, None
    try:
        return Experiment(cfg, stream=stream).run().average_accuracy
    except TrainingError:
        return None


def sweep(common: list[str]) -> str:
    lines = ["| plugin | value: validation final average accuracy |", "|---|---|"]
    base = validation_accuracy("permuted-digits", [*common, "plugins.finetune={}"])
    lines.append(f"| finetune | {base:.3f} |")
    for key, values in SWEEP.items():
        cells = []
        for value in values:
            acc = validation_accuracy("permuted-digits", [*common, f"plugins.{key}={value}"])
            cells.append(f"{value:g}: {'diverged' if acc is None else f'{acc:.3f}'}")
            print(f"  {key}={cells[-1]}", file=sys.stderr, flush=True)
        lines.append(f"| `{key}` | {', '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per experience (default: each config's, 20)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (small models run fastest on one)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--sweep", action="store_true", help="rerun the validation search of the defaults instead")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    common = [f"seed={args.seed}", f"device={args.device}"]
    if args.epochs is not None:
        common.append(f"train.epochs={args.epochs}")
    if args.sweep:
        print(sweep(common))
        return 0

    sections, failed = [], []
    for setting in args.settings:
        title, config = SETTINGS[setting]
        print(f"{title}: running {', '.join(args.strategies)}", file=sys.stderr, flush=True)
        rows = run_setting(config, args.strategies, common)
        results = checks(setting, rows)
        lines = [f"### {title}", "", table(rows), ""]
        for name, ok in results:
            lines.append(f"- {'ok' if ok else 'FAILED'}: {name}")
            if not ok:
                failed.append(f"{setting}: {name}")
        sections.append("\n".join(lines))
        print(sections[-1] + "\n", flush=True)

    command = "python benchmarks/baselines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.markdown is not None:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
        header = f"`{command.strip()}` (seed {args.seed}, {device}, torch {torch.__version__})\n\n"
        args.markdown.write_text(header + "\n\n".join(sections) + "\n", encoding="utf-8")
    if failed:
        print("expectations not met: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
