"""The sandbox's DreamBench: two-tone subjects for subject-driven tuning (DreamBooth, RPO) and their benchmark files.

A subject is a fixed identity: one of the grammar's shapes (its **class word**, DreamBench's ``{1}``) painted in two
colours laid out in a pattern (``Scene.color2``, ``Scene.pattern``: a red-top/yellow-bottom circle, a purple/orange
striped diamond, ...). A caption of the sandbox grammar can name one colour only, so no prompt brings the base model
to a subject: only tuning on the subject's reference images can (``subject_similarity`` measures it).

- :data:`SUBJECTS`: the subjects; :func:`reference_scenes`: each one's 5 reference scenes (varied positions and
  backgrounds, large, a small jitter, no defects, no outline), deterministic from a seed.
- :data:`EVAL_TEMPLATES`: DreamBench-style prompts in the sandbox grammar (``'a {0} {1} on the left on a sky
  background'``: ``{0}`` the unique token, ``{1}`` the class); they never name a colour, and each one parses with
  :func:`captions.parse_caption` once the token is removed (:func:`diffalign.eval.dreambench.remove_token`), so the
  judge scores their prompt following. :data:`TRAINING_TEMPLATES` (8, RPO's fixed training contexts) and
  :data:`VALIDATION_TEMPLATES` (2, checkpoint selection) are different prompts again.
- :func:`subject_similarity`: is an image this subject? (in [0, 1]; see its docstring).
- :func:`write_dreambench`: the original DreamBench layout (``dataset/<subject>/00.jpg ...``,
  ``dataset/prompts_and_classes.txt``) plus ``training_prompts.txt`` / ``validation_prompts.txt``; the shipped copy
  is ``diffalign/sandbox/assets/dreambench`` (:data:`SANDBOX_DREAMBENCH`), built by
  ``python scripts/build_sandbox_subjects.py``.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ASSETS_DIR
from .captions import POSITION_PHRASES
from .scene import (
    BACKGROUNDS,
    IMAGE_SIZE,
    OBJECT_COLORS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    coverage,
    outline_color,
    pattern_coverage,
    render,
)

SANDBOX_DREAMBENCH = ASSETS_DIR / "dreambench"
NUM_REFERENCES = 5
# reference centres move by up to this many pixels in x and y around the named position
REFERENCE_JITTER = 0.75
JPEG_QUALITY = 95
UNIQUE_TOKEN = "sks"

# The word a pattern gives a subject's name: redyellow_split_circle.
PATTERN_WORDS = {
    "split_h": "split",
    "split_v": "halved",
    "stripes": "striped",
    "checker": "checkered",
    "dot": "dotted",
}


@dataclass(frozen=True)
class SandboxSubject:
    """One subject: a ``class_word`` (a shape of the grammar) in ``color`` and ``color2`` laid out in ``pattern``."""

    name: str
    class_word: str
    pattern: str
    color: str
    color2: str
    size: str = "large"

    def __post_init__(self) -> None:
        if self.class_word not in SHAPES:
            raise ValueError(f"SandboxSubject.class_word={self.class_word!r} is not one of {list(SHAPES)}")
        if self.pattern not in PATTERNS or self.pattern == "solid":
            raise ValueError(f"SandboxSubject.pattern={self.pattern!r} is not one of {list(PATTERNS[1:])}")
        for field_name in ("color", "color2"):
            if getattr(self, field_name) not in OBJECT_COLORS:
                raise ValueError(
                    f"SandboxSubject.{field_name}={getattr(self, field_name)!r} is not one of {sorted(OBJECT_COLORS)}"
                )
        if self.color == self.color2:
            raise ValueError(f"SandboxSubject {self.name!r}: color and color2 must differ")
        if self.size not in SIZES:
            raise ValueError(f"SandboxSubject.size={self.size!r} is not one of {sorted(SIZES)}")

    def scene(self, position: str = "center", background: str = "white", **changes) -> Scene:
        """A scene of this subject (``changes``: any other :class:`Scene` field, e.g. ``outline=True``, ``dx``)."""
        kw = dict(size=self.size, **changes)
        return Scene(
            shape=self.class_word,
            color=self.color,
            color2=self.color2,
            pattern=self.pattern,
            position=position,
            background=background,
            **kw,
        )


def _subject(class_word: str, pattern: str, color: str, color2: str) -> SandboxSubject:
    return SandboxSubject(
        f"{color}{color2}_{PATTERN_WORDS[pattern]}_{class_word}", class_word, pattern, color, color2
    )


# Chosen for what the sandbox pipeline can draw at all: its VAE (8x8x4 latents, trained on one-colour objects only)
# reconstructs a two-tone object as a soft gradient, and only for a few colour pairs (red/yellow best; most other
# pairs come back as one colour) and coarse patterns (halves, quadrants, a centre dot; 3-px stripes are lost). The
# VAE's reconstruction of the references is the best a tuned model can reach: its subject_similarity is 0.45-0.70
# per subject (measured; 0.02-0.04 for the base model's "a sks <class>"). Colour pairs are far apart (>= 160 in RGB)
# and every mix of the two (a pattern edge) is >= 50 from every background/outline mix (tested).
SUBJECTS: tuple[SandboxSubject, ...] = (
    _subject("circle", "split_h", "red", "yellow"),
    _subject("square", "split_v", "red", "yellow"),
    _subject("triangle", "checker", "yellow", "red"),
    _subject("cross", "dot", "yellow", "red"),
    _subject("diamond", "split_h", "yellow", "red"),
    _subject("triangle", "split_h", "orange", "purple"),
    _subject("circle", "split_h", "red", "blue"),
    _subject("square", "checker", "yellow", "red"),
)
SUBJECTS_BY_NAME = {s.name: s for s in SUBJECTS}


def get_subject(name: str) -> SandboxSubject:
    """The subject called ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in SUBJECTS_BY_NAME:
        raise ValueError(f"unknown sandbox subject {name!r}; valid: {list(SUBJECTS_BY_NAME)}")
    return SUBJECTS_BY_NAME[name]


