"""A seeded population of simulated users for personalised preference tuning (PPD, Dang et al., CVPR 2025).

The four hand-made users of ``users.py`` are enough to show that users disagree, but personalisation methods that
*generalise to unseen users* (PPD: a user embedding from a few of the user's preferences) need many users, drawn
from a known distribution, with a held-out set of users that training never sees. This module is that family. Each
user keeps the protocol of ``users.py`` (the judge's ``overall`` plus a taste term over what the caption leaves
open, read from the pixels by :func:`judge.analyze`), but with a *weight* per taste component and a per-user
*strength* instead of the fixed ``TASTE_WEIGHT``:

    score_i(x, c) = overall(x, c) + s_i * taste_i(x, c)

    taste_i(x, c) = sum_{k in O} |w_ik| u_ik(x) / sum_{k in O} |w_ik|                        (in [0, 1])
                    0.5 (NEUTRAL_TASTE, a constant that changes no ranking) when O is empty
    O             = {k : w_ik != 0 and caption c leaves one of component k's attributes open}
    u_ik(x)       = v_k(x)                         if w_ik > 0    (likes the property)
                    (1 - v_k(x)) * 1[object seen]  if w_ik < 0    (likes its absence; nothing without an object)

with ``v_k`` the components of ``users.COMPONENTS`` (large, small, contrast, centred, light_background,
dark_background, outlined, warm, cool, in that order). A hand-made user is the member with weight 1 on each of its
components and ``s = TASTE_WEIGHT`` (:func:`from_simulated_user`; tested equal). Only the *ratios* of the weights
matter (``taste`` is a weighted mean): the sampled weights are normalised to ``sum_k |w_k| = 1``.

Taste axes
----------
The nine components are drawn as six signed axes ``a_i in R^6`` (:data:`AXES`); an opposed pair is one axis, so a
user can never like both of its ends::

    size        a > 0: large,             a < 0: small              w_large = max(a, 0), w_small = max(-a, 0)
    background  a > 0: light_background,  a < 0: dark_background     (the same split)
    temperature a > 0: warm,              a < 0: cool                (the same split)
    contrast    a > 0: high contrast,     a < 0: muted               w_contrast = a
    centred     a > 0: centred,           a < 0: off-centre          w_centred  = a
    outlined    a > 0: outlined,          a < 0: plain               w_outlined = a

The distribution (:func:`population`, ``n`` users, ids ``1000 .. 1000 + n - 1``, never the hand-made 1..4)
---------------------------------------------------------------------------------------------------------------
Kinds, by construction: exact counts ``floor(share * n)``, the rest to the largest remainders (n = 240: 60 / 60 /
72 / 48), assigned to the ids by a seeded permutation so that an id says nothing about its kind:

====================  =======  =========================  ===================================================
kind                  share    strength ``s ~``           direction
====================  =======  =========================  ===================================================
``strong``            25 %     U(1.0, 2.0)                mainstream: taste dominates the judge (overall <= 1)
``weak``              25 %     U(0.0, 0.04)               mainstream: nearly the judge's ranking
``moderate``          30 %     U(0.15, 0.45)              mainstream, around the hand-made users' 0.3
``contrarian``        20 %     U(0.3, 1.0)                opposed to the population mean direction
====================  =======  =========================  ===================================================

Direction, per user (``mu``: :data:`MEAN_DIRECTION`, the average user's taste: large, light, slightly warm,
high-contrast, centred, slightly outlined objects)::

    mu       = (size 0.6, background 0.4, temperature 0.3, contrast 0.8, centred 0.5, outlined 0.2)
    m_k      ~ Bernoulli(0.6) iid                (which axes the user cares about; redrawn if all are 0)
    e_k      ~ N(0, 1) iid
    z        = m * (sign_kind * mu + 0.5 * e),    sign_kind = -1 for contrarians, +1 otherwise
    accepted when cos(z, mu) >= 0     (mainstream kinds: not against the average)
               cos(z, mu) <= -0.5  (contrarians: clearly against it)       otherwise (m, e) are redrawn
    a        = z / ||z||_1

The population's mean direction is then along ``+mu`` (80 % of the users are mainstream), and every contrarian's
direction has a negative cosine with it (tested on the drawn population; over seeds 0..29 the largest such cosine
was -0.196). Agreement with the judge's ranking on 100 pairs of world images (one caption per pair, the world's
hazard/noise/smear at 15 % each; ``tests/test_user_population.py``), mean (min) per kind: weak 0.965 (0.90),
moderate 0.875 (0.79), contrarian 0.81 (0.72), strong 0.77 (0.68). Strong users agree as often as that because
many pairs differ by a defect the judge punishes hard, and taste only sees the attributes the caption leaves open.

Interpolation (:func:`interpolate`): the signed axes and the strength are linear in ``alpha``; a ground truth for
checks of interpolated user embeddings.

Held-out users (:func:`split_users`): within each kind, a seeded ``round(unseen_fraction * n_kind)`` of its ids
(at least 1, at most ``n_kind - 1``) are unseen, so every kind is in both splits; 48 of 240 at the defaults.

Scoring many users is cheap: the analysis of an image (a few ms) is done once (:func:`component_values`,
:func:`open_mask`), each user's taste is then a weighted mean of 9 numbers (:func:`taste_matrix`,
:class:`PopulationScorer`, :meth:`PopulationUser.score_analyses`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .captions import CaptionSpec
from .judge import Analysis, Judge, analyze, parse_prompts, to_uint8_batch
from .users import COMPONENTS, NEUTRAL_TASTE, TASTE_WEIGHT, SimulatedUser

COMPONENT_NAMES: tuple[str, ...] = tuple(COMPONENTS)
"""The order of :attr:`PopulationUser.weights`: large, small, contrast, centred, light_background,
dark_background, outlined, warm, cool."""

AXES: tuple[str, ...] = ("size", "background", "temperature", "contrast", "centred", "outlined")
"""The signed taste axes (module docstring), the coordinates of :func:`taste_vector`."""

OPPOSED_AXES: dict[str, tuple[str, str]] = {
    "size": ("large", "small"),
    "background": ("light_background", "dark_background"),
    "temperature": ("warm", "cool"),
}
"""Axis -> (component liked for a > 0, component liked for a < 0): these components are never both weighted."""

SIGNED_AXES: dict[str, str] = {"contrast": "contrast", "centred": "centred", "outlined": "outlined"}
"""Axis -> the one component it weights, with the axis's sign (a negative weight likes the complement)."""

