"""Statistics for evaluation reports: paired win rates and means, each with a confidence interval.

Everything here is deterministic (no bootstrap, no random seed) and needs only the standard library and numpy.

Paired win rate (Pick-a-Pic-style evaluation: same prompts, same seeds for the base and the aligned model)
---------------------------------------------------------------------------------------------------------
For per-prompt scores ``a_i`` (aligned) and ``b_i`` (base), ``i = 1..n``::

    win  if a_i - b_i >  tie_tol
    tie  if |a_i - b_i| <= tie_tol
    loss if a_i - b_i < -tie_tol
    win_rate = (wins + ties / 2) / n

The confidence interval is the **Wilson score interval** (Wilson, 1927) on the proportion ``p = win_rate`` with the
(possibly fractional) count ``wins + ties / 2`` out of ``n`` (formula: :mod:`diffalign.utils.stats`, where
:func:`wilson_interval` lives so that ``rewards/`` can use it without importing ``eval/``).

Counting a tie as half a win keeps ``win_rate`` symmetric (``win_rate(a, b) = 1 − win_rate(b, a)``); treating the
fractional count as binomial is an approximation that is slightly conservative when ties are frequent (a tie has
less variance than a coin flip). The Wilson interval is chosen over the normal (Wald) interval because it stays inside
[0, 1] and keeps its coverage near 0 and 1 and for small n.

The result also carries the exact two-sided **sign test** p-value of "no preference" (ties dropped, as in the
classical sign test): ``p = min(1, 2 · P[X <= min(wins, losses)])`` with ``X ~ Binomial(wins + losses, 1/2)``.

Mean with confidence interval
-----------------------------
``mean ± t_{n−1, 1−(1−confidence)/2} · s / sqrt(n)`` with ``s`` the sample standard deviation (ddof = 1): the Student
t interval, exact for normal data and the usual choice for a mean reward over a few hundred prompts. The t quantile
is computed exactly (closed-form CDF of Student's t for integer degrees of freedom, Abramowitz & Stegun 26.7.3/4,
inverted by bisection), so no scipy is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..utils.stats import check_confidence, wilson_interval  # re-exported: this module's public API

__all__ = ["paired_win_rate", "mean_ci", "wilson_interval", "student_t_quantile", "sign_test_p_value"]


def _as_float_array(values: Any, name: str) -> np.ndarray:
    """Convert a sequence, numpy array or torch tensor to a 1-D float64 numpy array; refuse NaN/inf.

    Raises:
        ValueError: when the input is not 1-D or holds a non-finite value (the index is named).
    """
    if hasattr(values, "detach"):  # torch.Tensor without importing torch here
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-prompt scores, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} non-finite value(s) (first at index {int(bad[0])}: {arr[bad[0]]}); "
            "remove or re-score those prompts before computing statistics"
        )
    return arr


def sign_test_p_value(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value for ``wins`` vs ``losses`` (ties already dropped).

    ``p = min(1, 2 · Σ_{k=0}^{min(w, l)} C(m, k) / 2^m)`` with ``m = w + l``; 1.0 when ``m = 0``. Summed in log space
    so that m in the tens of thousands does not overflow.
    """
    m = wins + losses
    if m == 0:
        return 1.0
    k_max = min(wins, losses)
    log_terms = [
        math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) - m * math.log(2.0)
        for k in range(k_max + 1)
    ]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def _student_t_abs_cdf(t: float, df: int) -> float:
    """``A(t | ν) = P(|T| < t)`` for Student's t with integer ν >= 1 (Abramowitz & Stegun 26.7.3 / 26.7.4).

    With ``θ = atan(t / sqrt(ν))``:

    - ν odd:  ``A = (2/π) [θ + sinθ (cosθ + (2/3) cos³θ + ... + (2·4···(ν−3))/(1·3···(ν−2)) cos^{ν−2}θ)]``
      (just ``2θ/π`` for ν = 1);
    - ν even: ``A = sinθ [1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + ... + (1·3···(ν−3))/(2·4···(ν−2)) cos^{ν−2}θ]``.
    """
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        term, total = c, c  # k = 1 term: cos θ
        for k in range(3, df - 1, 2):  # next terms: multiply by (k-1)/k · cos²θ
            term *= (k - 1) / k * c2
            total += term
        return 2.0 / math.pi * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):  # multiply by (k-1)/k · cos²θ
        term *= (k - 1) / k * c2
        total += term
    return s * total


