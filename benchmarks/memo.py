"""MEMO against replay on split digits, at the same number of exemplars and at
the same total memory (Zhou et al., "A Model or 603 Exemplars", ICLR 2023).

For each width W of the specialized block (the MLP's last hidden layer,
``model.hidden=[256, W]``, the same backbone for every strategy), each seed and
each exemplar budget, runs:

* ``memo wa=true`` / ``memo wa=false``: the plugin at that budget, with and
  without weight aligning (``--align``);
* ``replay (joined, herding)``: :class:`JoinedReplay`, PyCIL's ``Replay``
  baseline, the one the paper compares against: the herding exemplars are
  appended to the experience's training set (MEMO's own data protocol), same
  model as finetune, same number of exemplars as MEMO;
* ``replay (ER, herding)``: :class:`HerdingReplay`, the ``replay`` plugin
  (experience replay: a batch drawn from the buffer joins every training step)
  whose buffer is chosen by herding, at the same number of exemplars;
* ``replay (joined|ER, same memory)``: the same two with as many exemplars as
  fit in MEMO's total memory (MEMO's final model + its exemplars, in bytes)
  next to the replay model's own parameters;
* ``finetune``.

Both replay variants choose their exemplars as MEMO does (iCaRL herding on the
network's normalised features, ``size // classes seen`` per class, old classes
keeping the head of their ranking); ``plugins/replay.py`` has no herding
policy, so this file adds it by a subclass and a small plugin.

Parameters count 4 bytes, an exemplar its stored size: an 8x8 digit is 64
float32 = 256 bytes, so a model's bytes buy many exemplars here (a CIFAR image
is 3,072 bytes): the paper's accounting favours replay on digits.

    python benchmarks/memo.py --seeds 0 1 2 --epochs 20 --jobs 2
    python benchmarks/memo.py --widths 16 --budgets 50 --epochs 10 --align false
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from _parallel import map_runs
from contlearn.plugins._herding import HerdingMemory
from contlearn.plugins._memo_net import count_parameters
from contlearn.plugins.replay import Replay
from contlearn.scenarios import TensorData

from contlearn import Experiment, hookimpl, load_config
from contlearn.report import mean_std

ER, JOINED = "replay (ER, herding)", "replay (joined, herding)"
ER_SAME, JOINED_SAME = "replay (ER, same memory)", "replay (joined, same memory)"


def _herding_update(memory: HerdingMemory, seen: list[int], run: Any, exp: Any) -> list[int]:
    """Add the experience's new classes to ``memory`` by herding on the model's
    features (eval mode); returns the classes seen so far."""
    new = [c for c in exp.classes if c not in seen]
    seen = sorted(set(seen) | set(new))
    model = run.model
    was_training = model.training
    model.eval()
    memory.update(lambda x: model(x).features, exp.train, new, len(seen))
    model.train(was_training)
    return seen


class HerdingReplay(Replay):
    """``replay`` (ER: a replayed batch at every step) whose buffer holds
    herding-chosen exemplars (iCaRL), rebuilt after each experience with
    ``size // classes seen`` per class."""

    def __init__(self, size: int):
        super().__init__(Replay.Config(size=size, policy="class_balanced"))
        self.seen: list[int] = []

    def _make_buffer(self, device: torch.device) -> Any:
        return HerdingMemory(self.config.size, self.generator, device)

    @hookimpl
    def after_experience(self, run: Any, exp: Any) -> None:
        self.seen = _herding_update(self.buffer, self.seen, run, exp)  # type: ignore[arg-type]


class JoinedReplay:
    """PyCIL's ``Replay`` (the rehearsal baseline of the MEMO paper): herding
    exemplars, ``size // classes seen`` per class, appended to each
    experience's training set; plain cross-entropy."""

    def __init__(self, size: int):
        self.size = size
        self.memory: HerdingMemory | None = None
        self.seen: list[int] = []

    @hookimpl
    def setup(self, run: Any) -> None:
        if self.memory is None:
            self.memory = HerdingMemory(self.size, device=run.device)

    @hookimpl
    def train_data(self, run: Any, exp: Any) -> TensorData | None:
        assert self.memory is not None
        return self.memory.joined(exp.train)

    @hookimpl
    def after_experience(self, run: Any, exp: Any) -> None:
        assert self.memory is not None
        self.seen = _herding_update(self.memory, self.seen, run, exp)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen), "memory": None if self.memory is None else self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = list(state["seen"])
        if self.memory is not None and state["memory"] is not None:
            self.memory.load_state_dict(state["memory"])