MEAN_DIRECTION: dict[str, float] = {
    "size": 0.6,
    "background": 0.4,
    "temperature": 0.3,
    "contrast": 0.8,
    "centred": 0.5,
    "outlined": 0.2,
}
"""``mu``: the average user's taste direction before noise (module docstring)."""

KIND_SHARES: dict[str, float] = {"strong": 0.25, "weak": 0.25, "moderate": 0.30, "contrarian": 0.20}
STRENGTH_RANGES: dict[str, tuple[float, float]] = {
    "strong": (1.0, 2.0),
    "weak": (0.0, 0.04),
    "moderate": (0.15, 0.45),
    "contrarian": (0.3, 1.0),
}
AXIS_KEEP_PROBABILITY = 0.6
DIRECTION_NOISE = 0.5
CONTRARIAN_MAX_COSINE = -0.5
MAINSTREAM_MIN_COSINE = 0.0
FIRST_USER_ID = 1000
DEFAULT_N_USERS = 240

_MU = np.array([MEAN_DIRECTION[a] for a in AXES], dtype=np.float64)
_INDEX = {name: i for i, name in enumerate(COMPONENT_NAMES)}


def _weights_from_axes(axes: np.ndarray) -> tuple[float, ...]:
    """The nine component weights (COMPONENT order) of a signed axis vector (module docstring)."""
    w = [0.0] * len(COMPONENT_NAMES)
    for a, value in zip(AXES, axes, strict=True):
        value = float(value)
        if a in OPPOSED_AXES:
            pos, neg = OPPOSED_AXES[a]
            w[_INDEX[pos]] = value if value > 0 else 0.0
            w[_INDEX[neg]] = -value if value < 0 else 0.0
        else:
            w[_INDEX[SIGNED_AXES[a]]] = value
    return tuple(w)


def _axes_from_weights(weights: Sequence[float]) -> np.ndarray:
    """The signed axis vector of nine component weights (``w_large - w_small`` etc.), shape (6,)."""
    out = np.zeros(len(AXES), dtype=np.float64)
    for i, a in enumerate(AXES):
        if a in OPPOSED_AXES:
            pos, neg = OPPOSED_AXES[a]
            out[i] = weights[_INDEX[pos]] - weights[_INDEX[neg]]
        else:
            out[i] = weights[_INDEX[SIGNED_AXES[a]]]
    return out


