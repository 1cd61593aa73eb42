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

``--backbone vit`` replaces the MLP by a small vision transformer (timm's
``VisionTransformer`` on the 8x8 digits: patches of 2x2, width 64, depth 4, 4
heads, built without weights), whose attention (``qkv``, ``proj``) and MLP
(``fc1``, ``fc2``) layers get the adapters: 16 matrices, as in the reference's
transformer.

    python benchmarks/reglora.py                       # seeds 0-2, both settings
    python benchmarks/reglora.py --settings rotated --lams 250 25000 --workers 2
    python benchmarks/reglora.py --settings rotated --backbone vit --seeds 0 1 --lams 25000 --workers 2
    python benchmarks/reglora.py --settings rotated --overrides train.lr_schedule=cosine \
        train.lr_schedule_unit=step train.warmup=0.03   # the reference's schedule
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from _parallel import map_runs
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from contlearn import Experiment, load_config
from contlearn.models import backbones

SETTINGS: dict[str, tuple[str, list[str]]] = {
    "rotated": ("rotated-digits-reglora", []),
    "task": ("task-digits", ["train.epochs=5", "train.optimizer=adamw", "train.lr=0.001", "plugins={}", "plugins.reglora={}"]),
}


def vit_digits(shape: tuple[int, ...], cfg: object) -> nn.Module:
    """A small ViT for 8x8 digits (``--backbone vit``): 16 tokens of 2x2 patches."""
    net = VisionTransformer(img_size=8, patch_size=2, in_chans=shape[0], num_classes=0, embed_dim=64, depth=4,
                            num_heads=4, mlp_ratio=2.0)
    net.out_features = net.num_features
    return net


#: --backbone -> overrides (and the backbone registered under that name, in every worker)
BACKBONE_OVERRIDES = {"mlp": [], "vit": ["model.backbone=vit-digits"]}


@dataclass
class Job:
    setting: str
    label: str
    overrides: list[str]
    seed: int
    backbone: str = "mlp"
    extra: list[str] | None = None  # --overrides, applied to every run


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
    backbones.BACKBONES["vit-digits"] = vit_digits
    with tempfile.TemporaryDirectory() as out:
        overrides = [*common, *BACKBONE_OVERRIDES[job.backbone], *job.overrides, *(job.extra or [])]
        cfg = load_config(name, [*overrides, f"seed={job.seed}", "eval.fwt=false", "checkpoint.enabled=false",
                                 f"out={out}/run", "threads=1"])
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
    parser.add_argument("--backbone", choices=sorted(BACKBONE_OVERRIDES), default="mlp")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides for every run, e.g. a schedule")
    args = parser.parse_args(argv)

    methods = rows(args.lams)
    jobs = [Job(s, label, ov, seed, args.backbone, args.overrides)
            for s in args.settings for label, ov in methods for seed in args.seeds]  # fmt: skip
    outcomes = map_runs(run_one, jobs, args.workers)
    by: dict[tuple[str, str], list[Outcome]] = {}
    for job, outcome in zip(jobs, outcomes, strict=True):
        by.setdefault((job.setting, job.label), []).append(outcome)

    ok = True
    for setting in args.settings:
        extra = f", {' '.join(args.overrides)}" if args.overrides else ""
        print(f"\n{setting} ({SETTINGS[setting][0]}), {args.backbone}, seeds {' '.join(map(str, args.seeds))}{extra}\n")
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
