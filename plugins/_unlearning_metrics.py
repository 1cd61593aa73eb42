"""How well a model forgot: accuracies and the membership-inference attack of SSD's evaluation.

The attack is the one Foster et al. ("Fast Machine Unlearning Without Retraining
Through Selective Synaptic Dampening", AAAI 2024) take from Chundawat et al.
("Can Bad Teaching Induce Forgetting?", AAAI 2023): the entropy of the softmax
output is the only feature; a logistic regression with balanced class weights is
fitted to tell members (the retained training data) from non-members (the test
data), and the score is the fraction of the forget set's training samples it
calls members. A model that forgot well scores low: its forget samples look
like data it never saw.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

#: predict(batch) -> predicted classes [B]
Predict = Callable[[Any], torch.Tensor]


def model_predict(model: nn.Module) -> Predict:
    """The argmax of ``model``'s logits."""
    return lambda b: model(b.x, b.t).logits.argmax(dim=1)


@torch.no_grad()
def accuracy(model: nn.Module, predict: Predict, data: Any, batch_size: int) -> float | None:
    """Fraction of ``data`` (``TensorData`` or ``LoaderData``) ``predict`` gets right,
    in eval mode; ``None`` for empty data."""
    if data is None or len(data) == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        hits: torch.Tensor | int = 0
        for b in data.batches(batch_size):
            hits = hits + (predict(b) == b.y.to(b.x.device)).sum()  # stays on the device
        return float(hits) / len(data)
    finally:
        model.train(was_training)


@torch.no_grad()
def softmax_entropy(model: nn.Module, data: Any, batch_size: int) -> torch.Tensor:
    """Entropy of the softmax of ``model``'s logits for each sample of ``data``, on the CPU."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for b in data.batches(batch_size):
            p = torch.softmax(model(b.x, b.t).logits.float(), dim=1)
            out.append(-torch.special.xlogy(p, p).sum(dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0)
    finally:
        model.train(was_training)


def membership_inference(
    model: nn.Module, members: Any, non_members: Any, forget: Any, batch_size: int
) -> float | None:
    """Fraction of ``forget`` that an entropy-based attack calls members.

    Logistic regression (balanced class weights) on the softmax entropy, fitted on
    ``members`` (label 1) against ``non_members`` (label 0). ``None`` when one of the
    three sets is empty.
    """
    from sklearn.linear_model import LogisticRegression

    if any(d is None or len(d) == 0 for d in (members, non_members, forget)):
        return None
    h_in = softmax_entropy(model, members, batch_size).double().numpy()
    h_out = softmax_entropy(model, non_members, batch_size).double().numpy()
    h_forget = softmax_entropy(model, forget, batch_size).double().numpy()
    features = np.concatenate([h_in, h_out]).reshape(-1, 1)
    labels = np.concatenate([np.ones(len(h_in)), np.zeros(len(h_out))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on degenerate (constant) features
        clf.fit(features, labels)
    return float(clf.predict(h_forget.reshape(-1, 1)).mean())


def forgetting_metrics(
    model: nn.Module,
    predict: Predict,
    *,
    retain_test: Any,
    forget_eval: Any,
    retain_train: Any,
    test: Any,
    forget_train: Any,
    batch_size: int,
    mia: bool = True,
) -> dict[str, float | None]:
    """``retain_accuracy`` (on ``retain_test``), ``forget_accuracy`` (on
    ``forget_eval``) and ``mia`` (members ``retain_train``, non-members ``test``,
    scored on ``forget_train``); ``None`` where the data is empty (or ``mia`` is off)."""
    return {
        "retain_accuracy": accuracy(model, predict, retain_test, batch_size),
        "forget_accuracy": accuracy(model, predict, forget_eval, batch_size),
        "mia": membership_inference(model, retain_train, test, forget_train, batch_size)
        if mia
        else None,
    }


def mean_and_worst(values: list[float | None], worst: str = "max") -> tuple[float, float]:
    """Mean and worst (``max`` or ``min``) of the values that are not ``None``; NaN when none are."""
    kept = [v for v in values if v is not None]
    if not kept:
        return math.nan, math.nan
    return float(np.mean(kept)), float(max(kept) if worst == "max" else min(kept))
