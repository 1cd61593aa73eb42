"""MEMO against replay on split digits, at the same number of exemplars and at
the same total memory (Zhou et al., "A Model or 603 Exemplars", ICLR 2023).

For each width of the specialized block (the MLP's last hidden layer,
``model.hidden=[256, W]``, the same backbone for every strategy) and each
exemplar budget, runs:

* ``memo``: the plugin at that budget (``plugins.memo.memory_size``);
* ``replay (herding)``: :class:`HerdingReplay`, the ``replay`` plugin with the
  exemplars chosen as MEMO's are (iCaRL herding, ``size // classes seen`` per
  class; ``plugins/replay.py`` has no herding policy, so this benchmark adds it
  by a small subclass), at the same number of exemplars;
* ``replay (same memory)``: the same, with as many exemplars as fit in MEMO's
  total memory (MEMO's final model + its exemplars, in bytes) next to the
  replay model's own parameters;
* ``finetune``.

Parameters count 4 bytes, an exemplar its stored size: an 8x8 digit is 64
float32 = 256 bytes, so a model's bytes buy many exemplars here (a CIFAR image
is 3,072 bytes): the paper's accounting favours replay on digits.

    python benchmarks/memo.py                                # widths 16 128, budgets 50 200
    python benchmarks/memo.py --widths 8 16 --budgets 50 --epochs 10
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from contlearn.plugins._herding import HerdingMemory
from contlearn.plugins._memo_net import count_parameters
from contlearn.plugins.replay import Replay

from contlearn import Experiment, hookimpl, load_config


class HerdingReplay(Replay):
    """``replay`` whose buffer holds herding-chosen exemplars (iCaRL), rebuilt
    after each experience with ``size // classes seen`` per class."""

    def __init__(self, size: int):
        super().__init__(Replay.Config(size=size, policy="class_balanced"))
        self.seen: list[int] = []

    def _make_buffer(self, device: torch.device) -> Any:
        return HerdingMemory(self.config.size, self.generator, device)

    @hookimpl
    def after_experience(self, run: Any, exp: Any) -> None:
        new = [c for c in exp.classes if c not in self.seen]
        self.seen = sorted(set(self.seen) | set(new))
        model = run.model
        was_training = model.training
        model.eval()
        self.buffer.update(lambda x: model(x).features, exp.train, new, len(self.seen))  # type: ignore[union-attr]
        model.train(was_training)


def run_one(overrides: list[str], plugins: dict[str, Any] | None = None) -> tuple[Any, Experiment, float]:
    cfg = load_config("split-digits", ["plugins={}", "eval.fwt=false", *overrides])
    t0 = time.perf_counter()
    experiment = Experiment(cfg, plugins=plugins)
    results = experiment.run()
    return results, experiment, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--budgets", nargs="+", type=int, default=[50, 200])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's (20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memo", nargs="*", default=[], help="extra plugins.memo.* overrides, e.g. train_base=false")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    common = [f"seed={args.seed}", "device=cpu"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    lines = ["| W | exemplars | strategy | classifier acc | NME acc | exemplars kept | model bytes | exemplar bytes "
             "| total bytes | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    failed: list[str] = []
    for width in args.widths:
        base = [*common, f"model.hidden=[256,{width}]"]
        ft, ft_exp, ft_s = run_one([*base, "plugins.finetune={}"])
        plain_bytes = 4 * count_parameters(ft_exp.run_state.model)
        lines.append(f"| {width} | 0 | finetune | {ft.average_accuracy:.3f} | - | 0 | {plain_bytes} | 0 "
                     f"| {plain_bytes} | {ft_s:.0f} |")
        for budget in args.budgets:
            memo_over = [f"plugins.memo.{o}" for o in args.memo]
            res, exp, s = run_one([*base, f"plugins.memo.memory_size={budget}", *memo_over])
            plugin = exp.run_state.plugins["memo"]
            rep = plugin.memory_rows[-1]
            nme = sum(plugin.accuracy["nme"][-1]) / len(plugin.accuracy["nme"][-1])
            lines.append(f"| {width} | {budget} | memo | {res.average_accuracy:.3f} | {nme:.3f} | {rep['exemplars']} "
                         f"| {rep['model_bytes']} | {rep['exemplar_bytes']} | {rep['total_bytes']} | {s:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
            per = int(rep["bytes_per_exemplar"])
            for label, size in (("replay (herding)", budget),
                                ("replay (same memory)", (int(rep["total_bytes"]) - plain_bytes) // per)):
                r, e, rs = run_one([*base, "plugins.finetune={}"], plugins={"replay": HerdingReplay(size)})
                kept = len(e.run_state.plugins["replay"].buffer)
                lines.append(f"| {width} | {size} | {label} | {r.average_accuracy:.3f} | - | {kept} | {plain_bytes} "
                             f"| {kept * per} | {plain_bytes + kept * per} | {rs:.0f} |")
                print(lines[-1], file=sys.stderr, flush=True)
                if label == "replay (herding)" and res.average_accuracy < r.average_accuracy:
                    failed.append(f"W={width}, {budget} exemplars: memo {res.average_accuracy:.3f} < replay "
                                  f"{r.average_accuracy:.3f}")
    command = "python benchmarks/memo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command.strip()}` (seed {args.seed}, CPU, torch {torch.__version__})\n")
    print("\n".join(lines))
    for f in failed:
        print(f"- below replay at the same number of exemplars: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
