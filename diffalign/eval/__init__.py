"""Evaluation: win rates and means with confidence intervals (``stats``); DreamBench metrics, prompt sets and
reports live in sibling modules."""

from diffalign.eval.stats import (
    mean_ci,
    paired_win_rate,
    sign_test_p_value,
    student_t_quantile,
    wilson_interval,
)

__all__ = ["mean_ci", "paired_win_rate", "sign_test_p_value", "student_t_quantile", "wilson_interval"]
