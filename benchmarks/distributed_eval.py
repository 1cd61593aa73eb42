"""Evaluation under torchrun: each process's share of the test data against every
process evaluating all of it (docs/distributed.md).

Run it under torchrun; it runs the same experiment twice per repeat, once as
contlearn does (evaluation sharded) and once with a plugin that sets
``sequential_evaluation`` (every process evaluates everything), and prints the
evaluation seconds of each (median over ``--repeats``) and their ratio, with
the final accuracies, which must be equal::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/distributed_eval.py
    torchrun --nproc_per_node 8 benchmarks/distributed_eval.py device=cuda model.backbone=resnet18 ...

Extra arguments are config overrides of split digits (an MLP 64-4096-4096 by
default, one epoch, so that evaluation is a visible share of the time).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from contlearn import Experiment, load_config

WORKLOAD = [
    "device=cpu",
    "train.epochs=1",
    "scenario.n_experiences=5",
    "eval.fwt=true",
    "model.hidden=[4096,4096]",
    "train.eval_batch_size=64",
]


class EveryProcessEvaluatesAll:
    """No hooks: its class attribute alone turns evaluation sharding off."""

    sequential_evaluation = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides of split digits")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    seconds: dict[str, list[float]] = {"sharded": [], "every process all": []}
    accuracy: dict[str, float] = {}
    for round_ in range(args.repeats + 1):  # round 0 untimed: first-use costs go to neither contender
        for name in seconds:
            plugins = {"in_order": EveryProcessEvaluatesAll()} if name != "sharded" else {}
            results = Experiment(load_config("split-digits", [*WORKLOAD, *args.overrides]), plugins=plugins).run()
            if round_:
                seconds[name].append(results.timings["eval_seconds"])
            accuracy[name] = results.average_accuracy
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1 and torch.distributed.get_rank() != 0:
        return
    print(f"{world} process(es), evaluation seconds, median of {args.repeats}:")
    for name, values in seconds.items():
        print(f"  {name:<18} {statistics.median(values):7.3f} s   final average accuracy {accuracy[name]:.4f}")
    ratio = statistics.median(seconds["every process all"]) / statistics.median(seconds["sharded"])
    print(f"  speed-up of sharding: {ratio:.2f}x")


if __name__ == "__main__":
    main()