# ---------------------------------------------------------------------------------------------------------------
# Prompt templates ({0}: unique token, {1}: class word). None names a colour: the subject has its own colours.

EVAL_TEMPLATES: tuple[str, ...] = (
    "a {0} {1} on the left",
    "a {0} {1} on the right",
    "a {0} {1} at the top",
    "a {0} {1} at the bottom",
    "a {0} {1} on a sky background",
    "a {0} {1} on a black background",
    "a {0} {1} with an outline",
    "a small {0} {1}",
    "a large {0} {1} in the center",
    "a {0} {1} on the left on a sky background",
    "a {0} {1} at the bottom on a sand background",
    "a {0} {1} with an outline on a gray background",
    "a small {0} {1} on the right on a white background",
    "a picture of a {0} {1} at the top on a black background",
)
# RPO trains on 8 fixed context prompts, different from the evaluation prompts.
TRAINING_TEMPLATES: tuple[str, ...] = (
    "a {0} {1} in the center on a white background",
    "a {0} {1} on the right on a black background",
    "a {0} {1} at the top on a sand background",
    "a {0} {1} on a gray background",
    "a small {0} {1} on the left",
    "a {0} {1} with an outline at the bottom",
    "an icon of a {0} {1} on a sand background",
    "a large {0} {1} on the right on a gray background",
)
# Checkpoint selection (RPO: 2 prompts), different again.
VALIDATION_TEMPLATES: tuple[str, ...] = (
    "a drawing of a {0} {1} at the top on a white background",
    "a small {0} {1} with an outline on a sky background",
)


def scene_prompt(subject: SandboxSubject, scene: Scene, unique_token: str = UNIQUE_TOKEN) -> str:
    """The prompt that describes a scene of the subject: ``'a sks circle on the left on a sky background'``
    (position and background; ``with an outline`` when the scene has one). Without the token it parses with
    :func:`captions.parse_caption`."""
    text = f"a {unique_token} {subject.class_word}" if unique_token else f"a {subject.class_word}"
    if scene.outline:
        text += " with an outline"
    return f"{text} {POSITION_PHRASES[scene.position]} on a {scene.background} background"


# ---------------------------------------------------------------------------------------------------------------
# Reference scenes


def _subject_rng(subject: SandboxSubject, seed: int) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process, the references must not be.
    return np.random.default_rng([seed, zlib.crc32(subject.name.encode("utf-8"))])


