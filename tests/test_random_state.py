"""The random states a checkpoint holds, and which one each process resumes with."""

from __future__ import annotations

import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from contlearn._random_state import own_rng, rng_state, set_rng_state
from contlearn.checkpoint import check_plain
from contlearn.distributed import DistributedView


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(3)
    state = rng_state(g)
    check_plain(state)
    expected = (np.random.rand(), torch.rand(2), torch.rand(2, generator=g), random.random())
    set_rng_state(state, g)
    again = (np.random.rand(), torch.rand(2), torch.rand(2, generator=g), random.random())
    assert expected[0] == again[0] and expected[3] == again[3]
    assert torch.equal(expected[1], again[1]) and torch.equal(expected[2], again[2])


@pytest.mark.parametrize("world, rank, expected", [(2, 1, "p1"), (2, 0, "p0"), (1, 0, "main"), (3, 2, "main")])
def test_each_process_resumes_with_its_own_random_state_when_as_many(world, rank, expected):
    state = {"rng": "main", "rng_processes": ["p0", "p1"]}
    run = SimpleNamespace(dist=DistributedView(rank, world))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert own_rng(state, run, "c.pt") == expected
    warned = [str(w.message) for w in caught]
    if world != 2 and rank == 0:  # another number of processes: process 0 says so once
        assert len(warned) == 1 and f"written by 2 processes and this resume has {world}" in warned[0]
    else:
        assert warned == []
    assert own_rng({"rng": "main", "rng_processes": None}, run, "c.pt") == "main"



def test_a_restored_state_keeps_numpys_cached_gaussian():
    """numpy's legacy generator draws normals in pairs and caches the second: the
    state must carry it, or the first normal after a resume differs."""
    g = torch.Generator().manual_seed(0)
    np.random.seed(0)
    np.random.normal()  # leaves the second of a pair cached
    state = rng_state(g)
    expected = np.random.normal()
    np.random.normal()
    set_rng_state(state, g)
    assert np.random.normal() == expected
