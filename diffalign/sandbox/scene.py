"""The sandbox world's scenes and their deterministic renderer.

A scene is one object (a shape of some kind, colour, size and position) on a plain background, with optional
attributes (an outline; a second colour laid out in a two-tone ``pattern``, which captions cannot ask for: only the
sandbox's DreamBench subjects, ``subjects.py``, use it) and optional defects that real web images have too: an
*unsafe* hazard mark in a corner, pixel noise, and smear (blur). Rendering is a pure function of the :class:`Scene`: the same scene always gives the
same pixels, bit for bit (anti-aliasing by 4x supersampling, no randomness inside :func:`render`).

Images are ``uint8`` arrays of shape ``(IMAGE_SIZE, IMAGE_SIZE, 3)``. The geometry helpers (:func:`shape_mask`) are
shared with the judge, which fits the same templates to generated pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 130, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "sky": (150, 200, 240),
    "sand": (225, 200, 150),
}
SIZES: dict[str, float] = {"small": 4.0, "large": 7.5}  # "radius" in pixels
# Object centres (x, y) in pixels, image coordinates (y grows downwards).
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (16.0, 16.0),
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
}
DARK_BACKGROUNDS = ("black", "gray")
HAZARD_SIZE = 8
HAZARD_YELLOW = (250, 220, 0)
HAZARD_BLACK = (10, 10, 10)
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
# Two-tone patterns (``Scene.pattern``): where the object shows ``color`` and where ``color2``. The geometry is
# relative to the object's centre and radius, so a pattern moves and scales with its object.
#   solid    one colour (``color2`` must be None): every scene of the captions' world
#   split_h  top half ``color``, bottom half ``color2``
#   split_v  left half ``color``, right half ``color2``
#   stripes  horizontal bands of height 0.4 r (3 px for a large object), the middle band ``color``, alternating
#   checker  2x2 checks around the centre: top-left and bottom-right ``color``, the other two ``color2``
#   dot      a centre disc of radius 0.55 r in ``color2``, the rest ``color``
PATTERNS = ("solid", "split_h", "split_v", "stripes", "checker", "dot")
STRIPE_HEIGHT = 0.4  # times the radius
DOT_RADIUS = 0.55  # times the radius


def outline_color(background: str) -> tuple[int, int, int]:
    """Outlines are white on dark backgrounds and black on light ones."""
    return (250, 250, 250) if background in DARK_BACKGROUNDS else (10, 10, 10)


@dataclass(frozen=True)
class Scene:
    """Everything that determines an image. ``dx, dy, scale`` are small continuous jitters around the named
    position and size (the renderer applies them; captions do not mention them)."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    outline: bool = False
    hazard: bool = False  # the unsafe element: a yellow/black striped mark in a corner
    hazard_corner: str = "top_left"
    noise: float = 0.0  # std of additive Gaussian pixel noise, in [0, 1] intensity units
    smear: int = 0  # box-blur radius in pixels (0: sharp)
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    seed: int = 0  # seeds the noise pattern only
    color2: str | None = None  # the second colour of a two-tone pattern (None for "solid")
    pattern: str = "solid"  # one of PATTERNS: where the object shows ``color`` and where ``color2``

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, OBJECT_COLORS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("background", self.background, BACKGROUNDS),
            ("hazard_corner", self.hazard_corner, CORNERS),
        ):
            if value not in valid:
                raise ValueError(f"Scene.{name}={value!r} is not one of {sorted(valid)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"Scene.pattern={self.pattern!r} is not one of {list(PATTERNS)}")
        if self.pattern == "solid":
            if self.color2 is not None:
                raise ValueError(
                    f"Scene.color2={self.color2!r} needs a two-tone pattern (one of {list(PATTERNS[1:])}); "
                    "a solid object has one colour (color2=None)"
                )
        elif self.color2 not in OBJECT_COLORS:
            raise ValueError(
                f"Scene.color2={self.color2!r} is not one of {sorted(OBJECT_COLORS)} (pattern {self.pattern!r} "
                "needs a second colour)"
            )
        elif self.color2 == self.color:
            raise ValueError(
                f"Scene.color2={self.color2!r} equals Scene.color: a two-tone pattern needs two different colours"
            )

    def replace(self, **changes) -> Scene:
        return dataclasses.replace(self, **changes)

    @property
    def center(self) -> tuple[float, float]:
        cx, cy = POSITIONS[self.position]
        return cx + self.dx, cy + self.dy

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale


def shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` with centre ``(cx, cy)`` and radius ``r`` sampled at pixel-centre coordinates
    ``xs, ys`` (broadcastable arrays). Each kind is scaled so that its area is close to a circle's of radius r,
    which makes the size of an object independent of its kind."""
    x = xs - cx
    y = ys - cy
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        h = r * 0.886  # area (2h)^2 = pi r^2
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if shape == "diamond":
        h = r * 1.2533  # area 2h^2 = pi r^2
        return np.abs(x) + np.abs(y) <= h
    if shape == "triangle":
        # Upward isosceles triangle, base at y = +b, apex at y = -b; area 2b * b = pi r^2 with half-width b.
        b = r * 1.2533
        inside_y = (y >= -b) & (y <= b)
        half_width = (y + b) / 2.0  # from 0 at the apex to b at the base
        return inside_y & (np.abs(x) <= half_width)
    if shape == "cross":
        # Plus sign with arm half-width w and half-length L = 3w: area = 2*(2L)(2w) - (2w)^2 = 20 w^2.
        w = r * np.sqrt(np.pi / 20.0)
        L = 3.0 * w
        return ((np.abs(x) <= w) & (np.abs(y) <= L)) | ((np.abs(y) <= w) & (np.abs(x) <= L))
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def pattern_mask(pattern: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask, broadcast to ``xs`` x ``ys``, of where a ``pattern`` object of centre ``(cx, cy)`` and radius
    ``r`` shows its first colour (``Scene.color``); elsewhere it shows ``Scene.color2`` (see :data:`PATTERNS`)."""
    x = xs - cx
    y = ys - cy
    shape = np.broadcast_shapes(np.shape(xs), np.shape(ys))
    if pattern == "solid":
        m = np.ones(shape, dtype=bool)
    elif pattern == "split_h":
        m = y < 0
    elif pattern == "split_v":
        m = x < 0
    elif pattern == "stripes":
        m = np.floor(y / (STRIPE_HEIGHT * r) + 0.5) % 2 == 0
    elif pattern == "checker":
        m = (x < 0) == (y < 0)
    elif pattern == "dot":
        m = x * x + y * y > (DOT_RADIUS * r) ** 2
    else:
        raise ValueError(f"unknown pattern {pattern!r}; valid: {PATTERNS}")
    return np.broadcast_to(m, shape)


def _grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    n = size * supersample
    c = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    return c[None, :], c[:, None]  # xs (1, n), ys (n, 1)


def coverage(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape, ``(size, size)`` float64, by 4x4 supersampling."""
    xs, ys = _grid(size, SUPERSAMPLE)
    m = shape_mask(shape, cx, cy, r, xs, ys).astype(np.float64)
    return m.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def pattern_coverage(
    shape: str,
    pattern: str,
    cx: float,
    cy: float,
    r: float,
    pattern_r: float | None = None,
    size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage of a two-tone object's two colour regions, ``(size, size)`` float64 each (4x4
    supersampling): where the shape of radius ``r`` shows its first colour and where its second. The pattern's
    geometry uses ``pattern_r`` (default ``r``): an outlined object's fill is 0.5 px smaller than its radius, its
    pattern is not."""
    xs, ys = _grid(size, SUPERSAMPLE)
    m = shape_mask(shape, cx, cy, r, xs, ys)
    p = pattern_mask(pattern, cx, cy, r if pattern_r is None else pattern_r, xs, ys)

    def pool(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))

    return pool(m & p), pool(m & ~p)


def hazard_patch() -> np.ndarray:
    """The unsafe element: ``(HAZARD_SIZE, HAZARD_SIZE, 3)`` uint8 yellow/black diagonal stripes."""
    i, j = np.meshgrid(np.arange(HAZARD_SIZE), np.arange(HAZARD_SIZE), indexing="ij")
    stripe = ((i + j) // 2) % 2 == 0
    patch = np.where(stripe[..., None], np.array(HAZARD_YELLOW), np.array(HAZARD_BLACK))
    return patch.astype(np.uint8)


def corner_slices(corner: str, size: int = IMAGE_SIZE, patch: int = HAZARD_SIZE) -> tuple[slice, slice]:
    """Row and column slices of a ``patch``-sized square in one corner (1 px in from the edge)."""
    top = corner.startswith("top")
    left = corner.endswith("left")
    rows = slice(1, 1 + patch) if top else slice(size - 1 - patch, size - 1)
    cols = slice(1, 1 + patch) if left else slice(size - 1 - patch, size - 1)
    return rows, cols


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return img
    k = 2 * radius + 1
    padded = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    # Separable box filter through cumulative sums (exact, deterministic).
    c = np.cumsum(padded, axis=0)
    c = np.concatenate([np.zeros_like(c[:1]), c], axis=0)
    v = (c[k:] - c[:-k]) / k
    c = np.cumsum(v, axis=1)
    c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
    return (c[:, k:] - c[:, :-k]) / k


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render a scene to a ``(size, size, 3)`` uint8 RGB array. Deterministic: a pure function of ``scene``."""
    if size != IMAGE_SIZE:
        raise ValueError(f"the sandbox renders at {IMAGE_SIZE}x{IMAGE_SIZE} only, got size={size}")
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64) / 255.0
    fg = np.array(OBJECT_COLORS[scene.color], dtype=np.float64) / 255.0
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    cx, cy = scene.center
    r = scene.radius
    if scene.pattern != "solid":  # two-tone (solid scenes take the unchanged branches below)
        fg2 = np.array(OBJECT_COLORS[scene.color2], dtype=np.float64) / 255.0
        fill_r = r
        if scene.outline:
            oc = np.array(outline_color(scene.background), dtype=np.float64) / 255.0
            a_out = coverage(scene.shape, cx, cy, r + 1.0)[..., None]
            img = img * (1 - a_out) + oc * a_out
            fill_r = r - 0.5
        a1, a2 = pattern_coverage(scene.shape, scene.pattern, cx, cy, fill_r, pattern_r=r)
        a1, a2 = a1[..., None], a2[..., None]
        img = img * (1 - a1 - a2) + fg * a1 + fg2 * a2
    elif scene.outline:
        oc = np.array(outline_color(scene.background), dtype=np.float64) / 255.0
        a_out = coverage(scene.shape, cx, cy, r + 1.0)[..., None]
        img = img * (1 - a_out) + oc * a_out
        a_in = coverage(scene.shape, cx, cy, r - 0.5)[..., None]
        img = img * (1 - a_in) + fg * a_in
    else:
        a = coverage(scene.shape, cx, cy, r)[..., None]
        img = img * (1 - a) + fg * a
    if scene.hazard:
        rows, cols = corner_slices(scene.hazard_corner, size)
        img[rows, cols] = hazard_patch().astype(np.float64) / 255.0
    if scene.smear:
        img = _box_blur(img, scene.smear)
    if scene.noise > 0:
        rng = np.random.default_rng(scene.seed)
        img = img + rng.normal(0.0, scene.noise, size=img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
