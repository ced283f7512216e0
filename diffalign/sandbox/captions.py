"""Captions of the sandbox world: a small English grammar, its parser, and the world's data distribution.

A caption always names the shape; it may leave the colour, size, position, background and outline *open*. What a
caption leaves open is where taste can differ: the simulated users (``users.py``) disagree exactly there.

Grammar (``[...]`` optional, ``|`` alternatives)::

    caption   := [prefix] article [size] [color] shape [" with an outline"] [position] [background]
    prefix    := "a picture of " | "an icon of " | "a drawing of "
    position  := " in the center" | " on the left" | " on the right" | " at the top" | " at the bottom"
    background:= " on a <name> background"

``parse_caption(caption_text(spec)) == spec`` for every spec (tested).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import numpy as np

from .scene import BACKGROUNDS, CORNERS, OBJECT_COLORS, POSITIONS, SHAPES, SIZES, Scene

ATTRIBUTES = ("shape", "color", "size", "position", "background", "outline")
PREFIXES = ("", "a picture of ", "an icon of ", "a drawing of ")
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for. ``None`` means the caption leaves that attribute open. ``outline`` is ``True``
    when the caption asks for an outline and ``None`` otherwise (captions never ask for "no outline")."""

    shape: str
    color: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None
    outline: bool | None = None

    def named(self) -> dict[str, object]:
        """The attributes this caption names, with their values."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def open_attributes(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is None)

    def matches(self, scene: Scene) -> bool:
        return all(getattr(scene, k) == v for k, v in self.named().items())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_text(spec: CaptionSpec, prefix: str = "") -> str:
    """Write a spec as an English caption. ``prefix`` is one of :data:`PREFIXES`."""
    words = [w for w in (spec.size, spec.color, spec.shape) if w]
    head = " ".join(words)
    text = f"{prefix}{_article(head)} {head}"
    if spec.outline:
        text += " with an outline"
    if spec.position:
        text += " " + POSITION_PHRASES[spec.position]
    if spec.background:
        text += f" on {_article(spec.background)} {spec.background} background"
    return text


_CAPTION_RE = re.compile(
    r"^(?:(?:a picture of|an icon of|a drawing of)\s+)?(?:an?\s+)?"
    rf"(?:(?P<size>{'|'.join(SIZES)})\s+)?"
    rf"(?:(?P<color>{'|'.join(OBJECT_COLORS)})\s+)?"
    rf"(?P<shape>{'|'.join(SHAPES)})"
    r"(?P<outline>\s+with an outline)?"
    rf"(?:\s+(?P<position>{'|'.join(map(re.escape, _PHRASE_TO_POSITION))}))?"
    rf"(?:\s+on an?\s+(?P<background>{'|'.join(BACKGROUNDS)})\s+background)?"
    r"\s*\.?$"
)


def parse_caption(text: str) -> CaptionSpec:
    """Parse a caption of the sandbox grammar (case- and whitespace-insensitive).

    Raises ``ValueError`` naming the caption when it is not in the grammar.
    """
    norm = " ".join(text.lower().strip().split())
    m = _CAPTION_RE.match(norm)
    if m is None:
        raise ValueError(
            f"caption {text!r} is not in the sandbox grammar (e.g. 'a large red circle on the left on a white "
            "background'); see diffalign/sandbox/captions.py"
        )
    g = m.groupdict()
    return CaptionSpec(
        shape=g["shape"],
        color=g["color"],
        size=g["size"],
        position=_PHRASE_TO_POSITION[g["position"]] if g["position"] else None,
        background=g["background"],
        outline=True if g["outline"] else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# The world's distribution: which captions occur, and which images go with them.

# Probability that a caption names each optional attribute.
P_NAMED = {"color": 0.9, "size": 0.5, "position": 0.5, "background": 0.5, "outline": 0.15}
# Open attributes are filled at random; an unnamed outline is present with this probability.
P_OUTLINE_UNNAMED = 0.15


def sample_spec(rng: np.random.Generator) -> CaptionSpec:
    """A random caption spec, naming each optional attribute with the probability in :data:`P_NAMED`."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = (
        OBJECT_COLORS_LIST[rng.integers(len(OBJECT_COLORS_LIST))] if rng.random() < P_NAMED["color"] else None
    )
    size = SIZES_LIST[rng.integers(len(SIZES_LIST))] if rng.random() < P_NAMED["size"] else None
    position = (
        POSITIONS_LIST[rng.integers(len(POSITIONS_LIST))] if rng.random() < P_NAMED["position"] else None
    )
    background = (
        BACKGROUNDS_LIST[rng.integers(len(BACKGROUNDS_LIST))]
        if rng.random() < P_NAMED["background"]
        else None
    )
    outline = True if rng.random() < P_NAMED["outline"] else None
    return CaptionSpec(shape, color, size, position, background, outline)