@dataclass
class Job:
    width: int
    seed: int
    budget: int  # the MEMO budget the row belongs to (0: finetune)
    strategy: str
    size: int = 0  # exemplars asked
    overrides: list[str] = field(default_factory=list)
    threads: int = 1


def run_job(job: Job) -> dict[str, Any]:
    """One run; the row of the table (before averaging over seeds)."""
    torch.set_num_threads(job.threads)
    base = ["plugins={}", "eval.fwt=false", "device=cpu", f"seed={job.seed}",
            f"model.hidden=[256,{job.width}]", *job.overrides]
    plugins: dict[str, Any] | None = None
    if job.strategy.startswith("memo"):
        cfg = [*base, f"plugins.memo.memory_size={job.size}",
               f"plugins.memo.weight_align={job.strategy.split('wa=')[1]}"]
    else:
        cfg = [*base, "plugins.finetune={}"]
        if job.strategy in (ER, ER_SAME):
            plugins = {"replay": HerdingReplay(job.size)}
        elif job.strategy in (JOINED, JOINED_SAME):
            plugins = {"replay_joined": JoinedReplay(job.size)}
    t0 = time.perf_counter()
    experiment = Experiment(load_config("split-digits", cfg), plugins=plugins)
    results = experiment.run()
    seconds = time.perf_counter() - t0
    run = experiment.run_state
    per = run.stream[0].train.x[0].numel() * run.stream[0].train.x.element_size()
    row = asdict(job) | {"acc": float(results.average_accuracy), "nme": None, "align_factors": []}
    row.pop("overrides")
    row.pop("threads")
    if job.strategy.startswith("memo"):
        plugin = run.plugins["memo"]
        rep = plugin.memory_rows[-1]
        nme = plugin.accuracy["nme"][-1]
        row |= {"nme": sum(nme) / len(nme), "kept": int(rep["exemplars"]), "model_bytes": int(rep["model_bytes"]),
                "align_factors": list(plugin.align_factors)}
    else:
        memory = {ER: "replay", ER_SAME: "replay", JOINED: "replay_joined", JOINED_SAME: "replay_joined"}
        name = memory.get(job.strategy)
        store = None if name is None else getattr(run.plugins[name], "buffer" if name == "replay" else "memory")
        kept = 0 if store is None else len(store)
        row |= {"kept": kept, "model_bytes": 4 * count_parameters(run.model)}
    row |= {"exemplar_bytes": row["kept"] * per, "bytes_per_exemplar": per, "seconds": seconds}
    row["total_bytes"] = row["model_bytes"] + row["exemplar_bytes"]
    return row


def run_all(jobs: list[Job], n_jobs: int) -> list[dict[str, Any]]:
    if n_jobs <= 1:
        rows = []
        for job in jobs:
            rows.append(run_job(job))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        return rows
    rows = map_runs(run_job, jobs, n_jobs)
    for row in rows:
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


