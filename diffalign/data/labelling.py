"""Labels of a preference-data build (:mod:`diffalign.data.builder`): Bradley–Terry draws on a labeller's scores.

Scores ``s0, s1`` of the two (decoded) images from a labeller; Bradley–Terry with a temperature ``T``::

    P(image 0 preferred) = σ((s0 − s1) / T)             (T → 0: the better image always wins)
    |s0 − s1| < tie_margin   →  tie: label_0 = label_1 = 0.5
    otherwise                →  label_0 = 1{u < P}, label_1 = 1 − label_0        (u ~ U[0, 1) planned)

The tie check comes first: a tie is decided by the scores alone, never by the draw.

Labellers (:data:`LABELLERS`)
    ``"users"`` (default): each pair is assigned to one of the simulated users of ``sandbox/users.py``
    (``user_id`` uniform over their ids, 1..4) and labelled with **that user's** score, as in Pick-a-Pic where each
    ranking comes from one user. ``"judge"``: labelled with the sandbox judge's ``overall`` score (AI feedback);
    ``user_id`` is still assigned the same way (it then only records a fictitious rater, so per-user training on
    judge-labelled data learns nothing user-specific). :class:`RewardLabeller` wraps any
    :class:`diffalign.rewards.base.Reward` (PickScore, HPS, ...) for AI feedback on real pipelines (library API).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Bradley–Terry labels


def preference_probability(delta: np.ndarray | float, temperature: float) -> np.ndarray:
    """Bradley–Terry ``P(image 0 preferred) = σ(Δ / T)`` with ``Δ = s0 − s1``, elementwise.

    Computed as ``(1 + tanh(Δ / 2T)) / 2`` (the same function, without overflow). ``T = 0`` is the limit: 1 for
    Δ > 0, 0 for Δ < 0, 1/2 for Δ = 0."""
    delta = np.asarray(delta, dtype=np.float64)
    if temperature == 0:
        return 0.5 * (1.0 + np.sign(delta))
    return 0.5 * (1.0 + np.tanh(delta / (2.0 * temperature)))


def bradley_terry_labels(
    score_0: np.ndarray,
    score_1: np.ndarray,
    draws: np.ndarray,
    temperature: float,
    tie_margin: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(label_0, label_1)`` (float64 ``[B]``) from scores and uniform draws ``u ∈ [0, 1)``.

    ``|s0 − s1| < tie_margin`` -> 0.5/0.5; otherwise image 0 wins (1/0) iff ``u < σ((s0 − s1)/T)``, else 0/1.
    """
    s0, s1, u = (np.asarray(x, dtype=np.float64) for x in (score_0, score_1, draws))
    if not (s0.shape == s1.shape == u.shape):
        raise ValueError(f"score_0 {s0.shape}, score_1 {s1.shape} and draws {u.shape} must have one shape")
    delta = s0 - s1
    label_0 = (u < preference_probability(delta, temperature)).astype(np.float64)
    tie = np.abs(delta) < tie_margin
    label_0[tie] = 0.5
    label_1 = np.where(tie, 0.5, 1.0 - label_0)
    return label_0, label_1


# ---------------------------------------------------------------------------------------------------------------
# Labellers


class Labeller(Protocol):
    """Scores images for labelling: ``score(images (B, H, W, 3) uint8, prompts [B], user_ids [B]) -> float [B]``.

    ``user_ids`` is the user each image's pair is assigned to (both images of a pair have the same user)."""

    name: str

    def score(self, images: np.ndarray, prompts: Sequence[str], user_ids: Sequence[int]) -> np.ndarray: ...


class JudgeLabeller:
    """The sandbox judge's ``aspect`` score (``"overall"`` by default) for every image; user ids are ignored."""

    def __init__(self, aspect: str = "overall", judge: Any = None) -> None:
        from ..sandbox.judge import Judge

        self.judge = judge if judge is not None else Judge()
        self.aspect = aspect
        self.name = f"judge/{aspect}"

    def score(self, images: np.ndarray, prompts: Sequence[str], user_ids: Sequence[int]) -> np.ndarray:
        scores = self.judge.score(images, list(prompts))
        if self.aspect not in scores:
            raise KeyError(f"the judge has no score {self.aspect!r}; it has {sorted(scores)}")
        return np.asarray(scores[self.aspect], dtype=np.float64)


