"""Interpolating between two users' embeddings (issue 13: "interpolating two users' tokens moves samples' scores
monotonically from one user's taste to the other's").

:func:`interpolation_curve`: one pair of users, their mean scores on the same captions and seeds at every blend
``alpha`` of their tokens (0: a's, 1: b's). One pair of users gives a noisy curve (16 to 32 images per point, and a
user branch that moves pixels by a few thousandths), so :func:`interpolation_study` repeats it over many pairs chosen
by a rule blind to the model -- unseen users who answered **every** question of the questionnaire the other way
(:func:`opposite_answer_pairs`; their tokens are as far apart as the answers can make them, and an odd projector
makes them exact negatives) -- and averages each user's score change from ``alpha = 0``:

    delta_a(alpha) = mean over pairs of (score_a(alpha) - score_a(0))   # should fall: away from a's taste
    delta_b(alpha) = mean over pairs of (score_b(alpha) - score_b(0))   # should rise: towards b's

``monotone_a`` / ``monotone_b`` of the study are those of the mean curves; ``pairs_monotone_a/b`` count the pairs
whose own curve is. A mean curve with four steps is monotone by chance when the effect is a few thousandths, so the
study also reports a trend test that uses every pair: each pair's least-squares slope of score against alpha, and
their mean with a Student-t 95% interval over the pairs (``slope_a``, ``slope_b``); ``trend_a`` is true when a's
interval lies below 0, ``trend_b`` when b's lies above 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.ppd import load_context_pairs, load_test_prompts
from ..errors import ConfigError
from ..sandbox.user_population import PopulationUser
from .compare import expand_prompts
from .personal import _judge, generate_personalized, population_users, user_tokens
from .plots import plot_lines
from .stats import mean_ci


def interpolation_curve(
    pipe: Any,
    tokens_a: torch.Tensor,
    tokens_b: torch.Tensor,
    user_a: PopulationUser,
    user_b: PopulationUser,
    prompts: Sequence[str],
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seeds: Sequence[int] = (0,),
    steps: int = 20,
    guidance: float = 5.0,
    *,
    batch_size: int = 64,
    user_scale: float = 1.0,
) -> dict[str, Any]:
    """Mean score under user a and under user b of images made with ``interpolate(tokens_a, tokens_b, alpha)``, per
    alpha (same captions and seeds at every alpha). A smooth embedding space moves the images from a's taste to b's:
    ``monotone_a`` says a's score never rises with alpha, ``monotone_b`` that b's never falls."""
    from ..models.user_encoder import interpolate

    ps, ss = expand_prompts(list(prompts), seeds)
    points = []
    for alpha in alphas:
        tokens = interpolate(tokens_a, tokens_b, float(alpha))
        images = generate_personalized(
            pipe,
            ps,
            ss,
            tokens,
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
            user_scale=user_scale,
            desc=f"alpha {alpha}",
        )
        analyses, specs, judged = _judge(images, ps)
        sa = user_a.score_analyses(analyses, specs, judged["overall"])
        sb = user_b.score_analyses(analyses, specs, judged["overall"])
        points.append({"alpha": float(alpha), "score_a": float(sa.mean()), "score_b": float(sb.mean())})
    a = np.array([p["score_a"] for p in points])
    b = np.array([p["score_b"] for p in points])
    return {
        "user_a": user_a.user_id,
        "user_b": user_b.user_id,
        "points": points,
        "monotone_a": bool(np.all(np.diff(a) <= 0)),
        "monotone_b": bool(np.all(np.diff(b) >= 0)),
        "num_prompts": len(prompts),
        "seeds": [int(s) for s in seeds],
        "steps": steps,
        "guidance": guidance,
    }


def plot_interpolation(result: Mapping[str, Any], path: str | Path) -> Path:
    """Both users' mean scores against alpha (PNG)."""
    lines = {f"score of user {result[u]}": [p[k] for p in result["points"]]
             for k, u in (("score_a", "user_a"), ("score_b", "user_b"))}  # fmt: skip
    xlabel = f"alpha (0: user {result['user_a']}'s tokens, 1: user {result['user_b']}'s)"
    return plot_lines([p["alpha"] for p in result["points"]], lines, path, xlabel, "mean user score")