OBJECT_COLORS_LIST = tuple(OBJECT_COLORS)
SIZES_LIST = tuple(SIZES)
POSITIONS_LIST = tuple(POSITIONS)
BACKGROUNDS_LIST = tuple(BACKGROUNDS)


def scene_for_spec(
    spec: CaptionSpec,
    rng: np.random.Generator,
    *,
    p_hazard: float = 0.0,
    p_noise: float = 0.0,
    p_smear: float = 0.0,
    jitter: bool = True,
) -> Scene:
    """A scene that satisfies ``spec``: open attributes drawn uniformly, defects with the given probabilities."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    outline = bool(spec.outline) if spec.outline else bool(rng.random() < P_OUTLINE_UNNAMED)
    return Scene(
        shape=spec.shape,
        color=spec.color or pick(OBJECT_COLORS_LIST),
        size=spec.size or pick(SIZES_LIST),
        position=spec.position or pick(POSITIONS_LIST),
        background=spec.background or pick(BACKGROUNDS_LIST),
        outline=outline,
        hazard=bool(rng.random() < p_hazard),
        hazard_corner=pick(CORNERS),
        noise=float(rng.uniform(0.06, 0.14)) if rng.random() < p_noise else 0.0,
        smear=1 if rng.random() < p_smear else 0,
        dx=float(rng.uniform(-1.0, 1.0)) if jitter else 0.0,
        dy=float(rng.uniform(-1.0, 1.0)) if jitter else 0.0,
        scale=float(rng.uniform(0.9, 1.1)) if jitter else 1.0,
        seed=int(rng.integers(2**31)),
    )


def corrupt_spec(spec: CaptionSpec, rng: np.random.Generator) -> CaptionSpec:
    """Change one named attribute to a wrong value (web captions are noisy; the base model learns from them)."""
    options = {
        "shape": SHAPES,
        "color": OBJECT_COLORS_LIST,
        "size": SIZES_LIST,
        "position": POSITIONS_LIST,
        "background": BACKGROUNDS_LIST,
    }
    named = [k for k in spec.named() if k in options]
    key = named[rng.integers(len(named))]
    current = getattr(spec, key)
    wrong = [v for v in options[key] if v != current]
    return CaptionSpec(**{**asdict(spec), key: wrong[rng.integers(len(wrong))]})


@dataclass(frozen=True)
class WorldConfig:
    """The distribution of (image, caption) pairs the sandbox models are trained on: like web data, it has noisy
    captions, unsafe marks and low-quality images, which is what leaves room for alignment."""

    p_caption_noise: float = 0.25  # one attribute of the caption is wrong
    p_hazard: float = 0.15  # the unsafe hazard mark appears
    p_noise: float = 0.15  # additive pixel noise
    p_smear: float = 0.15  # blur


def sample_example(rng: np.random.Generator, world: WorldConfig = WorldConfig()) -> tuple[Scene, str]:
    """One training example of the world: a rendered-scene description and its (possibly noisy) caption."""
    spec = sample_spec(rng)
    scene = scene_for_spec(spec, rng, p_hazard=world.p_hazard, p_noise=world.p_noise, p_smear=world.p_smear)
    shown = corrupt_spec(spec, rng) if rng.random() < world.p_caption_noise else spec
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    return scene, caption_text(shown, prefix)
