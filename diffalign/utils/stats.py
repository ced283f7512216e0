"""Binomial confidence interval shared by reward-model metrics (``rewards/``) and evaluation reports (``eval/``).

Wilson score interval (Wilson, 1927) on the proportion ``p = successes / n``, where ``successes`` may be fractional
(a tie counted as half a win)::

    z      = Φ⁻¹(1 − (1 − confidence) / 2)
    centre = (p + z² / (2n)) / (1 + z² / n)
    half   = z / (1 + z² / n) · sqrt(p (1 − p) / n + z² / (4 n²))
    CI     = [centre − half, centre + half]

It is chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage near 0 and 1 and
for small n. Standard library only.
"""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["check_confidence", "wilson_interval"]


def check_confidence(confidence: float) -> None:
    """Raise ``ValueError`` unless ``0 < confidence < 1``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (``successes`` may be fractional).

    See the module docstring for the formula. Returns ``(low, high)``, clipped to [0, 1] against rounding.
    """
    check_confidence(confidence)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
