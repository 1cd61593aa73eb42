"""Data sources: where the samples of a stream come from.

A source returns a :class:`Split`: float inputs and integer labels for a
training and a test set, as CPU tensors. Sources that ship no test set are
split, stratified by class, with the experiment's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from contlearn.errors import DataError


@dataclass
class Split:
    """Training and test arrays of one data set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split arrays into ``(x_train, y_train, x_test, y_test)`` with each class in
    the same proportion in both."""
    from sklearn.model_selection import train_test_split

    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=test_fraction, stratify=y, random_state=seed
        )
    except ValueError as exc:
        raise DataError(f"cannot split the data into train and test: {exc}") from None
    return x_tr, y_tr, x_te, y_te


def as_split(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, name: str
) -> Split:
    """Arrays as float32 / int64 tensors."""
    return Split(
        torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32),
        torch.as_tensor(np.asarray(y_train), dtype=torch.long),
        torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32),
        torch.as_tensor(np.asarray(y_test), dtype=torch.long),
        name,
    )


def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 grey images of the
    digits 0-9, shipped with scikit-learn (never downloaded). Inputs are
    [N, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    return as_split(*stratified_split(x, y, test_fraction, seed), name="digits")