@dataclass(frozen=True)
class PopulationUser:
    """One simulated user: ``overall + strength * taste`` with a weighted taste (module docstring).

    ``weights`` are in :data:`COMPONENT_NAMES` order. The components of an opposed pair (large/small,
    light/dark background, warm/cool) are >= 0 and never both > 0; contrast, centred and outlined may be negative
    (the user likes the complement: muted, off-centre, plain)."""

    user_id: int
    weights: tuple[float, ...]
    strength: float
    kind: str

    def __post_init__(self) -> None:
        if len(self.weights) != len(COMPONENT_NAMES):
            raise ValueError(
                f"user {self.user_id}: {len(self.weights)} weights, expected {len(COMPONENT_NAMES)} "
                f"(in the order {COMPONENT_NAMES})"
            )
        if not all(math.isfinite(w) for w in self.weights) or not math.isfinite(self.strength):
            raise ValueError(f"user {self.user_id}: weights and strength must be finite")
        if self.strength < 0:
            raise ValueError(f"user {self.user_id}: strength {self.strength} < 0 (a taste is not a penalty)")
        for pos, neg in OPPOSED_AXES.values():
            wp, wn = self.weights[_INDEX[pos]], self.weights[_INDEX[neg]]
            if wp < 0 or wn < 0:
                raise ValueError(
                    f"user {self.user_id}: {pos}/{neg} weights must be >= 0 (the pair is one signed axis: "
                    f"like {neg} instead of a negative {pos})"
                )
            if wp > 0 and wn > 0:
                raise ValueError(f"user {self.user_id}: likes both {pos} and {neg}, which are opposed")

    @property
    def weight_dict(self) -> dict[str, float]:
        return dict(zip(COMPONENT_NAMES, self.weights, strict=True))

    def taste_of(self, analysis: Analysis, spec: CaptionSpec) -> float:
        """The taste term in [0, 1] of one analysed image for one caption spec (the reference implementation;
        :meth:`score_analyses` computes the same numbers for a batch)."""
        open_attrs = set(spec.open_attributes())
        num = den = 0.0
        for name, w in zip(COMPONENT_NAMES, self.weights, strict=True):
            if w == 0 or not open_attrs.intersection(COMPONENTS[name].open_any):
                continue
            v = COMPONENTS[name].value(analysis)
            u = v if w > 0 else ((1.0 - v) if analysis.has_object else 0.0)
            num += abs(w) * u
            den += abs(w)
        return num / den if den > 0 else NEUTRAL_TASTE

    def taste(self, images: Any, prompts: list[str]) -> np.ndarray:
        """The taste term alone, (B,) float64 in [0, 1]."""
        arr = to_uint8_batch(images)
        specs = parse_prompts(prompts, len(arr))
        return taste_matrix([self], [analyze(im) for im in arr], specs)[0]

    def score(self, images: Any, prompts: list[str], judge: Judge | None = None) -> np.ndarray:
        """``judge.overall + strength * taste``, (B,) float64."""
        judge = judge or Judge()
        arr = to_uint8_batch(images)
        specs = parse_prompts(prompts, len(arr))
        analyses = [analyze(im) for im in arr]
        return self.score_analyses(analyses, specs, judge.score_analyses(analyses, specs)["overall"])

    def score_analyses(
        self, analyses: Sequence[Analysis], specs: Sequence[CaptionSpec], overall: np.ndarray
    ) -> np.ndarray:
        """``overall + strength * taste`` of already analysed images, (B,) float64: analyse (and judge) a batch
        once, then score it for as many users as needed."""
        overall = np.asarray(overall, dtype=np.float64)
        return overall + self.strength * taste_matrix([self], analyses, specs)[0]


# ---- batched taste -----------------------------------------------------------------------------------------


def component_values(analyses: Sequence[Analysis]) -> tuple[np.ndarray, np.ndarray]:
    """``(values (B, 9), has_object (B,) bool)``: every taste component of every analysed image."""
    values = np.array(
        [[COMPONENTS[c].value(an) for c in COMPONENT_NAMES] for an in analyses], dtype=np.float64
    ).reshape(len(analyses), len(COMPONENT_NAMES))
    return values, np.array([an.has_object for an in analyses], dtype=bool)


def open_mask(specs: Sequence[CaptionSpec]) -> np.ndarray:
    """(B, 9) bool: whether each caption leaves one of each component's attributes open."""
    rows = []
    for spec in specs:
        open_attrs = set(spec.open_attributes())
        rows.append([bool(open_attrs.intersection(COMPONENTS[c].open_any)) for c in COMPONENT_NAMES])
    return np.array(rows, dtype=bool).reshape(len(specs), len(COMPONENT_NAMES))


