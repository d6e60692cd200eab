"""Metrics on hand-computed matrices (each number below worked out by hand)."""

import math

import pytest

from clbench.results import metrics

# Base row, then after stages 1..3. Columns: tasks 1..3.
R = [
    [0.2, 0.3, 0.1],
    [0.8, 0.4, 0.2],
    [0.6, 0.9, 0.3],
    [0.5, 0.7, 0.7],
]


def test_acc():
    assert metrics.acc(R) == pytest.approx((0.5 + 0.7 + 0.7) / 3)


def test_a_k_and_incremental():
    assert metrics.a_k(R, 1) == pytest.approx(0.8)
    assert metrics.a_k(R, 2) == pytest.approx(0.75)
    assert metrics.a_k(R, 3) == pytest.approx(1.9 / 3)
    assert metrics.avg_incremental_acc(R) == pytest.approx((0.8 + 0.75 + 1.9 / 3) / 3)
    with pytest.raises(ValueError):
        metrics.a_k(R, 0)


def test_bwt_negative_means_forgetting():
    # ((0.5-0.8) + (0.7-0.9)) / 2
    assert metrics.bwt(R) == pytest.approx(-0.25)


def test_fwt_against_base_row():
    # ((R[1,2]-R[0,2]) + (R[2,3]-R[0,3])) / 2 = ((0.4-0.3) + (0.3-0.1)) / 2
    assert metrics.fwt(R) == pytest.approx(0.15)


def test_forgetting_is_max_based():
    # task1: max(0.8, 0.6) - 0.5 = 0.3 ; task2: max(0.4, 0.9) - 0.7 = 0.2
    assert metrics.forgetting_per_task(R) == pytest.approx([0.3, 0.2])
    assert metrics.forgetting(R) == pytest.approx(0.25)


def test_forgetting_differs_from_bwt_when_peak_is_later():
    # Task 1 peaks at stage 2 (after it was trained): max-based forgetting sees the peak.
    R2 = [[0.0, 0.0], [0.5, 0.1], [0.3, 0.9]]
    assert metrics.forgetting(R2) == pytest.approx(0.2)
    R3 = [[0.0, 0.0, 0.0], [0.5, 0.1, 0.0], [0.9, 0.8, 0.0], [0.4, 0.8, 0.7]]
    assert metrics.forgetting(R3) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)
    assert metrics.bwt(R3) == pytest.approx(((0.4 - 0.5) + (0.8 - 0.8)) / 2)


def test_learning_accuracy():
    assert metrics.learning_accuracy(R) == pytest.approx((0.8 + 0.9 + 0.7) / 3)


def test_single_task_stream():
    R1 = [[0.1], [0.6]]
    assert metrics.acc(R1) == pytest.approx(0.6)
    assert math.isnan(metrics.bwt(R1))
    assert math.isnan(metrics.fwt(R1))
    assert math.isnan(metrics.forgetting(R1))


def test_intransigence_and_general_delta():
    assert metrics.intransigence(R, [0.9, 0.9, 0.9]) == pytest.approx([0.1, 0.0, 0.2])
    G = [[0.5, 0.3], [0.4, 0.3], [0.6, 0.1]]
    assert metrics.general_ability_delta(G) == pytest.approx([0.0, -0.05, -0.05])


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match="T\\+1"):
        metrics.acc([[0.1, 0.2], [0.3, 0.4]])
