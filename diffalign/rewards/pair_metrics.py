"""Held-out pair accuracy of a multi-aspect reward model (:mod:`diffalign.training.reward_model`) and its baselines.

Evaluation (:func:`pair_accuracy`)
    Held-out pair accuracy per aspect: on pairs with a decisive label (ties excluded), the share where the
    predictor ranks the preferred image higher; a predictor tie (equal scores) counts one half. Wilson 95% interval.
    ``overall``: the model's ``overall`` score (weighted mean of its heads; the non-negative weights are fitted to
    the judge's ``overall`` labels on the training pairs, :func:`diffalign.training.reward_model.fit_overall_weights`) against those labels;
    ``pooled``: all four aspects' decisions together. Baselines: ``sandbox_clip`` — the backbone's own text–image
    cosine (``cos(u, v)``, what the ``sandbox-clip`` catalog reward scores) used as the predictor of every aspect;
    ``judge_scores`` — the judge's noiseless scores (the ceiling set by the label noise: below 1 only because of
    the Bradley–Terry draws); ``chance`` = 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from diffalign.rewards.multi_aspect import VISIONPREFER_ASPECTS

# ---------------------------------------------------------------------------------------------------------------
# Pair accuracy


def pair_accuracy(
    score_0: np.ndarray | Tensor, score_1: np.ndarray | Tensor, label_0: np.ndarray
) -> dict[str, float | int | None]:
    """Pair accuracy of a predictor against labels ``P(image 0 preferred)`` ∈ {1, 0, 0.5}.

    Ties in the labels (0.5) are excluded; on the remaining ``n`` pairs a pair counts 1 when the predictor's score
    is higher for the preferred image, 0 when lower, 1/2 when the two scores are equal::

        accuracy = (#{sign(s0 − s1) = sign(2 p − 1)} + #{s0 = s1} / 2) / n

    Returns ``accuracy`` (None when n = 0), ``n``, ``correct`` (the fractional count), ``predictor_ties``,
    ``label_ties`` and the Wilson 95% interval ``ci_low``/``ci_high``."""
    from diffalign.utils.stats import wilson_interval

    conv = lambda x: x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)  # noqa: E731
    s0, s1, p = conv(score_0), conv(score_1), np.asarray(label_0, dtype=np.float64)
    if not (s0.shape == s1.shape == p.shape) or s0.ndim != 1:
        raise ValueError(
            f"score_0 {s0.shape}, score_1 {s1.shape} and label_0 {p.shape} must be equal 1-D shapes"
        )
    bad = ~np.isin(p, (0.0, 0.5, 1.0))
    if bad.any():
        raise ValueError(
            f"labels must be 1, 0 or 0.5; got {p[bad][:5].tolist()} at {np.flatnonzero(bad)[:5].tolist()}"
        )
    decisive = p != 0.5
    d = np.sign(s0[decisive] - s1[decisive])
    want = np.where(p[decisive] == 1.0, 1.0, -1.0)
    n = int(decisive.sum())
    correct = float(np.sum(d == want) + 0.5 * np.sum(d == 0))
    out: dict[str, float | int | None] = {
        "accuracy": correct / n if n else None,
        "n": n,
        "correct": correct,
        "predictor_ties": int(np.sum(d == 0)),
        "label_ties": int((~decisive).sum()),
        "ci_low": None,
        "ci_high": None,
    }
    if n:
        out["ci_low"], out["ci_high"] = wilson_interval(correct, n)
    return out


def accuracy_table(
    scores_0: Mapping[str, np.ndarray | Tensor],
    scores_1: Mapping[str, np.ndarray | Tensor],
    labels: Mapping[str, np.ndarray],
    aspects: Sequence[str] = VISIONPREFER_ASPECTS,
) -> dict[str, dict[str, Any]]:
    """:func:`pair_accuracy` for every aspect and ``"overall"`` (the predictor's key of the same name, or its
    single key ``"*"`` for every label), plus ``"pooled"`` (all aspects' decisions together)."""
    pick = lambda s, k: s[k] if k in s else s["*"]  # noqa: E731
    conv = lambda x: x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)  # noqa: E731
    out = {k: pair_accuracy(pick(scores_0, k), pick(scores_1, k), labels[k]) for k in (*aspects, "overall")}
    out["pooled"] = pair_accuracy(
        np.concatenate([conv(pick(scores_0, a)) for a in aspects]),
        np.concatenate([conv(pick(scores_1, a)) for a in aspects]),
        np.concatenate([labels[a] for a in aspects]),
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report


def _fmt_acc(r: Mapping[str, Any]) -> str:
    if r["accuracy"] is None:
        return "-"
    return f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']})"


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """The held-out accuracy table: rows = aspects, overall, pooled; columns = model, baselines, chance."""
    from diffalign.utils.markdown import markdown_table

    ev = metrics["held_out"]
    rows = []
    for k in (*VISIONPREFER_ASPECTS, "overall", "pooled"):
        rows.append(
            [
                k,
                _fmt_acc(ev["model"][k]),
                _fmt_acc(ev["sandbox_clip"][k]),
                _fmt_acc(ev["judge_scores"][k]),
                "0.500",
            ]
        )
    header = [
        "aspect",
        "trained model",
        "backbone CLIP cosine",
        "judge scores (label-noise ceiling)",
        "chance",
    ]
    return markdown_table(header, rows)
