"""Simulated users of the sandbox world: four raters with distinct, documented tastes.

Like Pick-a-Pic's users (integer ``user_id``), each simulated user scores images by the judge's ``overall`` score
plus a *taste* bonus. Taste applies only to what the caption leaves OPEN (an attribute the caption names is scored
by the judge's prompt-following as usual), and it is read from the pixels by :func:`judge.analyze`::

    score = judge.overall + TASTE_WEIGHT * taste,        TASTE_WEIGHT = 0.3
    taste = mean of the user's taste components whose attribute(s) the caption leaves open
            (0.5, a constant that changes no ranking, when the caption names all of them)

Taste components (each in [0, 1]; the attribute in brackets must be open for the component to count):

- ``large``  [size]: ``clip((r - 4) / 3.5)`` with ``r`` the estimated radius (small = 4 px, large = 7.5 px);
  ``small`` is ``1 - large``.
- ``contrast`` [colour or background]: ``Analysis.contrast`` (object-background colour distance / 160).
- ``centred`` [position]: ``exp(-d^2 / (2 * 4^2))``, ``d`` the distance of the object's centre from (16, 16).
- ``light_background`` / ``dark_background`` [background]: soft palette match of the background with
  white + sky + sand / black + gray.
- ``outlined`` [outline]: the outline evidence clipped to [0, 1].
- ``warm`` / ``cool`` [colour]: soft palette match of the object with red + orange + yellow / blue + purple.

Users (``SIMULATED_USERS[user_id]``):

====  ============  =====================================================
 id   name          components
====  ============  =====================================================
 1    bold          large, contrast
 2    minimalist    small, centred, light_background
 3    night-owl     dark_background, cool
 4    ornate        outlined, warm
====  ============  =====================================================

So on a caption that leaves the size open, "bold" prefers the large rendering and "minimalist" the small one; on a
caption that leaves the background open, "minimalist" prefers white/sky/sand and "night-owl" black/gray.

See also ``user_population.py``: a seeded family of 240 users with weighted tastes (these four are special cases).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .captions import CaptionSpec
from .judge import Analysis, Judge, analyze, parse_prompts, to_uint8_batch

TASTE_WEIGHT = 0.3
NEUTRAL_TASTE = 0.5


@dataclass(frozen=True)
class TasteComponent:
    """One liked property: ``value(analysis) in [0, 1]``, counted only when one of ``open_any`` is open."""

    name: str
    open_any: tuple[str, ...]
    value: Callable[[Analysis], float]


def _large(an: Analysis) -> float:
    return float(np.clip((an.radius - 4.0) / 3.5, 0.0, 1.0)) if an.has_object else 0.0


def _centred(an: Analysis) -> float:
    if not an.has_object:
        return 0.0
    d = math.hypot(an.center[0] - 16.0, an.center[1] - 16.0)
    return math.exp(-(d**2) / (2 * 4.0**2))


def _sum_match(match: dict[str, float], names: tuple[str, ...]) -> float:
    return float(np.clip(sum(match[n] for n in names), 0.0, 1.0))


COMPONENTS: dict[str, TasteComponent] = {
    c.name: c
    for c in (
        TasteComponent("large", ("size",), _large),
        TasteComponent("small", ("size",), lambda an: 1.0 - _large(an) if an.has_object else 0.0),
        TasteComponent("contrast", ("color", "background"), lambda an: an.contrast),
        TasteComponent("centred", ("position",), _centred),
        TasteComponent(
            "light_background",
            ("background",),
            lambda an: _sum_match(an.background_match, ("white", "sky", "sand")),
        ),
        TasteComponent(
            "dark_background", ("background",), lambda an: _sum_match(an.background_match, ("black", "gray"))
        ),
        TasteComponent(
            "outlined",
            ("outline",),
            lambda an: float(np.clip(an.outline_evidence, 0, 1)) if an.has_object else 0.0,
        ),
        TasteComponent(
            "warm", ("color",), lambda an: _sum_match(an.color_match, ("red", "orange", "yellow"))
        ),
        TasteComponent("cool", ("color",), lambda an: _sum_match(an.color_match, ("blue", "purple"))),
    )
}


@dataclass(frozen=True)
class SimulatedUser:
    """A rater: the judge's overall score plus a taste bonus over what captions leave open (module docstring)."""

    user_id: int
    name: str
    description: str
    components: tuple[str, ...]

    def taste_of(self, analysis: Analysis, spec: CaptionSpec) -> float:
        """The taste term in [0, 1] of one analysed image for one caption spec."""
        open_attrs = set(spec.open_attributes())
        values = [
            COMPONENTS[c].value(analysis)
            for c in self.components
            if open_attrs.intersection(COMPONENTS[c].open_any)
        ]
        return float(np.mean(values)) if values else NEUTRAL_TASTE

    def taste(self, images: Any, prompts: list[str]) -> np.ndarray:
        """The taste term alone, (B,) float64 in [0, 1]."""
        arr = to_uint8_batch(images)
        specs = parse_prompts(prompts, len(arr))
        return np.array(
            [self.taste_of(analyze(im), s) for im, s in zip(arr, specs, strict=True)], dtype=np.float64
        )

    def score(self, images: Any, prompts: list[str], judge: Judge | None = None) -> np.ndarray:
        """``judge.overall + TASTE_WEIGHT * taste``, (B,) float64."""
        judge = judge or Judge()
        arr = to_uint8_batch(images)
        specs = parse_prompts(prompts, len(arr))
        analyses = [analyze(im) for im in arr]
        overall = judge.score_analyses(analyses, specs)["overall"]
        taste = np.array(
            [self.taste_of(an, s) for an, s in zip(analyses, specs, strict=True)], dtype=np.float64
        )
        return overall + TASTE_WEIGHT * taste


SIMULATED_USERS: dict[int, SimulatedUser] = {
    u.user_id: u
    for u in (
        SimulatedUser(1, "bold", "likes large objects and high contrast", ("large", "contrast")),
        SimulatedUser(
            2,
            "minimalist",
            "likes small, centred objects on light backgrounds",
            ("small", "centred", "light_background"),
        ),
        SimulatedUser(
            3,
            "night-owl",
            "likes dark backgrounds (black, gray) and cool colours",
            ("dark_background", "cool"),
        ),
        SimulatedUser(
            4, "ornate", "likes outlined shapes and warm colours (red, orange, yellow)", ("outlined", "warm")
        ),
    )
}

__all__ = ["COMPONENTS", "SIMULATED_USERS", "TASTE_WEIGHT", "SimulatedUser", "TasteComponent"]
