"""RegLoRA against per-task LoRA without the penalty and against full fine-tuning.

SEFE's ablation (Chen et al., ICML 2025) compares RegLoRA with the same per-task
LoRA merged after each task but not regularised; this runs that comparison, and
full fine-tuning, with the same optimizer, epochs and seeds, in two settings:

* ``rotated``: the shipped ``rotated-digits-reglora`` (domain-incremental, 5
  rotations; experience 0 trains the whole MLP, later ones a rank-8 adapter
  each, head frozen; AdamW lr 1e-3, 5 epochs);
* ``task``: ``task-digits`` (5 tasks of 2 classes, one head per task, trained in
  full; adapters from the first task on) with the same optimizer and epochs.

Rows: ``finetune`` (every weight trains), ``lora`` (``lam`` 0), ``reglora``
(``lam`` 2500, the reference's) and one row per extra ``--lams`` value. Prints a
Markdown table per setting (final average accuracy, forgetting and BWT; mean and
spread over the seeds) and exits with 1 unless, in the rotated setting, RegLoRA
forgets less than unregularised LoRA on average.

    python benchmarks/reglora.py                       # seeds 0-2, both settings
    python benchmarks/reglora.py --settings rotated --lams 250 25000 --workers 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from _parallel import map_runs

from contlearn import Experiment, load_config

SETTINGS: dict[str, tuple[str, list[str]]] = {
    "rotated": ("rotated-digits-reglora", []),
    "task": ("task-digits", ["train.epochs=5", "train.optimizer=adamw", "train.lr=0.001", "plugins={}", "plugins.reglora={}"]),
}


@dataclass
class Job:
    setting: str
    label: str
    overrides: list[str]
    seed: int


@dataclass
class Outcome:
    accuracy: float
    forgetting: float
    bwt: float
    seconds: float


def rows(lams: list[float]) -> list[tuple[str, list[str]]]:
    """(label, overrides applied after the setting's) of every compared method."""
    out = [
        ("finetune", ["plugins={}", "plugins.finetune={}"]),
        ("lora (lam 0)", ["plugins.reglora.lam=0"]),
        ("reglora (lam 2500)", ["plugins.reglora.lam=2500"]),
    ]
    return out + [(f"reglora (lam {lam:g})", [f"plugins.reglora.lam={lam}"]) for lam in lams if lam not in (0, 2500)]


def run_one(job: Job) -> Outcome:
    name, common = SETTINGS[job.setting]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(name, [*common, *job.overrides, f"seed={job.seed}", "eval.fwt=false",
                                 "checkpoint.enabled=false", f"out={out}/run", "threads=1"])
        t0 = time.perf_counter()
        results = Experiment(cfg).run()
    return Outcome(results.average_accuracy, results.forgetting, results.bwt, time.perf_counter() - t0)


def cell(values: list[float], signed: bool = False) -> str:
    mean = statistics.fmean(values)
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["rotated", "task"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lams", nargs="*", type=float, default=[], help="extra penalty weights to run")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    args = parser.parse_args(argv)

    methods = rows(args.lams)
    jobs = [Job(s, label, ov, seed) for s in args.settings for label, ov in methods for seed in args.seeds]
    outcomes = map_runs(run_one, jobs, args.workers)
    by: dict[tuple[str, str], list[Outcome]] = {}
    for job, outcome in zip(jobs, outcomes, strict=True):
        by.setdefault((job.setting, job.label), []).append(outcome)

    ok = True
    for setting in args.settings:
        print(f"\n{setting} ({SETTINGS[setting][0]}), seeds {' '.join(map(str, args.seeds))}\n")
        print("| method | final avg acc | forgetting | BWT | seconds per run |")
        print("|---|---|---|---|---|")
        for label, _ in methods:
            got = by[(setting, label)]
            print(f"| {label} | {cell([o.accuracy for o in got])} | {cell([o.forgetting for o in got])} | "
                  f"{cell([o.bwt for o in got], signed=True)} | {statistics.fmean(o.seconds for o in got):.1f} |")
        if setting == "rotated":
            forget = {label: statistics.fmean(o.forgetting for o in by[(setting, label)]) for label, _ in methods}
            better = forget["reglora (lam 2500)"] < forget["lora (lam 0)"]
            print(f"\ncheck: reglora forgets less than lora: {'yes' if better else 'NO'}")
            ok = ok and better
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