class SimulatedUserLabeller:
    """Each image scored by the simulated user of its pair (``sandbox/users.py``: ``SIMULATED_USERS[id].score``)."""

    name = "users"

    def __init__(self, users: Mapping[int, Any] | None = None, judge: Any = None) -> None:
        if users is None:
            try:
                from ..sandbox.users import SIMULATED_USERS
            except ImportError as err:
                raise ImportError(
                    "the 'users' labeller needs diffalign/sandbox/users.py (SIMULATED_USERS); it is missing from this "
                    "checkout: use --labeller judge"
                ) from err
            users = SIMULATED_USERS
        if judge is None:
            from ..sandbox.judge import Judge

            judge = Judge()
        self.users = dict(users)
        self.judge = judge

    @property
    def user_ids(self) -> tuple[int, ...]:
        return tuple(sorted(int(u) for u in self.users))

    def score(self, images: np.ndarray, prompts: Sequence[str], user_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(user_ids, dtype=np.int64)
        unknown = sorted(set(ids.tolist()) - set(self.users))
        if unknown:
            raise KeyError(f"user ids {unknown} are not simulated users (known: {self.user_ids})")
        out = np.empty(len(ids), dtype=np.float64)
        for uid in np.unique(ids):
            idx = np.flatnonzero(ids == uid)
            out[idx] = np.asarray(
                self.users[int(uid)].score(images[idx], [prompts[i] for i in idx], judge=self.judge),
                dtype=np.float64,
            )
        return out


class RewardLabeller:
    """Any :class:`diffalign.rewards.base.Reward` (``score(images, prompts) -> Tensor [B]``) as a labeller."""

    def __init__(self, reward: Any, name: str | None = None) -> None:
        self.reward = reward
        self.name = name or f"reward/{getattr(reward, 'name', type(reward).__name__)}"

    def score(self, images: np.ndarray, prompts: Sequence[str], user_ids: Sequence[int]) -> np.ndarray:
        s = self.reward.score(images, list(prompts))
        s = s.detach().float().cpu().numpy() if hasattr(s, "detach") else np.asarray(s)
        return np.asarray(s, dtype=np.float64)


LABELLERS: dict[str, Callable[[], Labeller]] = {"users": SimulatedUserLabeller, "judge": JudgeLabeller}
"""Labellers selectable by name (``BuilderConfig.labeller`` / ``--labeller``)."""


def make_labeller(name: str) -> Labeller:
    if name not in LABELLERS:
        raise ValueError(f"unknown labeller {name!r}; choose one of {sorted(LABELLERS)}")
    return LABELLERS[name]()


def default_user_ids(labeller: Labeller) -> tuple[int, ...]:
    """The simulated users' ids (1..4) where ``users.py`` exists; ``(1, 2, 3, 4)`` otherwise (judge labels)."""
    if isinstance(labeller, SimulatedUserLabeller):
        return labeller.user_ids
    try:
        from ..sandbox.users import SIMULATED_USERS

        return tuple(sorted(int(u) for u in SIMULATED_USERS))
    except ImportError:
        return (1, 2, 3, 4)


def check_scores(scores: np.ndarray, n: int, labeller: Labeller, prompts: Sequence[str]) -> np.ndarray:
    """Scores must be ``[n]`` and finite; otherwise an error naming the labeller and the first bad caption."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(
            f"labeller {labeller.name!r} returned scores of shape {scores.shape}, expected ({n},)"
        )
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(
            f"labeller {labeller.name!r} returned {bad.size} non-finite score(s), first for caption "
            f"{prompts[bad[0]]!r}; fix the labeller (no pair is dropped silently)"
        )
    return scores