ORDER = ["finetune", "memo wa=true", "memo wa=false", JOINED, ER, JOINED_SAME, ER_SAME]


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Mean ± standard deviation over the seeds, one line per (W, budget, strategy)."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["width"], r["budget"], r["strategy"])].append(r)
    lines = ["| W | MEMO budget | strategy | exemplars asked | classifier acc | NME acc | exemplars kept "
             "| model bytes | exemplar bytes | total bytes | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (w, b, s) in sorted(groups, key=lambda k: (k[0], k[1], ORDER.index(k[2]))):
        g = groups[(w, b, s)]
        nme = mean_std([r["nme"] for r in g]) if g[0]["nme"] is not None else "-"

        def mean(key: str, g: list[dict[str, Any]] = g) -> float:
            return statistics.mean(r[key] for r in g)

        lines.append(f"| {w} | {b} | {s} | {g[0]['size']} | {mean_std([r['acc'] for r in g])} | {nme} "
                     f"| {mean('kept'):.0f} | {mean('model_bytes'):.0f} | {mean('exemplar_bytes'):.0f} "
                     f"| {mean('total_bytes'):.0f} | {mean('seconds'):.0f} |")
    return lines


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """MEMO against each replay at the same number of exemplars: mean difference
    over the seeds and the seeds on which MEMO is at least as accurate."""
    acc = {(r["width"], r["budget"], r["strategy"], r["seed"]): r["acc"] for r in rows}
    out = []
    keys = sorted({(r["width"], r["budget"], r["strategy"]) for r in rows if r["strategy"].startswith("memo")})
    for w, b, memo in keys:
        seeds = sorted(s for (ww, bb, st, s) in acc if (ww, bb, st) == (w, b, memo))
        for other in (JOINED, ER):
            pairs = [(acc[(w, b, memo, s)], acc[(w, b, other, s)]) for s in seeds if (w, b, other, s) in acc]
            if not pairs:
                continue
            diff = statistics.mean(m - o for m, o in pairs)
            wins = sum(m >= o for m, o in pairs)
            verdict = "holds" if diff >= 0 else "fails"
            out.append(f"- W={w}, {b} exemplars, {memo} vs {other}: {diff:+.3f} on average, "
                       f"MEMO >= replay on {wins}/{len(pairs)} seeds: {verdict}")
    return out


def factors(rows: list[dict[str, Any]]) -> list[str]:
    """Weight aligning's factors (mean |w_old| / mean |w_new|), by experience, over the seeds."""
    groups: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for r in rows:
        if r["align_factors"]:
            groups[(r["width"], r["budget"])].append(r["align_factors"])
    out = []
    for (w, b), fs in sorted(groups.items()):
        per_exp = [statistics.mean(f[i] for f in fs) for i in range(min(len(f) for f in fs))]
        out.append(f"- W={w}, {b} exemplars: aligning factor after experiences 1.. = "
                   + ", ".join(f"{g:.2f}" for g in per_exp) + f" (mean over {len(fs)} seeds)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--budgets", nargs="+", type=int, default=[50, 200])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's (20)")
    parser.add_argument("--align", nargs="+", choices=["true", "false"], default=["true", "false"],
                        help="MEMO's weight_align settings to run")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides",
                        help="config overrides for every strategy, e.g. train.momentum=0.9")
    parser.add_argument("--memo", nargs="*", default=[], help="extra plugins.memo.* overrides, e.g. train_base=false")
    parser.add_argument("--skip", nargs="*", default=[], choices=ORDER, help="strategies not to run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--json", default=None, help="write every run's row to this file")
    args = parser.parse_args(argv)

    common = [*args.overrides] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    memo_common = [*common, *(f"plugins.memo.{o}" for o in args.memo)]
    memo_names = [f"memo wa={a}" for a in args.align]
    wanted = [s for s in ORDER if s not in args.skip]
    first: list[Job] = []
    for w in args.widths:
        for seed in args.seeds:
            if "finetune" in wanted:
                first.append(Job(w, seed, 0, "finetune", 0, common, args.threads))
            for b in args.budgets:
                first += [Job(w, seed, b, m, b, memo_common, args.threads) for m in memo_names if m in wanted]
                first += [Job(w, seed, b, s, b, common, args.threads) for s in (JOINED, ER) if s in wanted]
    rows = run_all(first, args.jobs)
    # equal total memory: as many exemplars as fit into MEMO's final bytes next to the plain model
    memo_bytes = {(r["width"], r["seed"], r["budget"]): (r["total_bytes"], r["bytes_per_exemplar"])
                  for r in rows if r["strategy"] in memo_names}
    plain = {r["width"]: r["model_bytes"] for r in rows if r["strategy"] == "finetune"}
    second: list[Job] = []
    for (w, seed, b), (total, per) in sorted(memo_bytes.items()):
        if w not in plain:
            continue
        size = (total - plain[w]) // per
        second += [Job(w, seed, b, s, size, common, args.threads) for s in (JOINED_SAME, ER_SAME) if s in wanted]
    rows += run_all(second, args.jobs)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": argv if argv is not None else sys.argv[1:], "rows": rows}, f, indent=1)
    command = "python benchmarks/memo.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"`{command.strip()}` (seeds {' '.join(map(str, args.seeds))}, CPU, torch {torch.__version__}; "
          f"accuracy: mean ± std over seeds)\n")
    print("\n".join(table(rows)))
    print()
    print("\n".join(verdicts(rows)))
    print("\n".join(factors(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