def taste_matrix(
    users: Sequence[PopulationUser], analyses: Sequence[Analysis], specs: Sequence[CaptionSpec]
) -> np.ndarray:
    """(U, B) taste of every user on every analysed image (the formula of the module docstring)."""
    if len(analyses) != len(specs):
        raise ValueError(f"{len(analyses)} analyses but {len(specs)} caption specs; give one spec per image")
    values, has_object = component_values(analyses)
    return _taste_from_values(
        np.array([u.weights for u in users], dtype=np.float64), values, has_object, specs
    )


def _taste_from_values(
    weights: np.ndarray, values: np.ndarray, has_object: np.ndarray, specs: Sequence[CaptionSpec]
) -> np.ndarray:
    weights = weights.reshape(-1, len(COMPONENT_NAMES))
    opened = open_mask(specs).astype(np.float64)  # (B, 9)
    complement = np.where(has_object[:, None], 1.0 - values, 0.0)
    num = np.zeros((len(weights), len(values)))
    den = np.zeros((len(weights), len(values)))
    for k in range(
        len(COMPONENT_NAMES)
    ):  # a fixed order of additions: batches and subsets give the same bits
        w = weights[:, k : k + 1]  # (U, 1)
        liked = np.where(w > 0, values[None, :, k], complement[None, :, k])  # (U, B)
        num += np.abs(w) * opened[None, :, k] * liked
        den += np.abs(w) * opened[None, :, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), NEUTRAL_TASTE)


# ---- the population ----------------------------------------------------------------------------------------


