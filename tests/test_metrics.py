"""Metrics on hand-made accuracy matrices, each value worked out by hand."""

import numpy as np
import pytest

from contlearn import metrics

# Three experiences. Row i: accuracies after training experience i.
R = [
    [0.9, 0.1, 0.0],
    [0.6, 0.8, 0.2],
    [0.3, 0.7, 0.9],
]


def test_average_accuracy_is_mean_of_last_row():
    assert metrics.average_accuracy(R) == pytest.approx((0.3 + 0.7 + 0.9) / 3)


def test_average_incremental_accuracy():
    expected = (0.9 + (0.6 + 0.8) / 2 + (0.3 + 0.7 + 0.9) / 3) / 3
    assert metrics.average_incremental_accuracy(R) == pytest.approx(expected)


def test_forgetting_uses_best_earlier_accuracy():
    # exp0: best of R[0][0], R[1][0] = 0.9, final 0.3 -> 0.6; exp1: best R[1][1] = 0.8, final 0.7 -> 0.1
    assert metrics.forgetting(R) == pytest.approx((0.6 + 0.1) / 2)


def test_forgetting_when_accuracy_rises_after_training():
    # accuracy that rises is negative forgetting (Chaudhry et al. do not clip at 0)
    assert metrics.forgetting([[0.5, 0.0], [0.7, 0.9]]) == pytest.approx(-0.2)
    # exp0 improves after exp1 (0.5 -> 0.7) then drops to 0.6: forgetting 0.1 from its best
    assert metrics.forgetting([[0.5, 0, 0], [0.7, 0.9, 0], [0.6, 0.9, 1.0]]) == pytest.approx((0.1 + 0.0) / 2)


def test_forgetting_ignores_accuracy_before_an_experience_is_trained():
    # exp1 scored 0.9 in row 0, before its own training: not its best, so 0.5 -> 0.5 is no forgetting
    assert metrics.forgetting([[0.5, 0.9, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.5]]) == pytest.approx(0.0)


def test_bwt():
    assert metrics.bwt(R) == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)


def test_fwt_against_initial_accuracies():
    b = [0.1, 0.05, 0.1]
    assert metrics.fwt(R, b) == pytest.approx(((0.1 - 0.05) + (0.2 - 0.1)) / 2)
    assert metrics.fwt(R, None) is None
    with pytest.raises(ValueError, match=r"fwt: initial holds 1 accuracies, one per experience is needed \(3\)"):
        metrics.fwt(R, [0.1])
    with pytest.raises(ValueError, match=r"fwt: initial holds 4 accuracies, one per experience is needed \(3\)"):
        metrics.fwt(R, [0.1, 0.05, 0.1, 0.2])


def test_single_experience_has_no_forgetting():
    assert metrics.forgetting([[0.8]]) == 0.0
    assert metrics.bwt([[0.8]]) == 0.0
    assert metrics.fwt([[0.8]], [0.1]) is None


def test_partial_matrix_uses_rows_so_far():
    partial = R[:2]
    assert metrics.average_accuracy(partial) == pytest.approx((0.6 + 0.8 + 0.2) / 3)
    assert metrics.forgetting(partial) == pytest.approx(0.3)
    # one step of forward transfer so far: R[0][1] - b[1]; the column of experience 2 is not used yet
    assert metrics.fwt(partial, [0.0, 0.0, 0.0]) == pytest.approx(0.1)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="accuracy matrix"):
        metrics.average_accuracy([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    with pytest.raises(ValueError):
        metrics.average_accuracy([])


def test_per_class_accuracy_from_confusion():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])
    assert metrics.per_class_accuracy(confusion) == [0.75, None, 0.5]
    with_none_of_these = np.array([[3, 1, 0, 4], [0, 0, 0, 0], [2, 0, 2, 0]])  # last column: no class
    assert metrics.per_class_accuracy(with_none_of_these) == [0.375, None, 0.5]


def test_summary_gives_each_metric_its_own_value():
    """A matrix where BWT is not minus forgetting (exp0 rose to 0.7 after its
    training, then fell to 0.6) and the average incremental accuracy is not the
    average accuracy."""
    rising = [[0.5, 0.0, 0.0], [0.7, 0.9, 0.0], [0.6, 0.9, 1.0]]
    s = metrics.summary(rising, [0.0, 0.1, 0.2])
    assert s["average_accuracy"] == pytest.approx(2.5 / 3)
    assert s["average_incremental_accuracy"] == pytest.approx((0.5 + 0.8 + 2.5 / 3) / 3)
    assert s["forgetting"] == pytest.approx((0.1 + 0.0) / 2)
    assert s["bwt"] == pytest.approx(((0.6 - 0.5) + (0.9 - 0.9)) / 2)
    assert s["fwt"] == pytest.approx(((0.0 - 0.1) + (0.0 - 0.2)) / 2)


def test_summary_names_match_results_json():
    s = metrics.summary(R, [0, 0, 0])
    assert set(s) == {"average_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt"}
