"""Invariants of the rehearsal buffers (plugins/_buffers.py)."""

from __future__ import annotations

import math

import torch
from contlearn.plugins._buffers import BalancedBuffer, ReservoirBuffer, balanced_quotas
from contlearn.scenarios import Batch
from hypothesis import given, settings
from hypothesis import strategies as st


def make_batch(ids: torch.Tensor, labels: torch.Tensor | None = None) -> Batch:
    """Samples whose input is their id, so what a buffer stores can be traced."""
    y = labels if labels is not None else torch.zeros_like(ids)
    return Batch(ids.float()[:, None], y, torch.zeros_like(ids))


def offer(buffer, n: int, batch_size: int) -> None:
    for start in range(0, n, batch_size):
        ids = torch.arange(start, min(start + batch_size, n))
        buffer.add(make_batch(ids))


# ----------------------------------------------------------------- reservoir


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 30), n=st.integers(0, 120), batch_size=st.integers(1, 17), seed=st.integers(0, 2**31))
def test_reservoir_holds_distinct_offered_samples(size, n, batch_size, seed):
    buffer = ReservoirBuffer(size, torch.Generator().manual_seed(seed))
    offer(buffer, n, batch_size)
    assert len(buffer) == min(n, size) and buffer.n_seen == n
    held = buffer.ids[: len(buffer)]
    assert len(set(held.tolist())) == len(held), "a sample is stored twice"
    assert bool(((held >= 0) & (held < n)).all())
    if len(buffer):  # the stored inputs are the samples the bookkeeping says
        assert torch.equal(buffer.storage.x[: len(buffer), 0].long(), held)
    if n <= size:
        assert sorted(held.tolist()) == list(range(n))


def test_reservoir_keeps_every_sample_with_equal_probability():
    """After n offers each sample is kept with probability size/n (algorithm R).

    1,000 independent runs from one fixed seed, n=40 samples offered in batches
    of 7 into 10 slots: each sample's inclusion count is Binomial(1000, 1/4),
    standard deviation 13.7 around 250. The bound of 6 standard deviations
    (per sample, 40 samples) makes a false alarm less likely than 1e-7; a
    chi-square over all samples far above its 39 degrees of freedom, or a bias
    of 8% between the first and the second half of the stream (4.6 standard
    deviations of that difference) fail the test.
    """
    size, n, runs = 10, 40, 1000
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(n)
    for _ in range(runs):
        buffer = ReservoirBuffer(size, generator)
        offer(buffer, n, batch_size=7)
        counts[buffer.ids] += 1
    expected = runs * size / n
    sd = math.sqrt(runs * (size / n) * (1 - size / n))
    assert counts.sum() == runs * size
    assert float((counts - expected).abs().max()) < 6 * sd
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 90, f"chi-square {chi2:.1f} with 39 degrees of freedom"
    first, last = counts[: n // 2].mean(), counts[n // 2 :].mean()
    assert abs(float(first - last)) < 0.08 * expected


def test_reservoir_sample_draws_from_stored():
    buffer = ReservoirBuffer(5, torch.Generator().manual_seed(0))
    assert buffer.sample(3, "cpu") is None
    offer(buffer, 3, 3)
    drawn = buffer.sample(8, "cpu")
    assert drawn is not None and sorted(drawn.x[:, 0].long().tolist()) == [0, 1, 2]


def test_reservoir_samples_are_drawn_afresh_from_every_slot():
    """20 draws of 5 from 50 stored samples reach about 44 of them (50 (1 - 0.9^20));
    draws that always took the same slots would reach 5."""
    buffer = ReservoirBuffer(50, torch.Generator().manual_seed(0))
    offer(buffer, 50, 50)
    seen: set[int] = set()
    for _ in range(20):
        drawn = buffer.sample(5, "cpu").x[:, 0].long().tolist()
        assert len(set(drawn)) == 5
        seen.update(drawn)
    assert len(seen) > 30


def test_reservoir_state_round_trip_continues_identically():
    a = ReservoirBuffer(8, torch.Generator().manual_seed(3))
    offer(a, 20, 4)
    b = ReservoirBuffer(8, torch.Generator())
    b.load_state_dict(a.state_dict())
    b.generator.set_state(a.generator.get_state())
    extra = make_batch(torch.arange(100, 130))
    a.add(extra)
    b.add(extra)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.storage.x, b.storage.x)


