"""Avalanche interop, both directions: Avalanche benchmarks as contlearn streams,
contlearn strategies as Avalanche plugins, and Avalanche's metric definitions.

Avalanche (Lomonaco et al., "Avalanche: an End-to-End Library for Continual
Learning", CVPR Workshops 2021; PyPI ``avalanche-lib``) is imported lazily: this
module imports without it, and every function that needs it says how to install
it (``pip install 'contlearn[avalanche]'``).

* :func:`stream_from_avalanche` turns a benchmark of either Avalanche API
  (``class_incremental_benchmark`` / ``benchmark_from_datasets`` /
  ``new_instances_benchmark`` and the older ``nc_benchmark`` / ``ni_benchmark`` /
  ``tensors_benchmark`` / classic benchmarks) into a :class:`~contlearn.scenarios.Stream`,
  materialising each experience's data as tensors; :func:`stream_from_config`
  does the same from a config section (``factory`` and ``args``).
* :func:`as_avalanche_plugin` drives a contlearn plugin's hooks from an Avalanche
  strategy's callbacks (see :mod:`contlearn.interop._avalanche_plugin`);
  :func:`as_avalanche_model` lets Avalanche train a contlearn model, growing its
  head from each training experience as Avalanche's dynamic modules do.
* :func:`accuracy_matrix_from_avalanche`, :func:`avalanche_forgetting` and
  :func:`avalanche_stream_accuracy` relate contlearn's metrics to Avalanche's.

docs/avalanche.md is the user guide, with the hook mapping table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from contlearn.errors import DataError
from contlearn.interop._avalanche_config import (
    ALIASES,
    split_tensors,
    stream_from_config,
    tensor_dataset,
)
from contlearn.interop._avalanche_stream import (
    INSTALL_HINT,
    LazyExperience,
    detect_setting,
    materialise,
    require_avalanche,
    stream_from_avalanche,
)

__all__ = [
    "ALIASES",
    "INSTALL_HINT",
    "LazyExperience",
    "accuracy_matrix_from_avalanche",
    "as_avalanche_model",
    "as_avalanche_plugin",
    "avalanche_forgetting",
    "avalanche_stream_accuracy",
    "detect_setting",
    "materialise",
    "require_avalanche",
    "split_tensors",
    "stream_from_avalanche",
    "stream_from_config",
    "tensor_dataset",
]


# ------------------------------------------------------------------ metrics

# Avalanche omits the Task part for experiences without task labels (its current benchmark API)
_ACC_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/(?P<stream>[^/]+)_stream/(?:Task(?P<task>\d+)/)?Exp(?P<exp>\d+)$")


def accuracy_matrix_from_avalanche(
    results: Sequence[Mapping[str, Any]], stream: str = "test"
) -> list[list[float]]:
    """The accuracy matrix ``R`` from what ``strategy.eval(test_stream)`` returned
    after each training experience (Avalanche's ``accuracy_metrics(experience=True)``).

    :param results: one metrics dict per training experience, in order.
    :param stream: the evaluated stream's name (``test`` for ``test_stream``).
    :return: ``R[i][j]``: the ``Top1_Acc_Exp`` of experience j after training i.
    """
    if isinstance(results, Mapping):
        raise DataError("results must be a list of one metrics dict per training experience (what strategy.eval "
                        "returned after each), not one dict; for a single evaluation give [results]")
    rows = []
    for i, metrics in enumerate(results):
        row: dict[int, float] = {}
        for key, value in metrics.items():
            match = _ACC_KEY.match(key)
            if match and match["stream"] == stream:
                row[int(match["exp"])] = float(value)
        if not row:
            raise DataError(
                f"results[{i}] has no 'Top1_Acc_Exp/eval_phase/{stream}_stream/...' values; evaluate with "
                f"accuracy_metrics(experience=True) on the {stream} stream"
            )
        if sorted(row) != list(range(len(row))):
            raise DataError(f"results[{i}] has accuracies for experiences {sorted(row)}, not 0..{len(row) - 1}")
        rows.append([row[j] for j in range(len(row))])
    return rows


def avalanche_forgetting(R: Sequence[Sequence[float]]) -> float:
    """Avalanche's ``StreamForgetting`` (and ``-StreamBWT``) from an accuracy matrix.

    Avalanche's forgetting of experience j is its accuracy when it was last trained,
    ``R[j][j]``, minus its current accuracy; the stream value averages it over the
    experiences trained before the last row (Lopez-Paz and Ranzato's BWT with the
    sign flipped). It equals ``-contlearn.metrics.bwt(R)``; contlearn's own
    :func:`~contlearn.metrics.forgetting` (Chaudhry et al. 2018) uses the best
    earlier accuracy instead of ``R[j][j]``, so it is at least as large.
    """
    arr = np.asarray(R, dtype=np.float64)
    last = arr.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([arr[j, j] - arr[last, j] for j in range(last)]))


def avalanche_stream_accuracy(R: Sequence[Sequence[float]], test_sizes: Sequence[int]) -> float:
    """Avalanche's ``Top1_Acc_Stream`` from an accuracy matrix: the accuracy over all
    test samples pooled, i.e. the last row weighted by each experience's test size
    (contlearn's :func:`~contlearn.metrics.average_accuracy` weights experiences equally)."""
    row = np.asarray(R, dtype=np.float64)[-1]
    sizes = np.asarray(test_sizes, dtype=np.float64)
    if sizes.shape != row.shape:
        raise ValueError(f"test_sizes has {sizes.size} entries for {row.size} experiences")
    return float((row * sizes).sum() / sizes.sum())


# ------------------------------------------------------------------ strategies


def as_avalanche_plugin(plugin: Any, config: Any = None, **kwargs: Any) -> Any:
    """An Avalanche ``SupervisedPlugin`` that drives a contlearn plugin's hooks from
    an Avalanche strategy's callbacks. See
    :func:`contlearn.interop._avalanche_plugin.as_avalanche_plugin`."""
    from contlearn.interop._avalanche_plugin import as_avalanche_plugin as make

    return make(plugin, config, **kwargs)


def as_avalanche_model(model: torch.nn.Module, multi_task: bool | None = None) -> torch.nn.Module:
    """A contlearn :class:`~contlearn.models.ContinualModel` as an Avalanche
    dynamic module that returns logits (the model is shared, not copied).

    Avalanche strategies call its ``adaptation(experience)`` before each
    experience (``model_adaptation``): before a training experience it grows the
    head with ``model.adapt(classes, task)`` for the experience's classes and task
    label(s), so no manual ``adapt`` is needed; an evaluation experience leaves the
    head as it is (logits of classes it lacks are masked). See
    :class:`contlearn.interop._avalanche_model.LogitsModel`.

    :param multi_task: make it an Avalanche ``MultiTaskModule``, to which
        strategies pass the mini-batch's task labels (task-incremental heads);
        ``None`` (default): when the model's head is a
        :class:`~contlearn.models.MultiHead`.
    """
    require_avalanche()
    from contlearn.interop._avalanche_model import logits_model

    return logits_model(model, multi_task)
