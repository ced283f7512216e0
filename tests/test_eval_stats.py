"""Exact, hand-computed checks of diffalign.eval.stats (win rates and means with confidence intervals)."""

import math

import numpy as np
import pytest
import torch

from diffalign.eval.stats import (
    mean_ci,
    paired_win_rate,
    sign_test_p_value,
    student_t_quantile,
    wilson_interval,
)

Z95 = 1.959963984540054  # Φ⁻¹(0.975)


def test_wilson_interval_60_of_100_by_hand():
    # p = 0.6, n = 100, z² / n = 0.0384146; centre = (0.6 + z²/200) / (1 + z²/100) = 0.596300
    # half = z / (1 + z²/100) · sqrt(0.6·0.4/100 + z²/40000) = 0.094298
    p, n, z = 0.6, 100, Z95
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = wilson_interval(60, 100, 0.95)
    assert low == pytest.approx(centre - half, abs=1e-12)
    assert high == pytest.approx(centre + half, abs=1e-12)
    assert low == pytest.approx(0.502002, abs=1e-6)
    assert high == pytest.approx(0.690599, abs=1e-6)


def test_wilson_interval_extremes_stay_in_unit_interval():
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-15)
    # all failures: upper = z² / (n + z²) = 3.8415 / 13.8415
    assert high == pytest.approx(Z95**2 / (10 + Z95**2), abs=1e-12)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0, abs=1e-15) and low == pytest.approx(10 / (10 + Z95**2), abs=1e-12)


def test_paired_win_rate_counts_ties_as_half():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    b = [0.5, 2.0, 3.5, 3.0, 5.05]
    r = paired_win_rate(a, b)  # diffs: +0.5, 0, -0.5, +1, -0.05
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 2, 5)
    assert r["win_rate"] == pytest.approx(0.5)
    assert r["mean_diff"] == pytest.approx((0.5 + 0 - 0.5 + 1 - 0.05) / 5)
    r = paired_win_rate(a, b, tie_tol=0.1)  # -0.05 now a tie
    assert (r["wins"], r["ties"], r["losses"]) == (2, 2, 1)
    assert r["win_rate"] == pytest.approx(3 / 5)
    low, high = wilson_interval(3.0, 5)
    assert (r["ci_low"], r["ci_high"]) == (low, high)
    assert r["method"] == "wilson" and r["confidence"] == 0.95


def test_paired_win_rate_60_of_100_and_symmetry():
    a = np.r_[np.ones(60), np.zeros(40)]
    b = np.full(100, 0.5)
    r = paired_win_rate(torch.tensor(a), b)
    assert r["win_rate"] == pytest.approx(0.6)
    assert r["ci_low"] == pytest.approx(0.502002, abs=1e-6)
    assert r["ci_high"] == pytest.approx(0.690599, abs=1e-6)
    rev = paired_win_rate(b, a)
    assert rev["win_rate"] == pytest.approx(0.4)
    assert rev["ci_low"] == pytest.approx(1 - r["ci_high"], abs=1e-12)


def test_sign_test_by_hand():
    # 8 wins vs 2 losses: P(X <= 2) = (1 + 10 + 45) / 1024, two-sided = 112 / 1024
    assert sign_test_p_value(8, 2) == pytest.approx(112 / 1024, abs=1e-12)
    assert sign_test_p_value(5, 5) == 1.0
    assert sign_test_p_value(0, 0) == 1.0
    assert sign_test_p_value(10, 0) == pytest.approx(2 / 1024, abs=1e-15)


def test_student_t_quantile_closed_forms():
    # ν = 1 (Cauchy): tan(π (q − 1/2)); ν = 2: (2q − 1) / sqrt(2 q (1 − q))
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-10)
    assert student_t_quantile(0.95, 2) == pytest.approx(0.9 / math.sqrt(2 * 0.95 * 0.05), rel=1e-10)
    # table values (4 and 10 degrees of freedom), and convergence to the normal quantile
    assert student_t_quantile(0.975, 4) == pytest.approx(2.776445105, abs=1e-8)
    assert student_t_quantile(0.975, 10) == pytest.approx(2.228138852, abs=1e-8)
    assert student_t_quantile(0.975, 5000) == pytest.approx(Z95, abs=5e-4)


def test_mean_ci_by_hand():
    r = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    std = math.sqrt(2.5)  # Σ(x − 3)² / 4 = 10 / 4
    half = 2.776445105 * std / math.sqrt(5)
    assert r["n"] == 5 and r["mean"] == 3.0
    assert r["std"] == pytest.approx(std, rel=1e-12)
    assert r["ci_low"] == pytest.approx(3.0 - half, abs=1e-8)
    assert r["ci_high"] == pytest.approx(3.0 + half, abs=1e-8)
    one = mean_ci([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["std"]) and math.isnan(one["ci_low"])


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="same length"):
        paired_win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="index 1"):
        paired_win_rate([1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1, 2], confidence=1.5)
