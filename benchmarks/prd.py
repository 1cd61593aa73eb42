"""PRD against the replay-free peers (finetune, lwf, ewc, l2) and replay on split digits.

Every method trains the same model in the same way: the setup of the shipped
configs ``split-digits-prd`` (class-incremental) and ``task-digits-prd``
(task-incremental), i.e. the same backbone, optimizer, learning rate, epochs and
batch size; only the plugin differs, each with its default settings (replay:
200 samples). Prints a markdown table of the final average accuracy and the
forgetting (mean +- std over the seeds) and, with ``--check``, exits 1 when PRD
does not beat lwf and finetune in class-incremental accuracy.

    python benchmarks/prd.py                          # seeds 0 1 2, one process
    python benchmarks/prd.py --jobs 16                # 16 runs at a time (one thread each)
    python benchmarks/prd.py --seeds 0 --epochs 2     # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _parallel import map_runs

METHODS: dict[str, list[str]] = {
    "finetune": ["plugins={}", "plugins.finetune={}"],
    "lwf": ["plugins={}", "plugins.lwf={}"],
    "ewc": ["plugins={}", "plugins.ewc={}"],
    "l2": ["plugins={}", "plugins.l2={}"],
    "prd": [],  # the config's own plugin section
    "replay (200)": ["plugins={}", "plugins.replay.size=200"],
}
SETTINGS = {"class": "split-digits-prd", "task": "task-digits-prd"}


def run_one(job: tuple[str, str, int, list[str]]) -> tuple[str, str, int, float, float, float]:
    """Train one (setting, method, seed); returns its final average accuracy,
    forgetting and wall seconds."""
    setting, method, seed, extra = job
    torch.set_num_threads(1)
    from contlearn import Experiment, load_config

    overrides = [*METHODS[method], f"seed={seed}", "eval.fwt=false", *extra]
    t0 = time.perf_counter()
    results = Experiment(load_config(SETTINGS[setting], overrides)).run()
    return setting, method, seed, results.average_accuracy, results.forgetting, time.perf_counter() - t0


def cell(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs of the configs")
    parser.add_argument("--device", default="cpu", help="device of every run (default cpu)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, in separate processes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--check", action="store_true", help="exit 1 unless PRD beats lwf and finetune (class)")
    args = parser.parse_args(argv)

    extra = [f"device={args.device}"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    jobs = [(s, m, seed, extra) for s in SETTINGS for m in args.methods for seed in args.seeds]
    t0 = time.perf_counter()
    done = map_runs(run_one, jobs, args.jobs)
    wall = time.perf_counter() - t0

    acc: dict[tuple[str, str], list[float]] = {}
    fgt: dict[tuple[str, str], list[float]] = {}
    secs: dict[str, list[float]] = {}
    for setting, method, _, a, f, s in done:
        acc.setdefault((setting, method), []).append(a)
        fgt.setdefault((setting, method), []).append(f)
        secs.setdefault(method, []).append(s)

    print(f"split digits, 5 experiences of 2 classes; seeds {args.seeds}; accuracy and forgetting in %, mean ± std\n")
    print("| method | class-incr. accuracy | class-incr. forgetting | task-incr. accuracy | task-incr. forgetting | s / run |")
    print("|---|---|---|---|---|---|")
    for m in args.methods:
        row = [cell(acc[("class", m)]), cell(fgt[("class", m)]), cell(acc[("task", m)]), cell(fgt[("task", m)])]
        print(f"| {m} | {' | '.join(row)} | {statistics.mean(secs[m]):.1f} |")
    print(f"\n{len(jobs)} runs in {wall:.0f} s ({args.jobs} at a time, device {args.device})")

    if args.check and {"prd", "lwf", "finetune"} <= set(args.methods):
        prd = statistics.mean(acc[("class", "prd")])
        beaten = [m for m in ("lwf", "finetune") if statistics.mean(acc[("class", m)]) >= prd]
        if beaten:
            print(f"PRD does not beat {', '.join(beaten)} in class-incremental accuracy", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