def student_t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with integer ``df`` >= 1, for ``q`` in (0.5, 1) (upper quantiles).

    Inverts the exact CDF ``F(t) = (1 + A(t|ν)) / 2`` by bisection to ~1e-12. E.g. ``student_t_quantile(0.975, 2)
    = 0.95 / sqrt(2 · 0.975 · 0.025) = 4.3027`` and ``student_t_quantile(0.975, 1) = tan(0.475 π) = 12.706``.
    """
    if not 0.5 < q < 1.0:
        raise ValueError(f"q must be in (0.5, 1), got {q}")
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    target = 2.0 * q - 1.0  # P(|T| < t) that we need
    lo, hi = 0.0, 1.0
    while _student_t_abs_cdf(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_abs_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_win_rate(
    scores_a: Sequence[float] | np.ndarray | Any,
    scores_b: Sequence[float] | np.ndarray | Any,
    *,
    tie_tol: float = 0.0,
    confidence: float = 0.95,
) -> dict[str, float | int | str]:
    """Win rate of ``a`` over ``b`` on paired per-prompt scores, ties counted as half, with a Wilson interval.

    Args:
        scores_a: [n] scores of the system under test (e.g. the aligned model), one per prompt (and seed).
        scores_b: [n] scores of the baseline on the *same* prompts and seeds, in the same order.
        tie_tol: ``|a_i − b_i| <= tie_tol`` is a tie (>= 0; 0 means only exact equality ties).
        confidence: two-sided confidence level of the interval.

    Returns:
        ``{"win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses", "confidence", "p_value",
        "mean_diff", "method": "wilson"}``; ``p_value`` is the exact two-sided sign test (ties dropped) and
        ``mean_diff`` the mean of ``a − b``. Formulas in the module docstring.
    """
    check_confidence(confidence)
    if tie_tol < 0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol}")
    a = _as_float_array(scores_a, "scores_a")
    b = _as_float_array(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(
            f"paired scores must have the same length (same prompts and seeds): scores_a has {a.size}, scores_b has {b.size}"
        )
    if a.size == 0:
        raise ValueError("paired_win_rate needs at least one pair of scores, got none")
    diff = a - b
    wins = int(np.sum(diff > tie_tol))
    losses = int(np.sum(diff < -tie_tol))
    n = int(a.size)
    ties = n - wins - losses
    win_rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(wins + 0.5 * ties, n, confidence)
    return {
        "win_rate": win_rate,
        "ci_low": low,
        "ci_high": high,
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "confidence": confidence,
        "p_value": sign_test_p_value(wins, losses),
        "mean_diff": float(diff.mean()),
        "method": "wilson",
    }


def mean_ci(values: Sequence[float] | np.ndarray | Any, confidence: float = 0.95) -> dict[str, float | int]:
    """Mean with a Student-t confidence interval: ``mean ± t_{n−1} · std / sqrt(n)``.

    Args:
        values: [n] per-prompt values (sequence, numpy array or torch tensor).
        confidence: two-sided confidence level.

    Returns:
        ``{"mean", "ci_low", "ci_high", "std", "n"}`` with ``std`` the sample standard deviation (ddof = 1). With a
        single value the spread is unknown: ``std``, ``ci_low`` and ``ci_high`` are NaN (not a zero-width interval).
    """
    check_confidence(confidence)
    x = _as_float_array(values, "values")
    n = int(x.size)
    if n == 0:
        raise ValueError("mean_ci needs at least one value, got none")
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "ci_low": math.nan, "ci_high": math.nan, "std": math.nan, "n": 1}
    std = float(x.std(ddof=1))
    half = student_t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "std": std, "n": n}