# -------------------------------------------------------------- class-balanced


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 40),
    experiences=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=60), min_size=1, max_size=5),
    seed=st.integers(0, 2**31),
)
def test_class_balanced_never_exceeds_size_and_stays_balanced(size, experiences, seed):
    buffer = BalancedBuffer(size, torch.Generator().manual_seed(seed))
    next_id = 0
    offered: dict[int, set[int]] = {}
    for labels_list in experiences:
        labels = torch.tensor(labels_list)
        ids = torch.arange(next_id, next_id + len(labels))
        next_id += len(labels)
        for i, c in zip(ids.tolist(), labels_list, strict=True):
            offered.setdefault(c, set()).add(i)
        buffer.add(labels, lambda rows, ids=ids, labels=labels: make_batch(ids[rows], labels[rows]))

        counts = buffer.counts()
        assert len(buffer) <= size
        assert len(buffer) == min(size, sum(len(v) for v in offered.values()))
        # balanced: a class below another by more than one has all its samples stored
        for c, k in counts.items():
            for other, k_other in counts.items():
                assert k >= k_other - 1 or k == len(offered[c]), (counts, c, other)
        for c in offered:
            assert counts.get(c, 0) >= min(len(offered[c]), 1 if size >= len(offered) else 0)
        # every stored sample is one offered with that label
        filled = buffer.groups >= 0
        stored_ids = buffer.storage.x[filled, 0].long().tolist()
        assert len(set(stored_ids)) == len(stored_ids)
        for i, c in zip(stored_ids, buffer.groups[filled].tolist(), strict=True):
            assert i in offered[c]
        assert torch.equal(buffer.storage.y[filled], buffer.groups[filled])


def test_class_balanced_subset_is_uniform_within_a_class():
    """Each sample of a class is kept with the same probability, over repeated runs."""
    generator = torch.Generator().manual_seed(7)
    counts = torch.zeros(40)
    labels = torch.tensor([0] * 20 + [1] * 20)
    runs = 500
    for _ in range(runs):
        buffer = BalancedBuffer(10, generator)
        for ids in (torch.arange(20), torch.arange(20, 40)):  # class 0 gets 10 slots, then 5 and 5
            buffer.add(labels[ids], lambda rows, ids=ids: make_batch(ids[rows], labels[ids][rows]))
        filled = buffer.groups >= 0
        counts[buffer.storage.x[filled, 0].long()] += 1
    # p = 5/20 per sample: Binomial(500, 0.25), sd 9.7; bound 6 sd
    assert float((counts - runs * 0.25).abs().max()) < 6 * 9.7


def test_class_balanced_class_offered_again_keeps_a_uniform_subset_of_all_its_samples():
    """One class offered as 20 samples, then 20 more, into 10 slots: each of the 40
    is kept with probability 1/4, whether it came first or second (the stored
    samples keep their keys and compete with the new ones on them)."""
    generator = torch.Generator().manual_seed(7)
    counts = torch.zeros(40)
    labels = torch.zeros(40, dtype=torch.long)
    runs = 500
    for _ in range(runs):
        buffer = BalancedBuffer(10, generator)
        for ids in (torch.arange(20), torch.arange(20, 40)):
            buffer.add(labels[ids], lambda rows, ids=ids: make_batch(ids[rows], labels[ids][rows]))
        filled = buffer.groups >= 0
        counts[buffer.storage.x[filled, 0].long()] += 1
    # Binomial(500, 0.25) per sample: sd 9.7; bound 6 sd
    assert counts.sum() == runs * 10
    assert float((counts - runs * 0.25).abs().max()) < 6 * 9.7, counts


def test_class_balanced_state_round_trip_continues_identically():
    """The state carries each class's count of samples offered so far: a restored
    buffer offered more of a class keeps what the uninterrupted one keeps."""
    a = BalancedBuffer(6, torch.Generator().manual_seed(5))
    labels = torch.tensor([0] * 10 + [1] * 10)
    ids = torch.arange(20)
    a.add(labels, lambda rows: make_batch(ids[rows], labels[rows]))
    b = BalancedBuffer(6, torch.Generator())
    b.load_state_dict(a.state_dict())
    b.generator.set_state(a.generator.get_state())
    assert b.available == a.available == {0: 10, 1: 10}
    more = torch.tensor([0] * 30 + [2] * 3)
    more_ids = torch.arange(100, 133)
    for buffer in (a, b):
        buffer.add(more, lambda rows: make_batch(more_ids[rows], more[rows]))
    assert torch.equal(a.groups, b.groups) and torch.equal(a.storage.x, b.storage.x)


def test_balanced_quotas_water_filling():
    assert balanced_quotas({0: 100, 1: 100, 2: 100}, 10) == {0: 4, 1: 3, 2: 3}
    assert balanced_quotas({0: 2, 1: 100, 2: 100}, 10) == {0: 2, 1: 4, 2: 4}
    assert balanced_quotas({0: 2, 1: 3}, 10) == {0: 2, 1: 3}
