"""DMN's adaptation to a set of classes: view features, the biases' training, the alpha search.

Zhang, Zhu, Wang, Zhang, "Dual Memory Networks: A Versatile Adaptation
Approach for Vision-Language Models", CVPR 2024 (reference code YBZh/DMN,
``dmn_main.py``). Holds :func:`encode_views` (CLIP features of an image and
its random views, the test-time augmentation DMN averages over),
:func:`train_biases` (the learnable variant's training of the residual biases
of a :class:`~contlearn.plugins._dmn_memory.DualMemory` on the shots) and
:func:`search_alphas` with its grid :data:`ALPHA_GRID` (the weights of the
dynamic and static read-outs). The plugin using them is
:class:`contlearn.plugins.dmn.DMN`.
"""

from __future__ import annotations

import math

import torch
from contlearn.plugins._clip import ClipImageEncoder, random_crops, random_views
from contlearn.plugins._dmn_memory import BIASES, DualMemory
from contlearn.scenarios.stream import host_to_device
from torch.nn import functional as F

#: Weights searched for alpha_d and alpha_s (the reference code's grid).
ALPHA_GRID: list[float] = [
    0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0
]  # fmt: skip


def encode_views(
    encoder: ClipImageEncoder,
    x: torch.Tensor,
    views: int,
    generator: torch.Generator,
    crop_min: float,
    flip: bool,
) -> torch.Tensor:
    """``[N, views, D]`` features of each image of ``x`` (view 0) and of its
    ``views - 1`` random resized crops (area fraction in ``[crop_min, 1]``,
    randomly flipped if ``flip``), drawn from ``generator``."""
    step = max(1, 1024 // views)
    out = []
    with torch.no_grad():
        for part in torch.split(x, step):
            crops = random_views(
                encoder.prepare(part), views, generator, (crop_min, 1.0), flip=flip
            )
            out.append(encoder.encode_prepared(crops.flatten(0, 1)).view(len(part), views, -1))
    return torch.cat(out)


def train_biases(
    memory: DualMemory,
    encoder: ClipImageEncoder,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    crop_min: float,
    flip: bool,
) -> list[float]:
    """DMN's learnable variant: AdamW (cosine schedule) on ``memory``'s residual
    biases, cross-entropy of the static-memory logits plus of the text logits,
    on one random crop of each shot ``x`` (labels ``y``) per epoch, batches
    drawn from ``generator``. Returns the mean loss per epoch."""
    device = memory.text.device
    params = [getattr(memory, name) for name in BIASES]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=1e-8)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-7)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = torch.zeros((), dtype=torch.float64, device=device)  # read once per epoch, not per step
        for idx in torch.split(order, batch_size):
            xb, yb = host_to_device(x[idx], device), host_to_device(y[idx], device)
            with torch.no_grad():
                crops = random_crops(encoder.prepare(xb), 1, generator, (crop_min, 1.0), flip=flip)
                v = encoder.encode_prepared(crops[:, 0])
            text_logits = memory.logit_scale * v @ memory.text_weights().t()
            loss = F.cross_entropy(memory.static_logits(v), yb) + F.cross_entropy(text_logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().double() * len(idx)
        losses.append(float(total) / len(y))
    return losses


def search_alphas(
    p: tuple[torch.Tensor, ...], y: torch.Tensor, grid_d: list[float], grid_s: list[float]
) -> tuple[float, float, float]:
    """The ``(alpha_d, alpha_s)`` of the grids with the best accuracy of
    ``P_text + alpha_d P_dynamic + alpha_s P_static`` on labels ``y`` (the first
    in grid order on ties, as the reference code), and that accuracy."""
    p_text, p_dyn, p_static = p
    ad = torch.tensor(grid_d, device=y.device)[:, None, None, None]
    as_ = torch.tensor(grid_s, device=y.device)[None, :, None, None]
    pred = (p_text + ad * p_dyn + as_ * p_static).argmax(dim=-1)
    acc = (pred == y).float().mean(dim=-1).flatten()
    best = int(acc.argmax())
    return grid_d[best // len(grid_s)], grid_s[best % len(grid_s)], float(acc[best])