def reference_scenes(subject: SandboxSubject, seed: int = 0, n: int = NUM_REFERENCES) -> list[Scene]:
    """``n`` reference scenes of the subject: every position and every background once per 5 scenes (in an order
    drawn from ``seed`` and the subject's name), the subject's size, centre jitter up to :data:`REFERENCE_JITTER`
    px, no outline, hazard, noise or smear. Deterministic."""
    rng = _subject_rng(subject, seed)
    positions, backgrounds = tuple(POSITIONS), tuple(BACKGROUNDS)
    out = []
    for start in range(0, n, len(positions)):
        pos_order = rng.permutation(len(positions))
        bg_order = rng.permutation(len(backgrounds))
        for k in range(min(len(positions), n - start)):
            dx, dy = rng.uniform(-REFERENCE_JITTER, REFERENCE_JITTER, size=2)
            out.append(
                subject.scene(
                    positions[pos_order[k]],
                    backgrounds[bg_order[k % len(backgrounds)]],
                    dx=round(float(dx), 3),
                    dy=round(float(dy), 3),
                )
            )
    return out


def reference_images(subject: SandboxSubject, seed: int = 0, n: int = NUM_REFERENCES) -> np.ndarray:
    """The rendered reference scenes, ``(n, 32, 32, 3)`` uint8."""
    return np.stack([render(s) for s in reference_scenes(subject, seed, n)])


# ---------------------------------------------------------------------------------------------------------------
# Subject similarity

FG_MIN_DISTANCE = 45.0  # RGB distance from every background/outline mix for a pixel to count as the object
OUTLINE_RING_SHARE = 0.5  # an object has an outline when more of the pixels around it are outline colour
HAZARD_EVIDENCE_MIN = 0.3  # corners with this much hazard evidence (judge) are left out
COLOR_TOLERANCE = 20.0  # RGB distance within which a pixel matches its expected colour fully
COLOR_SIGMA = 35.0  # beyond the tolerance, the match falls as a Gaussian of this width
SHAPE_IOU_FLOOR, SHAPE_IOU_SPAN = 0.5, 0.35  # shape factor clip((IoU - floor) / span)
FIT_ITERATIONS = 16
# RGB: an edge pixel this close to a mix of the subject's colours takes that mix's coverage
EDGE_RESIDUAL = 12.0
CUT_FRACTION = 0.97  # a fitted shape with less of its area in frame is cut by the frame
OUTLINE_WIDTH = 1.5  # the renderer: outline out to r + 1, fill to r - 0.5

_PALETTE = np.array(list(OBJECT_COLORS.values()), dtype=np.float64)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[k] for k in _BG_NAMES], dtype=np.float64)
_FRAME = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
_FRAME[[0, -1]] = _FRAME[:, [0, -1]] = True


@dataclass
class _Located:
    background: np.ndarray  # (3,) RGB
    outline_rgb: np.ndarray  # (3,) the outline colour of that background
    alpha: np.ndarray  # (H, W) the object's coverage (0 outside its region)
    area: float
    centroid: tuple[float, float]
    outlined: bool  # an outline surrounds the object


def _distance_to_segment(p: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Euclidean distance of colours ``p`` (..., 3) to the segment from ``u`` to ``v`` (3,)."""
    d = v - u
    t = np.clip((p - u) @ d / max(float(d @ d), 1e-9), 0.0, 1.0)
    return np.linalg.norm(p - (u + t[..., None] * d), axis=-1)


def _sum3x3(x: np.ndarray) -> np.ndarray:
    """Sum over each pixel's 3x3 neighbourhood (zero outside the image), over the first two axes."""
    p = np.pad(x, ((1, 1), (1, 1)) + ((0, 0),) * (x.ndim - 2))
    h, w = x.shape[:2]
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3))