def kind_counts(n: int) -> dict[str, int]:
    """Exact per-kind counts of ``n`` users: ``floor(share * n)``, the remainder to the largest fractions."""
    if n < 1:
        raise ValueError(f"a population needs at least one user, got n={n}")
    raw = {k: share * n for k, share in KIND_SHARES.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    order = sorted(KIND_SHARES, key=lambda k: (-(raw[k] - counts[k]), list(KIND_SHARES).index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _draw_direction(rng: np.random.Generator, contrarian: bool) -> np.ndarray:
    sign = -1.0 if contrarian else 1.0
    mu_unit = _MU / np.linalg.norm(_MU)
    while True:
        mask = rng.random(len(AXES)) < AXIS_KEEP_PROBABILITY
        eps = rng.standard_normal(len(AXES))
        if not mask.any():
            continue
        z = mask * (sign * _MU + DIRECTION_NOISE * eps)
        norm = np.linalg.norm(z)
        if norm == 0:
            continue
        cos = float(z @ mu_unit / norm)
        if (cos <= CONTRARIAN_MAX_COSINE) if contrarian else (cos >= MAINSTREAM_MIN_COSINE):
            return z / np.abs(z).sum()


def population(n: int = DEFAULT_N_USERS, seed: int = 0) -> list[PopulationUser]:
    """``n`` users (ids ``1000 .. 1000 + n - 1``) drawn from the documented distribution; deterministic in
    ``(n, seed)``. Each user draws from its own child of ``SeedSequence(seed)``, so the rejection loops of one user
    do not shift the draws of the next."""
    counts = kind_counts(n)
    kinds = np.array([k for k, c in counts.items() for _ in range(c)])
    seq = np.random.SeedSequence(seed)
    kind_seq, *user_seqs = seq.spawn(n + 1)
    kinds = np.random.default_rng(kind_seq).permutation(kinds)
    users = []
    for i, (kind, child) in enumerate(zip(kinds, user_seqs, strict=True)):
        rng = np.random.default_rng(child)
        axes = _draw_direction(rng, contrarian=kind == "contrarian")
        lo, hi = STRENGTH_RANGES[str(kind)]
        strength = float(rng.uniform(lo, hi))
        users.append(PopulationUser(FIRST_USER_ID + i, _weights_from_axes(axes), strength, str(kind)))
    return users


def split_users(
    users: Sequence[PopulationUser], unseen_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(train_ids, unseen_ids)``, disjoint, sorted, covering every user: per kind, a seeded
    ``round(unseen_fraction * n_kind)`` of its ids (clipped to ``[1, n_kind - 1]``, so every kind with >= 2 users
    is in both) are held out. Unseen users test whether a personalised model generalises to new users."""
    if not 0.0 < unseen_fraction < 1.0:
        raise ValueError(f"unseen_fraction must be in (0, 1), got {unseen_fraction}")
    ids = [u.user_id for u in users]
    if len(set(ids)) != len(ids):
        raise ValueError("user ids must be unique")
    by_kind: dict[str, list[int]] = {}
    for u in users:
        by_kind.setdefault(u.kind, []).append(u.user_id)
    rng = np.random.default_rng(seed)
    unseen: list[int] = []
    for kind in sorted(by_kind):  # a fixed order: the split does not depend on the order of ``users``
        kind_ids = sorted(by_kind[kind])
        k = min(max(round(unseen_fraction * len(kind_ids)), 1), len(kind_ids) - 1)
        unseen += [int(i) for i in rng.permutation(kind_ids)[:k]]
    unseen_set = set(unseen)
    return tuple(sorted(i for i in ids if i not in unseen_set)), tuple(sorted(unseen_set))


def taste_vector(user: PopulationUser, scaled: bool = True) -> np.ndarray:
    """The ground-truth taste of a user on the six signed :data:`AXES`, shape (6,).

    ``scaled=True``: ``strength * a`` (how much each axis moves the user's score; weak users are near 0, alike,
    as their rankings are). ``scaled=False``: the direction ``a`` alone, linear in :func:`interpolate`'s alpha."""
    axes = _axes_from_weights(user.weights)
    return user.strength * axes if scaled else axes


def interpolate(
    user_a: PopulationUser, user_b: PopulationUser, alpha: float, user_id: int = -1
) -> PopulationUser:
    """The user between two users: axes and strength ``(1 - alpha) * a + alpha * b`` (kind ``"interpolated"``).

    Interpolating the signed axes (not the nine weights) keeps an opposed pair exclusive: where the two users
    like opposite ends, the in-between user likes the end whose side the axis is on, less and less, up to the
    crossing. Elsewhere the nine weights are linear in ``alpha``. ``alpha = 0`` and ``1`` give the users' weights
    and strengths exactly. A ground truth for checks of interpolated user embeddings."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    axes = (1.0 - alpha) * _axes_from_weights(user_a.weights) + alpha * _axes_from_weights(user_b.weights)
    strength = (1.0 - alpha) * user_a.strength + alpha * user_b.strength
    return PopulationUser(user_id, _weights_from_axes(axes), float(strength), "interpolated")


def from_simulated_user(user: SimulatedUser) -> PopulationUser:
    """A hand-made user of ``users.py`` as a member of this family: weight 1 on its components, strength
    ``TASTE_WEIGHT`` (its scores are the same)."""
    weights = tuple(1.0 if c in user.components else 0.0 for c in COMPONENT_NAMES)
    return PopulationUser(user.user_id, weights, TASTE_WEIGHT, "handmade")


# ---- the labelling protocol --------------------------------------------------------------------------------


class PopulationScorer:
    """The labelling protocol of ``diffalign/data/labelling.py`` for a population: each image scored by the user
    of its row. Every image is analysed and judged once, whatever the number of users in the batch.

    Use ``BuilderConfig(user_ids=train_ids)`` (from :func:`split_users`) so pairs go to the training users."""

    name = "population"

    def __init__(
        self,
        users: Sequence[PopulationUser] | Mapping[int, PopulationUser] | None = None,
        judge: Judge | None = None,
    ) -> None:
        if users is None:
            users = population()
        members = list(users.values()) if isinstance(users, Mapping) else list(users)
        self.users: dict[int, PopulationUser] = {u.user_id: u for u in members}
        if len(self.users) != len(members):
            raise ValueError("user ids must be unique")
        self.judge = judge if judge is not None else Judge()

    @property
    def user_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.users))

    def score(self, images: Any, prompts: Sequence[str], user_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(user_ids, dtype=np.int64)
        arr = to_uint8_batch(images)
        if len(ids) != len(arr):
            raise ValueError(f"got {len(arr)} images but {len(ids)} user ids; give one user id per image")
        unknown = sorted(set(ids.tolist()) - set(self.users))
        if unknown:
            raise KeyError(f"user ids {unknown[:10]} are not in this population ({len(self.users)} users)")
        specs = parse_prompts(list(prompts), len(arr))
        analyses = [analyze(im) for im in arr]
        overall = self.judge.score_analyses(analyses, specs)["overall"]
        values, has_object = component_values(analyses)
        out = np.empty(len(ids), dtype=np.float64)
        for uid in np.unique(ids):
            idx = np.flatnonzero(ids == uid)
            user = self.users[int(uid)]
            taste = _taste_from_values(
                np.array(user.weights), values[idx], has_object[idx], [specs[i] for i in idx]
            )[0]
            out[idx] = overall[idx] + user.strength * taste
        return out


__all__ = [
    "AXES",
    "COMPONENT_NAMES",
    "KIND_SHARES",
    "MEAN_DIRECTION",
    "STRENGTH_RANGES",
    "PopulationScorer",
    "PopulationUser",
    "component_values",
    "from_simulated_user",
    "interpolate",
    "kind_counts",
    "open_mask",
    "population",
    "split_users",
    "taste_matrix",
    "taste_vector",
]
