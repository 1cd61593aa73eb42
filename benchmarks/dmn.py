"""DMN on bundled digits: zero-shot CLIP against DMN zero-shot, training-free
(1, 2, 4, 8 shots) and learnable, over all ten classes.

Without weights to download, a tiny open_clip CLIP (``contlearn-tiny-clip``)
is first trained contrastively on images and captions ("a photo of the digit
three.") of some classes only (``--pretrain-classes``, default 0-4), then
frozen and evaluated on all classes. The classes it never saw captions of are
where zero-shot CLIP fails and DMN's memories can help. alpha_d and alpha_s
are chosen on 10 held-out training images per class, never on test labels.

    python benchmarks/dmn.py                      # tiny CLIP, a few minutes on 2 cores
    python benchmarks/dmn.py --clip ViT-B-16 --pretrained openai   # cached real weights

With ``--pretrained`` nothing is trained: the CLIP is used as loaded.
Digits (8x8, one channel) are replicated to three channels and resized to the
CLIP's input size by :class:`~contlearn.plugins._clip.ClipImageEncoder`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from contlearn.plugins._clip import DIGIT_NAMES, DIGIT_TEMPLATES, ClipClassifier, train_contrastive
from contlearn.plugins.dmn import DMN
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    """The ``digits`` source's split: 20% test, stratified, [N, 1, 8, 8] in [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return x_tr, y_tr, x_te, y_te


def per_class(y: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random indices of each class."""
    out = []
    for c in sorted(set(y.tolist())):
        idx = (y == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.cat(out)


def accuracy(p: torch.Tensor, y: torch.Tensor, classes: list[int]) -> float:
    """Accuracy on the test images of ``classes`` (NaN when there are none)."""
    if not classes:
        return float("nan")
    keep = torch.isin(y, torch.tensor(classes))
    return float((p.argmax(1)[keep] == y[keep]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", default="contlearn-tiny-clip")
    ap.add_argument("--pretrained", default=None, help="tag or file; default: train the CLIP here")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--pretrain-classes", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=20, help="contrastive epochs")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--shots", default="1,2,4,8")
    ap.add_argument("--learnable-shots", type=int, default=8)
    ap.add_argument("--learnable-lr", type=float, default=1e-3)
    ap.add_argument("--learnable-epochs", type=int, default=20)
    ap.add_argument("--crop-min", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=3, help="draws of shots and views")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    x_tr, y_tr, x_te, y_te = digits(0)
    seen = [int(c) for c in args.pretrain_classes.split(",")]
    unseen = [c for c in range(10) if c not in seen]
    held = per_class(y_tr, 10, torch.Generator().manual_seed(0))
    pool = torch.tensor([i for i in range(len(y_tr)) if i not in set(held.tolist())])

    torch.manual_seed(0)
    model = ClipClassifier.build(args.clip, DIGIT_NAMES, DIGIT_TEMPLATES, args.pretrained, args.cache_dir)
    model.adapt(list(range(10)))
    if args.pretrained is None:
        train = pool[torch.isin(y_tr[pool], torch.tensor(seen))]
        losses = train_contrastive(
            model, x_tr[train], y_tr[train], args.epochs, args.lr, 64, generator=torch.Generator().manual_seed(0)
        )
        print(f"contrastive training on classes {seen}: {len(train)} images, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    model.set_trainable(False).eval()

    def config(**kw) -> DMN.Config:
        return DMN.Config(views=args.views, crop_min=args.crop_min, flip=False, **kw)

    rows: dict[str, list[tuple[float, float, float, list[float]]]] = {}
    for seed in range(args.seeds):
        probe = DMN(config())
        probe.generator.manual_seed(seed)
        test_feats = probe.view_features(model, x_te)
        val_feats = probe.view_features(model, x_tr[held])

        def run(name: str, cfg: DMN.Config, k: int, seed=seed, val_feats=val_feats, test_feats=test_feats) -> None:
            dmn = DMN(cfg)
            dmn.generator.manual_seed(seed)
            shots = None
            if k:
                idx = pool[per_class(y_tr[pool], k, torch.Generator().manual_seed(100 + seed))]
                shots = {c: x_tr[idx[y_tr[idx] == c]] for c in range(10)}
            dmn.fit(model, shots, x_tr[held], y_tr[held], val_feats)
            p = dmn.probabilities(model, feats=test_feats)
            rows.setdefault(name, []).append(
                (accuracy(p, y_te, list(range(10))), accuracy(p, y_te, seen), accuracy(p, y_te, unseen), dmn.alpha)
            )

        with torch.no_grad():
            p_clip = torch.softmax(100 * test_feats[:, 0] @ model.head.classifier().t(), dim=1)
        acc = (accuracy(p_clip, y_te, list(range(10))), accuracy(p_clip, y_te, seen), accuracy(p_clip, y_te, unseen))
        rows.setdefault("CLIP zero-shot", []).append((*acc, None))  # no memories, so no alphas
        run("DMN zero-shot", config(mode="zero_shot", shots=0), 0)
        for k in [int(s) for s in args.shots.split(",")]:
            run(f"DMN training-free, {k} shot{'s' if k > 1 else ''}", config(mode="training_free", shots=k), k)
        k = args.learnable_shots
        run(
            f"DMN learnable, {k} shots (lr {args.learnable_lr:g}, {args.learnable_epochs} epochs)",
            config(mode="learnable", shots=k, lr=args.learnable_lr, epochs=args.learnable_epochs),
            k,
        )
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def fmt(values: list[float]) -> str:
        if any(np.isnan(values)):
            return "-"
        mean = statistics.mean(values)
        return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"

    print(f"\n{args.clip} ({args.pretrained or f'trained on captions of {seen}'}), {args.views} views, "
          f"{args.seeds} seeds, test {len(y_te)} images")
    print("| method | all classes | seen classes | unseen classes | alpha_d, alpha_s (median) |")
    print("|---|---|---|---|---|")
    for name, results in rows.items():
        all_, s, u, alphas = zip(*results, strict=True)
        med = "-" if alphas[0] is None else ", ".join(f"{v:g}" for v in np.median(np.array(alphas), axis=0))
        print(f"| {name} | {fmt(list(all_))} | {fmt(list(s))} | {fmt(list(u))} | {med} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
