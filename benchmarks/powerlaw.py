"""Power-law rehearsal against other schedules at the same budget, and against EWC.

Gandhi, Shah, Marupudi and Varma (arXiv:2401.10393, 2024) report that
rehearsing past tasks on a power-law schedule mitigates catastrophic
interference as well as regularisers and as well as, or better than,
rehearsal on other schedules with the same amount of data. This benchmark
checks that claim on

* permuted digits: domain-incremental, 10 pixel permutations (the paper's
  setting on digits instead of MNIST; ``permuted-digits``);
* split digits: class-incremental, 5 experiences of 2 classes (``split-digits``);

with every method on the same model, optimizer, epochs and seeds:

* ``power law``: ``plugins.powerlaw`` at its defaults (``since: first``, the
  study's earlier code: n ~ (age + 10)^-5.6);
* ``power law (1/age)``: a milder decay, exponent 1 and offset 0 (n ~ 1/age);
* ``power law (last)``: the same decay read as the chance of meeting a task
  again, ``since: last`` (tasks recur at random; a met task's clock resets);
* ``power law (index)``: the budgeted ``powerlaw`` environment of the study's
  code, n ~ (10 + task index)^4 (``schedule: power_law_index``, alpha 5);
* ``uniform``, ``exponential`` (tau 1): the same number of rehearsal samples
  per phase as the power law (``budget_fraction`` of the experience's size),
  shared equally / by exp(-age);
* ``none`` (fine-tuning, the lower bound) and ``all`` (every past sample, the
  upper bound of rehearsal; more data than the others);
* ``ewc``: ``plugins.ewc`` (separate penalties, batch Fisher), no rehearsal, at
  penalty weights 1, 10 and 100 (at these settings' SGD lr 0.1, 1000 diverges in
  some seeds and 10000 in most: docs/plugins/powerlaw.md; a run that diverges is
  reported as such).

Reported per method, mean and standard deviation over the seeds: final average
accuracy, forgetting, forward facilitation (accuracy on each new task's test
data after its first epoch, averaged over experiences 1..n-1: how fast a new
task is learnt) and the rehearsal samples per phase. Then, per seed, power law
minus uniform in final accuracy: whether power law matches or beats uniform at
equal budget.

    python benchmarks/powerlaw.py --seeds 0 1 2 3 4 --epochs 20   # the table of docs/plugins/powerlaw.md
    python benchmarks/powerlaw.py --budget-fraction 0.1 --methods "power law" uniform exponential
    python benchmarks/powerlaw.py --settings split --seeds 0   # a quick look (split digits is fast)

Runs go to ``--workers`` processes (default: all CPUs but one), one thread
each: the documented table's 100 runs (20 epochs, 5 seeds) take about 90 s on
15 CPU cores, far longer on a busy 2-core machine (there, ``--epochs 5 --seeds 0``).
The defaults are 3 seeds of 5 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
from _parallel import map_runs

from contlearn import Experiment, TrainingError, hookimpl, load_config
from contlearn.report import mean_std

#: method label -> plugin overrides (besides the common budget)
METHODS: dict[str, list[str]] = {
    "power law": ["plugins.powerlaw.schedule=power_law"],
    "power law (1/age)": [
        "plugins.powerlaw.schedule=power_law",
        "plugins.powerlaw.exponent=1.0",
        "plugins.powerlaw.offset=0.0",
    ],
    "power law (last)": ["plugins.powerlaw.schedule=power_law", "plugins.powerlaw.since=last"],
    "power law (index)": ["plugins.powerlaw.schedule=power_law_index"],
    "uniform": ["plugins.powerlaw.schedule=uniform"],
    "exponential": ["plugins.powerlaw.schedule=exponential", "plugins.powerlaw.tau=1.0"],
    "none": ["plugins.powerlaw.schedule=none"],
    "all": ["plugins.powerlaw.schedule=all"],
    "ewc (lam 1)": ["plugins.ewc.lam=1"],
    "ewc (lam 10)": ["plugins.ewc.lam=10"],
    "ewc (lam 100)": ["plugins.ewc.lam=100"],
}

#: short name -> (title, shipped config)
SETTINGS: dict[str, tuple[str, str]] = {
    "permuted": ("Permuted digits (domain-incremental, 10 permutations)", "permuted-digits"),
    "split": ("Split digits (class-incremental, 5 experiences x 2 classes)", "split-digits"),
}


class FirstEpochAccuracy:
    """Accuracy on the current experience's test data after its first epoch (forward facilitation)."""

    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    @hookimpl
    def on_metrics(self, run: Any, metrics: dict[str, Any]) -> None:
        if metrics["kind"] != "epoch" or metrics["epoch"] != 0:
            return
        exp, model = run.experience, run.model
        was_training = model.training
        model.eval()
        hits = torch.zeros((), dtype=torch.long, device=run.device)
        with torch.no_grad():
            for batch in exp.test.batches(run.config.train.eval_batch_size):
                hits += (run.hook.predict(run=run, batch=batch) == batch.y).sum()
        model.train(was_training)
        self.values[exp.index] = int(hits) / max(len(exp.test), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {int(k): float(v) for k, v in state["values"].items()}


def run_one(job: tuple[str, str, int, list[str]]) -> dict[str, Any]:
    """Train one (setting, method, seed); the metrics as a plain dict."""
    setting, method, seed, common = job
    torch.set_num_threads(1)
    ewc = method.startswith("ewc")
    plugin = [] if ewc else ["plugins.powerlaw={}"]
    overrides = ["plugins={}", "eval.fwt=false", f"seed={seed}", *plugin, *common, *METHODS[method]]
    if ewc:
        overrides = [o for o in overrides if not o.startswith("plugins.powerlaw.")]
    cfg = load_config(SETTINGS[setting][1], overrides)
    first = FirstEpochAccuracy()
    experiment = Experiment(cfg, plugins={"first_epoch": first})
    t0 = time.perf_counter()
    try:
        results = experiment.run()
    except TrainingError as exc:
        nan = float("nan")
        return {
            "setting": setting,
            "method": method,
            "seed": seed,
            "diverged": str(exc),
            **dict.fromkeys(("average_accuracy", "forgetting", "facilitation"), nan),
            "rehearsed_per_phase": None,
            "seconds": time.perf_counter() - t0,
            "accuracy_matrix": None,
        }
    seconds = time.perf_counter() - t0
    facilitation = [v for k, v in sorted(first.values.items()) if k >= 1]
    rehearsed = None
    powerlaw = (
        experiment.run_state.plugins.get("powerlaw") if experiment.run_state is not None else None
    )
    if powerlaw is not None:
        rehearsed = statistics.mean(sum(h["counts"]) for h in powerlaw.history[1:])
    return {
        "setting": setting,
        "method": method,
        "seed": seed,
        "diverged": None,
        "average_accuracy": results.average_accuracy,
        "forgetting": results.forgetting,
        "facilitation": statistics.mean(facilitation),
        "rehearsed_per_phase": rehearsed,
        "seconds": seconds,
        "accuracy_matrix": results.accuracy_matrix,
    }


def table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    lines = [
        "| method | final avg acc | forgetting | forward facilitation | rehearsed / phase | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        every = [r for r in rows if r["method"] == m]
        mine = [r for r in every if r["diverged"] is None]
        if len(mine) < len(every):
            lines.append(
                f"| {m} | diverged in {len(every) - len(mine)} of {len(every)} seeds | | | | |"
            )
        if not mine:
            continue
        reh = [r["rehearsed_per_phase"] for r in mine]
        reh_text = "-" if reh[0] is None else f"{statistics.mean(reh):.0f}"
        secs = statistics.mean(r["seconds"] for r in mine)
        lines.append(
            f"| {m} | {mean_std([r['average_accuracy'] for r in mine])} | {mean_std([r['forgetting'] for r in mine])} "
            f"| {mean_std([r['facilitation'] for r in mine])} | {reh_text} | {secs:.0f} |"
        )
    return "\n".join(lines)


def versus(rows: list[dict[str, Any]], a: str, b: str) -> str | None:
    """Per seed, ``a`` minus ``b`` in final average accuracy."""
    acc = {(r["method"], r["seed"]): r["average_accuracy"] for r in rows if r["diverged"] is None}
    seeds = sorted({s for m, s in acc if m == a} & {s for m, s in acc if m == b})
    if not seeds:
        return None
    diffs = [acc[(a, s)] - acc[(b, s)] for s in seeds]
    per_seed = ", ".join(f"{d:+.3f}" for d in diffs)
    wins = sum(d >= 0 for d in diffs)
    return (
        f"{a} - {b}, final avg acc, per seed: {per_seed}; mean {statistics.mean(diffs):+.3f}; "
        f"{a} >= {b} in {wins} of {len(diffs)} seeds"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--epochs", type=int, default=5, help="epochs per experience (the configs say 20)"
    )
    parser.add_argument(
        "--budget-fraction", type=float, default=0.5, help="rehearsal per phase / experience size"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--json", help="write every run's metrics to this file")
    args = parser.parse_args(argv)

    common = [
        f"train.epochs={args.epochs}",
        f"device={args.device}",
        f"plugins.powerlaw.budget_fraction={args.budget_fraction}",
    ]
    jobs = [
        (s, m, seed, common) for s in args.settings for seed in args.seeds for m in args.methods
    ]
    t0 = time.perf_counter()
    rows = map_runs(run_one, jobs, args.workers)
    for r in rows:
        print(
            f"{r['setting']} {r['method']} seed {r['seed']}: {r['average_accuracy']:.3f}",
            file=sys.stderr,
        )
    print(
        f"# {len(rows)} runs in {time.perf_counter() - t0:.0f} s ({args.workers} workers, device {args.device})\n"
    )
    for s in args.settings:
        mine = [r for r in rows if r["setting"] == s]
        print(f"## {SETTINGS[s][0]}\n")
        print(
            f"epochs {args.epochs}, budget {args.budget_fraction} x experience size, seeds {args.seeds}\n"
        )
        print(table(mine, args.methods) + "\n")
        for other in ("uniform", "exponential", *(m for m in args.methods if m.startswith("ewc"))):
            line = versus(mine, "power law", other)
            if line:
                print(f"- {line}")
        for variant in ("power law (last)", "power law (index)"):
            line = versus(mine, variant, "uniform")
            if line:
                print(f"- {line}")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