def _mix(d: np.ndarray, u: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, ``d ≈ a u + b w`` by least squares with ``a, b`` clipped to [0, 1] (mixes only): ``(a, residual²)``
    for ``(n, 3)`` arrays."""
    uu, uw, ww = (u * u).sum(1), (u * w).sum(1), (w * w).sum(1)
    du, dw = (d * u).sum(1), (d * w).sum(1)
    det = np.maximum(uu * ww - uw * uw, 1e-6)
    a = np.clip((du * ww - dw * uw) / det, 0.0, 1.0)
    b = np.clip((dw * uu - du * uw) / det, 0.0, 1.0)
    return a, ((d - a[:, None] * u - b[:, None] * w) ** 2).sum(1)


def _locate(img: np.ndarray, colours: tuple[np.ndarray, np.ndarray] | None = None) -> _Located | None:
    """Find the object of one (H, W, 3) float image.

    Background: median of the border ring (the corners left out). Object: the largest 4-connected group of pixels
    far from every mix of the background and the outline colour (so an outline and its anti-aliased edge are not
    object), after a morphological closing (a 1-px line of a generated object's colours can come near the background),
    holes filled; hazard corners (judge evidence > 0.3) left out. Coverage ``alpha``: 1 inside (pixels whose
    4 neighbours are object too: the edge between the pattern's two colours mixes two object colours, which no
    single palette colour explains), and on the edge (the object grown by one pixel) the least-squares mix
    ``p - bg ≈ alpha (c - bg) + beta (outline - bg)`` (``alpha, beta`` in [0, 1]) with ``c`` the mean colour of the
    pixel's inside 8-neighbours (the palette colour that explains it best where it has none); with ``colours`` (the
    subject's two), ``alpha = a1 + a2`` of ``p - bg ≈ a1 (c1 - bg) + a2 (c2 - bg) + beta (outline - bg)`` wherever
    that mix explains the pixel within 12 RGB.
    ``None`` when nothing stands out."""
    from .perception import _RING, _corner_mask, _dilate, fill_holes, hazard_evidence, largest_component

    hz = hazard_evidence(img)
    excluded = _corner_mask([c for c, e in hz.items() if e > HAZARD_EVIDENCE_MIN])
    bg = np.median(img[_RING], axis=0)
    bg_name = _BG_NAMES[int(np.argmin(((_BG_RGB - bg) ** 2).sum(-1)))]
    out_rgb = np.array(outline_color(bg_name), dtype=np.float64)
    fg = (_distance_to_segment(img, bg, out_rgb) > FG_MIN_DISTANCE) & ~excluded
    fg = (fg | ~_dilate(~_dilate(fg, 1), 1)) & ~excluded  # closing: 1-px gaps inside the object are object
    core = fill_holes(largest_component(fg))
    if core.sum() < 3:
        return None
    inside = core & ~_dilate(~core, 1) & ~_FRAME  # a pixel on the frame may be partly covered: never inside
    region = _dilate(core, 1) & ~inside & ~excluded
    d = img[region] - bg  # (n, 3)
    # An edge pixel's object colour: the mean colour of the inside pixels among its 8 neighbours (where the
    # pattern's two colours meet, a mix of both, like the pixel); without inside neighbours, the palette colour that
    # explains the pixel best.
    nb_count = _sum3x3(inside.astype(np.float64))[region]
    nb_rgb = _sum3x3(img * inside[..., None])[region] / np.maximum(nb_count, 1.0)[:, None]
    w = np.broadcast_to(out_rgb - bg, d.shape)
    alpha_nb, _ = _mix(d, nb_rgb - bg, w)
    fits = [_mix(d, np.broadcast_to(c - bg, d.shape), w) for c in _PALETTE]
    best = np.argmin(np.stack([r2 for _, r2 in fits]), axis=0)
    alpha_pal = np.stack([a for a, _ in fits])[best, np.arange(len(best))]
    alpha = np.zeros(img.shape[:2])
    alpha_edge = np.where(nb_count > 0, alpha_nb, alpha_pal)
    if colours is not None:
        # the expected two colours and the outline: d = a1 (c1 - bg) + a2 (c2 - bg) + b (outline - bg), 3 unknowns
        # in 3 channels; where the clipped solution explains the pixel, alpha = a1 + a2 (a two-tone edge pixel
        # mixes both colours and the background, which one object colour cannot explain)
        basis = np.stack([colours[0] - bg, colours[1] - bg, out_rgb - bg], axis=1)  # (3, 3)
        coef = np.linalg.solve(basis.T @ basis + 1e-3 * np.eye(3), basis.T @ d.T).T  # (n, 3)
        coef = np.clip(coef, 0.0, 1.0)
        resid = np.linalg.norm(d - coef @ basis.T, axis=1)
        alpha_edge = np.where(resid < EDGE_RESIDUAL, np.clip(coef[:, 0] + coef[:, 1], 0.0, 1.0), alpha_edge)
    alpha[region] = alpha_edge
    alpha[inside] = 1.0
    # Outline: most pixels just outside the object are outline colour (or mixes nearer it than the background).
    ring = _dilate(core, 1) & ~core & ~excluded
    seg = out_rgb - bg
    t = (img[ring] - bg) @ seg / max(float(seg @ seg), 1e-9)
    near = _distance_to_segment(img[ring], bg, out_rgb) < FG_MIN_DISTANCE
    outlined = bool(ring.any() and np.mean(near & (t > 0.5)) > OUTLINE_RING_SHARE)
    area = float(alpha.sum())
    if area < 2.0:
        return None
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    centroid = (float((alpha * xs).sum() / area), float((alpha * ys).sum() / area))
    return _Located(bg, out_rgb, alpha, area, centroid, outlined)


def _match(pixels: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """1 within :data:`COLOR_TOLERANCE` of the expected colour, then a Gaussian fall-off (``(..., 3)`` -> ``(...)``)."""
    dist = np.linalg.norm(pixels - expected, axis=-1)
    return np.exp(-(np.maximum(dist - COLOR_TOLERANCE, 0.0) ** 2) / (2 * COLOR_SIGMA**2))


def _fit(
    shape: str,
    alpha: np.ndarray,
    area: float,
    r: float | None = None,
    start: tuple[float, float] | None = None,
) -> tuple[float, float, float]:
    """Moment matching of a ``shape`` template to the coverage ``alpha``: move the centre by (object centroid -
    template's in-frame centroid) and scale the radius by ``sqrt(area / template's in-frame area)`` until both
    settle (the judge's :func:`perception.fit_shape` does 3 steps; a triangle's or a cut shape's centroid follows its
    centre slowly). With ``r`` given, the radius stays fixed. Returns ``(cx, cy, r)``."""
    from .perception import template

    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    ox, oy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    x, y = start if start is not None else (ox, oy)
    fixed = r is not None
    radius = r if fixed else float(np.sqrt(area / np.pi))
    for it in range(FIT_ITERATIONS):
        c = template(shape, x, y, radius, 2 if it < FIT_ITERATIONS // 2 else 4)
        total = float(c.sum())
        if total <= 1e-6:
            break
        step_x, step_y = ox - float((c * xs).sum() / total), oy - float((c * ys).sum() / total)
        x, y = x + step_x, y + step_y
        scale = 1.0 if fixed else float(np.sqrt(np.clip(area / total, 0.25, 4.0)))
        radius *= scale
        if it >= FIT_ITERATIONS // 2 and abs(step_x) + abs(step_y) + abs(scale - 1.0) * radius < 0.01:
            break
    return x, y, radius


def _similarity_one(img: np.ndarray, subject: SandboxSubject, details: dict | None = None) -> float:
    c1 = np.array(OBJECT_COLORS[subject.color], dtype=np.float64)
    c2 = np.array(OBJECT_COLORS[subject.color2], dtype=np.float64)
    loc = _locate(img, (c1, c2))
    if loc is None:
        return 0.0
    shape = subject.class_word
    cx, cy, r = _fit(shape, loc.alpha, loc.area)
    # An outlined object's fill is 0.5 px smaller than its radius (the pattern's scale).
    fill_offset = 0.5 if loc.outlined else 0.0
    # A shape cut by the frame can leave its radius undetermined (a triangle whose base is out of frame shows its
    # apex only): then the radius snaps to the nearest named size within 20%, and the centre is fitted again.
    if coverage(shape, cx, cy, r).sum() < CUT_FRACTION * np.pi * r * r:
        nominal = min(SIZES.values(), key=lambda v: abs(np.log((r + fill_offset) / v)))
        if abs(np.log((r + fill_offset) / nominal)) < np.log(1.2):
            r = nominal - fill_offset
            cx, cy, r = _fit(shape, loc.alpha, loc.area, r=r, start=(cx, cy))
    outlined = loc.outlined
    a1, a2 = pattern_coverage(shape, subject.pattern, cx, cy, r, pattern_r=r + fill_offset)
    s1, s2 = a1.sum(), a2.sum()
    if s1 < 1.0 or s2 < 1.0:  # the fitted object is (nearly) out of frame or one colour region is empty
        return 0.0
    # the colour the subject would give each pixel (as the renderer draws it: outline, then the two-tone fill)
    around = loc.background
    if outlined:
        a_out = coverage(shape, cx, cy, r + OUTLINE_WIDTH)[..., None]
        around = loc.background * (1.0 - a_out) + loc.outline_rgb * a_out
    expected = (1.0 - a1 - a2)[..., None] * around + a1[..., None] * c1 + a2[..., None] * c2
    m = _match(img, expected)
    acc1 = float((a1 * m).sum() / s1)
    acc2 = float((a2 * m).sum() / s2)
    colours = 2.0 * acc1 * acc2 / max(acc1 + acc2, 1e-9)
    tmpl = a1 + a2
    a = np.clip(loc.alpha, 0.0, 1.0)
    iou = float(np.minimum(a, tmpl).sum() / max(float(np.maximum(a, tmpl).sum()), 1e-9))
    shape_q = float(np.clip((iou - SHAPE_IOU_FLOOR) / SHAPE_IOU_SPAN, 0.0, 1.0))
    if details is not None:
        details.update(center=(cx, cy), radius=r, outlined=outlined, acc=(acc1, acc2), iou=iou, shape=shape_q)
    return shape_q * colours


def subject_similarity(images: np.ndarray, subject: SandboxSubject | str) -> np.ndarray:
    """Is each image the subject? ``images`` ``(N, 32, 32, 3)`` uint8 (or one ``(32, 32, 3)``) -> ``(N,)`` in [0, 1].

    1. Locate the object (:func:`_locate`: pixels far from the background and outline colours, soft coverage).
    2. Fit the subject's class shape to it by moment matching (:func:`_fit`: centre and radius, to convergence; a
       shape cut by the frame takes the nearest named size), and lay the subject's pattern out on the fit
       (``pattern_r = r + 0.5`` when an outline surrounds it: the renderer's fill is 0.5 px smaller).
    3. Colour agreement per pattern region ``k``: ``acc_k = Σ a_k m / Σ a_k`` with ``a_k`` the region's coverage and
       ``m`` the match of each pixel to the colour the subject would have there (``1`` within 20 RGB of it, then
       ``exp(-(d - 20)^2 / (2 · 35^2))``); the harmonic mean of ``acc_1`` and ``acc_2`` (an object showing one of the
       colours only, or both in the wrong layout, scores low).
    4. Times the shape factor ``clip((IoU - 0.5) / 0.35)`` of the soft IoU between the object's coverage and the
       fitted template (a wrong shape or stray pixels lower it).

    Measured on the shipped subjects (``tests/test_sandbox_subjects.py`` checks looser bounds): references
    0.97-1.00 (0.91-1.00 after the JPEG round trip; with an outline >= 0.81, small >= 0.90), a solid object of
    either colour <= 0.15, the pattern with the colours swapped <= 0.19, another subject's references <= 0.56 (two
    red/yellow squares that share half their layout), an image without an object 0. The base pipeline's
    ``"a sks <class>"`` (16 seeds): mean 0.02-0.04 per subject; the sandbox VAE's reconstruction of the references
    (the best a tuned model can reach): mean 0.45-0.70."""
    if isinstance(subject, str):
        subject = get_subject(subject)
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"subject_similarity expects (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got {arr.shape}"
        )
    return np.array([_similarity_one(im.astype(np.float64), subject) for im in arr], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# The DreamBench directory


def _format_line(template: str) -> str:
    return f"'{template}'.format(unique_token, class_token),"


def prompts_and_classes_text(
    subjects: Sequence[SandboxSubject] = SUBJECTS, templates: Sequence[str] = EVAL_TEMPLATES
) -> str:
    """DreamBench's ``prompts_and_classes.txt``: the class table, then the object and the live-subject prompt lists
    (the sandbox has no live subjects: both lists hold the same templates)."""
    lines = ["Classes", "", "subject_name,class"]
    lines += [f"{s.name},{s.class_word}" for s in subjects]
    lines += ["", "", "Prompts", "", "Object Prompts", "", "prompt_list = ["]
    lines += [_format_line(t) for t in templates]
    lines += ["]", "", "Live Subject Prompts", "", "prompt_list = ["]
    lines += [_format_line(t) for t in templates]
    lines += ["]", ""]
    return "\n".join(lines)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of one uint8 image (PIL, ``quality``, 4:4:4 chroma so the two colours' edge keeps its colours;
    no metadata, so the bytes depend on the pixels only)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def readme_text(subjects: Sequence[SandboxSubject] = SUBJECTS, seed: int = 0) -> str:
    """The README of a written directory: what it is, its subjects, and the command that built it."""
    rows = "\n".join(
        f"| `{s.name}` | {s.class_word} | {s.pattern} | {s.color} / {s.color2} |" for s in subjects
    )
    n_ref, n_eval = NUM_REFERENCES, len(EVAL_TEMPLATES)
    n_train, n_val = len(TRAINING_TEMPLATES), len(VALIDATION_TEMPLATES)
    return f"""# Sandbox DreamBench: two-tone subjects for subject-driven tuning

{len(subjects)} subjects of the sandbox world in the layout of the original DreamBench (DreamBooth, Ruiz et al.
2023): `dataset/<subject>/00.jpg` to `{n_ref - 1:02d}.jpg` ({n_ref} reference images per subject, 32x32, JPEG
quality {JPEG_QUALITY}, 4:4:4 chroma) and `dataset/prompts_and_classes.txt` (the class table, then the "Object
Prompts" and "Live Subject Prompts" lists: the same {n_eval} templates, the sandbox has no live subjects). Also
`dataset/training_prompts.txt` ({n_train} context templates for RPO's training) and `dataset/validation_prompts.txt`
({n_val} templates for checkpoint selection), one `{{0}} {{1}}` template per line, different from each other and
from the evaluation prompts.

Each subject is a shape of the grammar (its class word) in two colours laid out in a pattern: the base model cannot
draw it from any prompt, since a caption names one colour only. The prompts never name a colour and parse with the
sandbox grammar once the unique token is removed, so the judge scores their prompt following.
`diffalign.sandbox.subjects.subject_similarity(images, subject)` measures whether an image shows the subject.

| subject | class | pattern | colours (first / second) |
|---|---|---|---|
{rows}

References: every position and every background once per subject (order drawn from seed {seed} and the subject's
name), size large, centre jitter up to {REFERENCE_JITTER} px, no outline or defects.

What the sandbox pipeline can reach (measured when the subjects were chosen): its VAE, trained on one-colour
objects only, turns a two-tone object into a soft gradient, so the VAE's reconstruction of the references is the
best a tuned model can do: `subject_similarity` 0.45-0.70 per subject (mean over the 5 references), against
0.02-0.04 for the base model's "a sks <class>" (16 seeds) and 0.97-1.00 for the references themselves. The
subjects are the colour pairs and patterns the VAE keeps best (mostly red/yellow; 3-px stripes are lost).

Load with
`diffalign.eval.dreambench.load_dreambench("diffalign/sandbox/assets/dreambench")`.

Built (deterministically: the same bytes every time) by

    python scripts/build_sandbox_subjects.py

(`--output_dir DIR` writes the same files elsewhere; code: `diffalign/sandbox/subjects.py`).
"""


def write_dreambench(
    root: str | Path,
    subjects: Sequence[SandboxSubject] = SUBJECTS,
    seed: int = 0,
) -> Path:
    """Write the DreamBench directory under ``root`` (see the module docstring); returns ``root/dataset``.

    Existing files of the same names are overwritten; nothing else is removed."""
    root = Path(root)
    ddir = root / "dataset"
    ddir.mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        sdir = ddir / subject.name
        sdir.mkdir(exist_ok=True)
        for i, image in enumerate(reference_images(subject, seed)):
            (sdir / f"{i:02d}.jpg").write_bytes(encode_jpeg(image))
    (ddir / "prompts_and_classes.txt").write_text(prompts_and_classes_text(subjects), encoding="utf-8")
    (ddir / "training_prompts.txt").write_text("\n".join(TRAINING_TEMPLATES) + "\n", encoding="utf-8")
    (ddir / "validation_prompts.txt").write_text("\n".join(VALIDATION_TEMPLATES) + "\n", encoding="utf-8")
    (root / "README.md").write_text(readme_text(subjects, seed), encoding="utf-8")
    return ddir


__all__ = [
    "EVAL_TEMPLATES",
    "SANDBOX_DREAMBENCH",
    "SUBJECTS",
    "SUBJECTS_BY_NAME",
    "TRAINING_TEMPLATES",
    "VALIDATION_TEMPLATES",
    "SandboxSubject",
    "encode_jpeg",
    "get_subject",
    "prompts_and_classes_text",
    "reference_images",
    "reference_scenes",
    "scene_prompt",
    "subject_similarity",
    "write_dreambench",
]
