"""What a checkpoint records of a run's stream, and the check a resume makes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from contlearn.scenarios import Stream, TensorData

from contlearn._stream_signature import check_stream, data_checksum, stream_signature
from contlearn.checkpoint import CheckpointWarning


def test_the_stream_signature_names_shifts_without_addresses():
    class Scale:  # a user's shift with the default repr (a memory address)
        def __call__(self, x):
            return 2 * x

    x, y = np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32), np.arange(60) % 3

    def stream(seed):
        return Stream.from_tensors(x, y, setting="domain", transform="permute", n_experiences=2, seed=seed)

    a, b = stream(0), stream(0)
    for s in (a, b):
        s.experiences[1].shift = Scale()  # a new object, as a new process would build
    assert stream_signature(a) == stream_signature(b)
    assert stream_signature(a)["experiences"][1][4].endswith("Scale")
    assert stream_signature(stream(0)) != stream_signature(stream(1))  # other permutations


def test_the_data_checksum_reads_values_not_layout_and_sees_a_changed_element():
    x = torch.randn(1000, 3, 8, 8)
    y = torch.arange(1000) % 10
    checksum = data_checksum(TensorData(x, y))
    assert data_checksum(TensorData(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), y)) == checksum
    changed = x.clone()
    changed[4 * 4, 0, 0, 0] += 1  # sample 16 of every 4th: read; position 0: read
    assert data_checksum(TensorData(changed, y)) != checksum
    assert data_checksum(TensorData(x, (y + 1) % 10)) != checksum
    assert data_checksum(TensorData(torch.full((3, 2), float("nan")), y[:3])) == data_checksum(
        TensorData(torch.full((3, 2), float("nan")), y[:3]))


def test_a_resume_on_other_data_of_the_same_shape_warns_naming_the_experience():
    x, y = np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32), np.arange(60) % 3
    saved = stream_signature(Stream.from_tensors(x, y, setting="domain", transform="permute", n_experiences=2))
    same = Stream.from_tensors(x, y, setting="domain", transform="permute", n_experiences=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_stream(saved, same, "ckpt-1.pt")
    other = Stream.from_tensors(x, y, setting="domain", transform="permute", n_experiences=2)
    other.experiences[1].train.x[5, 3] += 1.0  # one element: a checksum sees it only if it sums it
    other.experiences[1].train.x[0, 0] += 1.0
    with pytest.warns(CheckpointWarning, match="other data: the training inputs of experience 1 differ"):
        check_stream(saved, other, "ckpt-1.pt")
    older = {k: v for k, v in saved.items() if k != "data"}  # written before checksums: nothing to compare
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_stream(older, other, "ckpt-1.pt")



