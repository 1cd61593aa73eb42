r"""Continual-learning metrics over the accuracy matrix.

``R`` is the T x T accuracy matrix: ``R[i][j]`` is the accuracy on experience
j's test data after training experience i (fractions in [0, 1]). Rows may be
fewer than T while a run is in progress; every function uses the rows given.
With ``i`` the last row and experiences indexed from 0:

* average accuracy: :math:`A = \frac{1}{T}\sum_{j} R_{T-1,j}`
* average incremental accuracy (Rebuffi et al., iCaRL 2017):
  :math:`\bar A = \frac{1}{T}\sum_{i} \frac{1}{i+1}\sum_{j \le i} R_{i,j}`
* forgetting (Chaudhry et al., RWalk 2018): for each experience but the last,
  the best accuracy it had after its own training step and the ones before the
  last, minus its final one,
  :math:`F = \frac{1}{T-1}\sum_{j<T-1} \max_{l \in [j, T-2]} R_{l,j} - R_{T-1,j}`
* backward transfer (Lopez-Paz and Ranzato, GEM 2017):
  :math:`BWT = \frac{1}{T-1}\sum_{j<T-1} R_{T-1,j} - R_{j,j}`
* forward transfer (GEM 2017), against ``b[j]``, the accuracy of the initial
  (randomly initialised) model on experience j:
  :math:`FWT = \frac{1}{T-1}\sum_{j \ge 1} R_{j-1,j} - b_j`

Forgetting and BWT are 0 for a single experience; FWT is ``None`` without ``b``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def _as_array(R: Matrix) -> np.ndarray:
    arr = np.asarray(R, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[0] > arr.shape[1]:
        raise ValueError(f"accuracy matrix must be i x T with 1 <= i <= T, got shape {arr.shape}")
    return arr


def average_accuracy(R: Matrix) -> float:
    """Mean of the last row: accuracy over all experiences after the last one trained."""
    return float(_as_array(R)[-1].mean())


def average_incremental_accuracy(R: Matrix) -> float:
    """Mean over rows i of the mean accuracy on experiences 0..i."""
    arr = _as_array(R)
    return float(np.mean([arr[i, : i + 1].mean() for i in range(arr.shape[0])]))


def forgetting(R: Matrix) -> float:
    """Mean over experiences j before the last row of max_{j<=l<last} R[l][j] - R[last][j]."""
    arr = _as_array(R)
    last = arr.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([arr[j:last, j].max() - arr[last, j] for j in range(last)]))


def bwt(R: Matrix) -> float:
    """Mean over experiences j before the last row of R[last][j] - R[j][j]."""
    arr = _as_array(R)
    last = arr.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([arr[last, j] - arr[j, j] for j in range(last)]))


def fwt(R: Matrix, initial: Sequence[float] | None) -> float | None:
    """Mean over experiences j >= 1 of R[j-1][j] - initial[j]; ``None`` without
    ``initial`` or with a single row."""
    if initial is None:
        return None
    arr = _as_array(R)
    if arr.shape[0] < 2:
        return None
    b = np.asarray(initial, dtype=np.float64)
    if b.shape != (arr.shape[1],):
        raise ValueError(f"fwt: initial holds {b.size} accuracies, one per experience is needed ({arr.shape[1]})")
    return float(np.mean([arr[j - 1, j] - b[j] for j in range(1, arr.shape[0])]))


def per_class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Accuracy of each true class from a confusion matrix ``confusion[true][pred]``
    (``None`` for a class without test samples). Columns past the last class
    (predictions that are no class) count in each class's total, as wrong."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    return [float(confusion[c, c] / totals[c]) if totals[c] else None for c in range(confusion.shape[0])]


def summary(R: Matrix, initial: Sequence[float] | None = None) -> dict[str, float | None]:
    """Every headline metric of a matrix, by the names ``results.json`` uses."""
    return {
        "average_accuracy": average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": bwt(R),
        "fwt": fwt(R, initial),
    }