def opposite_answer_pairs(
    data_dir: str | Path, user_ids: Sequence[int], k: int = 4, split: str = "questionnaire", seed: int = 0
) -> list[tuple[int, int]]:
    """Pairs ``(a, b)`` (a < b) of ``user_ids`` whose first ``k`` rows of ``split`` are the same image pairs answered
    the other way every time, in a seeded order (``default_rng(seed).permutation``). Needs a split where every user
    answers the same pairs (the questionnaire); raises ConfigError otherwise."""
    answers: dict[int, list[tuple[bytes, bytes]]] = {}
    for u in user_ids:
        rows = load_context_pairs(data_dir, int(u), split)[:k]
        answers[int(u)] = [(r["preferred"], r["rejected"]) for r in rows]
    questions = {tuple(frozenset(a) for a in v) for v in answers.values() if len(v) == k}
    if len(questions) != 1:
        raise ConfigError(
            f"opposite answers need the same {k} pairs answered by every user: split {split!r} of {data_dir} has "
            f"{len(questions)} different sets; use the questionnaire split"
        )
    ids = sorted(u for u, v in answers.items() if len(v) == k)
    pairs = [
        (a, b)
        for i, a in enumerate(ids)
        for b in ids[i + 1 :]
        if all(pa == rb for (pa, _), (_, rb) in zip(answers[a], answers[b], strict=True))
    ]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[int(i)] for i in order]


def interpolation_study(
    pipe: Any,
    encoder: Any,
    data_dir: str | Path,
    pairs: Sequence[tuple[int, int]],
    *,
    k: int = 4,
    split: str = "questionnaire",
    prompts_per_user: int = 4,
    **curve_kwargs: Any,
) -> dict[str, Any]:
    """:func:`interpolation_curve` for every pair (captions: the first ``prompts_per_user`` test captions of each of
    the two users; ``curve_kwargs``: its alphas, seeds, steps, guidance, batch_size, user_scale) and the mean score
    changes from ``alpha = 0`` (module docstring)."""
    if not pairs:
        raise ConfigError("interpolation_study needs at least one pair of users")
    users, prompts_of = population_users(data_dir), load_test_prompts(data_dir)
    curves = []
    for a, b in pairs:
        prompts = list(dict.fromkeys(prompts_of[a][:prompts_per_user] + prompts_of[b][:prompts_per_user]))
        ta, tb = (user_tokens(encoder, data_dir, u, k, split=split) for u in (a, b))
        curves.append(interpolation_curve(pipe, ta, tb, users[a], users[b], prompts, **curve_kwargs))
    sa = np.array([[p["score_a"] for p in c["points"]] for c in curves])
    sb = np.array([[p["score_b"] for p in c["points"]] for c in curves])
    da, db = (sa - sa[:, :1]).mean(0), (sb - sb[:, :1]).mean(0)
    alphas = np.array([p["alpha"] for p in curves[0]["points"]])
    slope_a, slope_b = (mean_ci(_slopes(alphas, s)) for s in (sa, sb))
    return {
        "rule": f"unseen users whose {k} answers in {split!r} are all opposite, seeded order",
        "alphas": [float(x) for x in alphas],
        "delta_a": [float(x) for x in da],
        "delta_b": [float(x) for x in db],
        "monotone_a": bool(np.all(np.diff(da) <= 0)),
        "monotone_b": bool(np.all(np.diff(db) >= 0)),
        "pairs_monotone_a": int(sum(c["monotone_a"] for c in curves)),
        "pairs_monotone_b": int(sum(c["monotone_b"] for c in curves)),
        "slope_a": slope_a,
        "slope_b": slope_b,
        "trend_a": bool(slope_a["ci_high"] < 0),  # False when the interval is NaN (a single pair)
        "trend_b": bool(slope_b["ci_low"] > 0),
        "num_pairs": len(curves),
        "curves": curves,
    }


def _slopes(alphas: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of ``scores`` [pairs, alphas] against ``alphas``."""
    x = alphas - alphas.mean()
    return (scores - scores.mean(1, keepdims=True)) @ x / float(x @ x)


def plot_study(result: Mapping[str, Any], path: str | Path) -> Path:
    """The mean score changes of :func:`interpolation_study` against alpha (PNG)."""
    lines = {
        "user a's score - at alpha 0": result["delta_a"],
        "user b's score - at alpha 0": result["delta_b"],
    }
    xlabel = f"alpha (0: a's tokens, 1: b's), mean over {result['num_pairs']} pairs of users"
    return plot_lines(result["alphas"], lines, path, xlabel, "mean score change", zero_line=True)


__all__ = [
    "interpolation_curve",
    "interpolation_study",
    "opposite_answer_pairs",
    "plot_interpolation",
    "plot_study",
]
