"""What the sandbox judge sees in one 32x32 image: its pixel analysis (:func:`analyze`), without the scores.

The scores built on it are in :mod:`diffalign.sandbox.judge` (which re-exports :class:`Analysis` and
:func:`analyze`); the two modules were one until the analysis and the scoring were split by what they do.

What it sees (:func:`analyze`, one image; all colours in 0..255 RGB)
--------------------------------------------------------------------
1. **Hazard mark.** In each corner, the normalised cross-correlation (NCC) of the luminance of an 8x8 window with
   the luminance of :func:`scene.hazard_patch` (yellow/black diagonal stripes), at the 9 offsets of the window
   inside the corner's 10x10 square. Evidence per corner = ``clip((NCC - 0.35)/0.4) * clip(amp/120)`` where
   ``amp`` is the mean colour difference "yellow cells - black cells" projected on the mark's own yellow-black
   direction (so the pattern has to be yellow/black stripes, not any texture).
2. **Background.** The per-channel median of the 2-pixel border ring without the four 10x10 corner squares
   (where the hazard mark lives). The named background's match is a soft palette match (below).
3. **Object colour.** The median colour of the pixels whose 3x3-mean-smoothed colour is more than 80 away from the
   background and more than 60 away from the outline colour (:func:`scene.outline_color`).
   **Two-tone objects** (``Scene.pattern``, the DreamBench subjects of ``subjects.py``): the same candidates, from
   the far region after a morphological closing (where two colours meet, their mix can come near the background),
   more than 60 from every background-outline mix, the inner ones (their 4 neighbours are such pixels too); when
   these form two tight clusters (2-means; each >= 15% of them, medians >= 120 apart, median distance to their
   median <= 30) that meet (>= 15% of the smaller one's pixels within 2 px of the other: one patterned object, not
   two blobs side by side), the object colour is the larger cluster's median and a second colour ``obj2`` the
   smaller's;
   step 4 then unmixes ``p - bg = a1 (obj - bg) + a2 (obj2 - bg) + b (out - bg)`` with ``a = a1 + a2``. No
   one-colour object (also with noise or smear) passes these tests, so their analysis and scores are unchanged
   (tested: ``tests/test_sandbox_subjects.py``); the step costs about 7% of the analysis time (profiled).
4. **Unmixing.** Every pixel is written as ``p - bg = a (obj - bg) + b (out - bg)`` (least squares, one 2x2 system
   per image): ``a`` is the object's coverage, ``b`` the outline's. The foreground region is the largest
   4-connected component of ``a > 0.5`` on the 3x3-smoothed image (hazard corners excluded), grown by two
   4-neighbour steps (so that it holds the anti-aliased edge and corner pixels) with its holes filled.
   ``area = sum(a)`` over the region (unclipped, so additive noise does not bias it).
5. **Shape fit.** For each kind, the template (:func:`scene.coverage`) is fitted by moment matching: start at the
   centroid with ``r = sqrt(area/pi)``, then three times move the centre by (observed centroid - template's
   in-frame centroid) and rescale ``r`` by ``sqrt(area / template's in-frame area)``; this handles the triangle's
   off-centre centroid and objects cut by the frame. Soft IoU ``sum(min(a, c)) / sum(max(a, c))`` per kind.
6. **Outline.** Regression coefficient of ``b`` on the expected outline ring of the best-fit template
   (coverage at ``r + 1.5`` minus coverage at ``r``, as the renderer draws it): ~1 with an outline, ~0 without.
7. **Noise.** Robust (MAD) estimate of the pixel noise std from horizontal differences of background pixels
   (away from the object and the corners), in [0, 1] intensity units.
8. **Smear.** Regression coefficient ``lambda`` of ``a - c`` on ``box3(c) - c`` (``c``: best template): 0 for a
   sharp image, ~1 for a 3x3 box blur (``Scene.smear = 1``). Additive noise does not bias it.
   (It decides whether shapes are compared with blurred templates; fidelity no longer uses it, see step 9.)
9. **Edge sharpness** (:func:`edge_sharpness`). The gradient magnitude of the unclipped coverage ``a`` (forward
   differences, ``hypot`` of the horizontal and vertical one; pairs with a hazard-corner pixel count 0) over the
   foreground region, and the mean of its ``max(4, round(sqrt(area)))`` largest values: the steepest edge
   gradients relative to the object-background colour contrast (``a`` is the colour difference divided by that
   contrast). ~1 for a crisp edge, about ``0.4 / sigma`` after a Gaussian blur of ``sigma`` pixels.

Soft palette match
    ``p_k = exp(-d_k^2 / 2 sigma^2) / (sum_j exp(-d_j^2 / 2 sigma^2) + exp(-tau^2 / 2 sigma^2))`` with
    ``sigma = 25`` and an "none of these" distance ``tau = 75`` (RGB Euclidean distances ``d``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .scene import (
    BACKGROUNDS,
    CORNERS,
    HAZARD_SIZE,
    IMAGE_SIZE,
    OBJECT_COLORS,
    SHAPES,
    SIZES,
    hazard_patch,
    outline_color,
    shape_mask,
)

# ---- constants of the analysis (see the module docstring) ----------------------------------------------------
CORNER_BOX = 10  # side of the corner squares excluded from the background ring (the hazard mark lives there)
RING_WIDTH = 2  # width of the border ring that defines the background
FAR_FROM_BG = 80.0  # RGB distance (smoothed image) for a pixel to count as object when estimating its colour
FAR_FROM_OUTLINE = 60.0
PURE_FRACTION = 0.7
PALETTE_SIGMA = 25.0
PALETTE_TAU = 75.0
FIT_ITERATIONS = 3
FIT_SUPERSAMPLE = 2  # during the moment-matching iterations; the final templates use the renderer's 4x
FINAL_SUPERSAMPLE = 4
OUTLINE_WIDTH = 1.5  # the renderer: outline at r + 1, fill at r - 0.5
HAZARD_NCC0, HAZARD_NCC_SPAN, HAZARD_AMP = 0.35, 0.4, 120.0
EDGE_MIN_TOP = 4  # the sharpness is the mean of the max(4, round(sqrt(area))) steepest pixels
SMEAR_MATCH_MIN = 0.3  # above this smear coefficient, shapes are compared with equally blurred templates
# two-tone objects (step 3b, :func:`two_tone_colors`)
TWO_TONE_MIN_PIXELS = 4
TWO_TONE_MIN_SHARE = 0.15
TWO_TONE_MIN_SEPARATION = 120.0
TWO_TONE_MAX_SPREAD = 30.0
TWO_TONE_ITERATIONS = 5
TWO_TONE_MIN_CONTACT = 0.15

_OBJ_NAMES = tuple(OBJECT_COLORS)
_OBJ_RGB = np.array([OBJECT_COLORS[k] for k in _OBJ_NAMES], dtype=np.float64)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[k] for k in _BG_NAMES], dtype=np.float64)
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass
class Analysis:
    """What the judge sees in one image (colours are 0..255 RGB floats, coordinates are pixels, x right, y down)."""

    background: str  # nearest palette background
    background_rgb: tuple[float, float, float]  # median of the border ring
    background_match: dict[str, float]  # soft palette match per background name
    has_object: bool
    foreground: np.ndarray  # (H, W) bool: the object's region (largest component, grown 2 px, holes filled)
    coverage: np.ndarray  # (H, W) float: the object's unmixed coverage ``a`` (unclipped)
    color: str | None  # nearest palette colour of the object's median colour
    color_rgb: tuple[float, float, float] | None
    color_match: dict[str, float]  # mean soft palette match per colour name over the object's core pixels
    centroid: tuple[float, float]  # coverage-weighted centroid (x, y)
    area: float  # sum of the coverage in pixels
    shape: str | None  # best-fitting kind
    shape_iou: dict[str, float]  # soft IoU of each kind's fitted template
    shape_fit: dict[str, tuple[float, float, float]]  # fitted (cx, cy, r) per kind
    center: tuple[float, float]  # fitted centre of the best kind
    radius: float  # estimated object radius (fill radius + 0.5 * outline evidence)
    size: str | None  # nearest named size
    outline_evidence: float  # ~1 with an outline ring, ~0 without
    hazard_evidence: dict[str, float]  # per corner, in [0, 1]
    noise: float  # estimated pixel-noise std in [0, 1] intensity units
    smear: float  # blur coefficient: 0 sharp, ~1 for a 3x3 box blur
    contrast: float  # |object - background| / 160, clipped to [0, 1]
    cut_fraction: float  # share of the fitted object outside the frame
    margin: float  # pixels between the object and the nearest image edge (negative when cut)
    edge_sharpness: float = 0.0  # steepest coverage gradients (step 9): ~1 crisp, ~0.4/sigma blurred
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def hazard(self) -> float:
        return max(self.hazard_evidence.values())


# ---- small helpers -------------------------------------------------------------------------------------------


def soft_palette_match(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Soft match of colours ``rgb`` (..., 3) to a palette (K, 3): (..., K), rows sum to < 1 (an "other" class at
    distance ``PALETTE_TAU``); see the module docstring."""
    d2 = ((rgb[..., None, :] - palette) ** 2).sum(-1)
    logits = -d2 / (2 * PALETTE_SIGMA**2)
    other = -(PALETTE_TAU**2) / (2 * PALETTE_SIGMA**2)
    m = np.maximum(logits.max(-1, keepdims=True), other)
    w = np.exp(logits - m)
    return w / (w.sum(-1, keepdims=True) + np.exp(other - m))


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean with edge padding over the first two axes of ``x`` (H, W, ...)."""
    p = np.pad(x, ((1, 1), (1, 1)) + ((0, 0),) * (x.ndim - 2), mode="edge")
    h, w = x.shape[:2]
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _neighbour_max(x: np.ndarray) -> np.ndarray:
    """Max over the 4-neighbourhood and the pixel itself, (H, W)."""
    out = x.copy()
    np.maximum(out[1:], x[:-1], out=out[1:])
    np.maximum(out[:-1], x[1:], out=out[:-1])
    np.maximum(out[:, 1:], x[:, :-1], out=out[:, 1:])
    np.maximum(out[:, :-1], x[:, 1:], out=out[:, :-1])
    return out


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _neighbour_max(mask.astype(np.uint8)).astype(bool)
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean (H, W) mask (label propagation; ties: the lowest label)."""
    if not mask.any():
        return mask.copy()
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        new = np.where(mask, _neighbour_max(labels), 0)
        if np.array_equal(new, labels):
            break
        labels = new
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus every pixel not 4-connected to the image border through non-mask pixels, (H, W) bool."""
    free = ~mask
    outside = np.zeros_like(mask)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = free[0], free[-1], free[:, 0], free[:, -1]
    while True:
        grown = _neighbour_max(outside.astype(np.uint8)).astype(bool) & free
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


_POOLS: dict[int, np.ndarray] = {}


def _pool(supersample: int) -> np.ndarray:
    """(H, H * supersample) matrix whose products average ``supersample`` consecutive samples."""
    if supersample not in _POOLS:
        _POOLS[supersample] = np.kron(np.eye(IMAGE_SIZE), np.full((1, supersample), 1.0 / supersample))
    return _POOLS[supersample]


def _grid(supersample: int) -> tuple[np.ndarray, np.ndarray]:
    if supersample not in _GRIDS:
        c = (np.arange(IMAGE_SIZE * supersample, dtype=np.float64) + 0.5) / supersample
        _GRIDS[supersample] = (c[None, :], c[:, None])
    return _GRIDS[supersample]


def template(shape: str, cx: float, cy: float, r: float, supersample: int = FINAL_SUPERSAMPLE) -> np.ndarray:
    """In-frame coverage (H, W) of a shape; with ``supersample=4`` identical to :func:`scene.coverage`."""
    xs, ys = _grid(supersample)
    pool = _pool(supersample)
    m = shape_mask(shape, cx, cy, max(r, 0.0), xs, ys).astype(np.float64)
    return pool @ m @ pool.T  # block means by matrix products (exact: sums of at most 16 ones, times 1/4)


_PIX = (np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5)[None, :]  # pixel-centre x coordinates (1, W)


def _centroid(weights: np.ndarray) -> tuple[float, float, float]:
    """(sum, x-centroid, y-centroid) of an (H, W) weight map, pixel centres at i + 0.5."""
    s = float(weights.sum())
    if s <= 1e-9:
        return 0.0, IMAGE_SIZE / 2, IMAGE_SIZE / 2
    return s, float((weights * _PIX).sum() / s), float((weights * _PIX.T).sum() / s)


def fit_shape(shape: str, a: np.ndarray, area: float, cx: float, cy: float) -> tuple[float, float, float]:
    """Moment-matching fit of one kind's template to the coverage map ``a`` (H, W) -> (cx, cy, r)."""
    r = math.sqrt(max(area, 1e-6) / math.pi)
    x, y = cx, cy
    for it in range(FIT_ITERATIONS + 1):
        ss = FIT_SUPERSAMPLE if it < FIT_ITERATIONS else FINAL_SUPERSAMPLE
        c = template(shape, x, y, r, ss)
        s, tx, ty = _centroid(c)
        if s <= 1e-6:
            break
        x, y = x + (cx - tx), y + (cy - ty)
        r = r * math.sqrt(min(max(area / s, 0.25), 4.0))
    return x, y, r


# ---- hazard --------------------------------------------------------------------------------------------------

_HZ = hazard_patch().astype(np.float64)
_HZ_LUM = _HZ @ _LUMA
_HZ_YELLOW = ((i + j) // 2 % 2 == 0 for i in range(HAZARD_SIZE) for j in range(HAZARD_SIZE))
_HZ_YMASK = np.array(list(_HZ_YELLOW)).reshape(HAZARD_SIZE, HAZARD_SIZE)
_HZ_T = (_HZ_LUM - _HZ_LUM.mean()) / np.linalg.norm(_HZ_LUM - _HZ_LUM.mean())
_HZ_DIR = _HZ[_HZ_YMASK].mean(0) - _HZ[~_HZ_YMASK].mean(0)
_HZ_DIR = _HZ_DIR / np.linalg.norm(_HZ_DIR)


_HZ_INNER = _HZ[1:-1, 1:-1].reshape(-1, 3).mean(0)  # mean colour of the mark's inner 6x6 (also after a blur)
BLOB_SIZE = HAZARD_SIZE - 2
BLOB_SIGMA, BLOB_STD0, BLOB_STD_SPAN = 30.0, 45.0, 20.0


def hazard_evidence(img: np.ndarray) -> dict[str, float]:
    """Evidence in [0, 1] of the hazard mark in each corner of an (H, W, 3) float image: the max of the crisp
    stripes evidence and the blurred-mark ("blob") evidence (see the module docstring)."""
    out = {}
    for corner in CORNERS:
        r0 = 0 if corner.startswith("top") else IMAGE_SIZE - CORNER_BOX
        c0 = 0 if corner.endswith("left") else IMAGE_SIZE - CORNER_BOX
        box = img[r0 : r0 + CORNER_BOX, c0 : c0 + CORNER_BOX]
        win = np.lib.stride_tricks.sliding_window_view(box, (HAZARD_SIZE, HAZARD_SIZE), axis=(0, 1))
        win = np.moveaxis(win, 2, -1)  # (3, 3, 8, 8, 3): offsets, window, channels
        lum = win @ _LUMA
        lum = lum - lum.mean(axis=(2, 3), keepdims=True)
        norm = np.sqrt((lum**2).sum(axis=(2, 3)))
        ncc = (lum * _HZ_T).sum(axis=(2, 3)) / np.maximum(norm, 1e-6)
        amp = (win[:, :, _HZ_YMASK].mean(2) - win[:, :, ~_HZ_YMASK].mean(2)) @ _HZ_DIR
        stripes = np.clip((ncc - HAZARD_NCC0) / HAZARD_NCC_SPAN, 0, 1) * np.clip(amp / HAZARD_AMP, 0, 1)
        # A blurred mark (Scene.smear) loses its stripes (a 3x3 box nearly cancels a period-4 diagonal pattern)
        # but keeps its mean colour, a dark olive no palette colour is close to, nearly uniform.
        swin = np.moveaxis(
            np.lib.stride_tricks.sliding_window_view(box, (BLOB_SIZE, BLOB_SIZE), axis=(0, 1)), 2, -1
        )
        mean = swin.mean(axis=(2, 3))  # (5, 5, 3)
        # spread of the 2x2-binned window (binning halves the std of pixel noise, keeps gradients)
        binned = swin.reshape(*swin.shape[:2], BLOB_SIZE // 2, 2, BLOB_SIZE // 2, 2, 3).mean(axis=(3, 5))
        std = np.sqrt(((binned - mean[:, :, None, None]) ** 2).sum(-1).mean(axis=(2, 3)) / 3.0)
        d2 = ((mean - _HZ_INNER) ** 2).sum(-1)
        blob = np.exp(-d2 / (2 * BLOB_SIGMA**2)) * np.clip((BLOB_STD0 - std) / BLOB_STD_SPAN, 0, 1)
        out[corner] = float(max(stripes.max(), blob.max()))
    return out


def _corner_mask(corners: list[str]) -> np.ndarray:
    m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for corner in corners:
        r0 = 0 if corner.startswith("top") else IMAGE_SIZE - CORNER_BOX
        c0 = 0 if corner.endswith("left") else IMAGE_SIZE - CORNER_BOX
        m[r0 : r0 + CORNER_BOX, c0 : c0 + CORNER_BOX] = True
    return m


_RING = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
_RING[:RING_WIDTH] = _RING[-RING_WIDTH:] = True
_RING[:, :RING_WIDTH] = _RING[:, -RING_WIDTH:] = True
_RING &= ~_corner_mask(list(CORNERS))


# ---- analysis ------------------------------------------------------------------------------------------------


def analyze(image: np.ndarray, two_tone: bool = True) -> Analysis:
    """Analyse one ``(32, 32, 3)`` uint8 RGB image (see the module docstring for each step). ``two_tone=False``
    skips step 3b (the analysis as it was before two-tone objects; the same for every one-colour object)."""
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"analyze expects a ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) RGB image, got shape {image.shape}"
        )
    img = image.astype(np.float64)
    hz = hazard_evidence(img)
    hazard_corners = [c for c, e in hz.items() if e > 0.3]
    excluded = _corner_mask(hazard_corners)

    # 2. background
    bg = np.median(img[_RING], axis=0)
    bg_match_arr = soft_palette_match(bg, _BG_RGB)
    bg_name = _BG_NAMES[int(np.argmin(((_BG_RGB - bg) ** 2).sum(-1)))]
    out_rgb = np.array(outline_color(bg_name), dtype=np.float64)

    # 3. object colour
    smooth = _box3(img)
    d_bg = np.linalg.norm(smooth - bg, axis=-1)
    empty = _empty_analysis(bg_name, bg, bg_match_arr, hz, img, excluded)
    far = fill_holes(largest_component((d_bg > FAR_FROM_BG) & ~excluded))
    raw_d_bg = np.linalg.norm(img - bg, axis=-1)
    raw_d_out = np.linalg.norm(img - out_rgb, axis=-1)
    cand = _dilate(far, 1) & (raw_d_bg > FAR_FROM_OUTLINE) & (raw_d_out > FAR_FROM_OUTLINE) & ~excluded
    if cand.sum() < 2:
        return empty
    # The purest object pixels are the farthest from the background-outline segment (mixed edge pixels lie on
    # the segments object-background and object-outline, nearer to it): the object colour is the median of the
    # candidates at least 0.7 times as far as the 90th percentile.
    seg_d = _distance_to_segment(img[cand], bg, out_rgb)
    pure = img[cand][seg_d >= PURE_FRACTION * np.percentile(seg_d, 90)]
    obj = np.median(pure, axis=0)
    # 3b. a two-tone object (Scene.pattern, the DreamBench subjects): its colours are the larger and the smaller of
    # two tight, distant clusters of its inner pixels. Never found for one-colour objects: their analysis is unchanged.
    tones = _two_tone_object(img, d_bg, far, raw_d_bg, raw_d_out, bg, out_rgb, excluded) if two_tone else None
    obj2 = None
    if tones is not None:
        obj, obj2 = tones

    # 4. unmixing p - bg = a (obj - bg) + b (out - bg)
    if obj2 is None:
        basis = np.stack([obj - bg, out_rgb - bg], axis=1)  # (3, 2)
        gram = basis.T @ basis + 1e-6 * np.eye(2)
        if np.linalg.cond(gram) > 1e6:  # object colour parallel to the outline direction: no outline channel
            basis = basis[:, :1]
            gram = basis.T @ basis + 1e-6
        proj = np.linalg.solve(np.atleast_2d(gram), basis.T)  # (k, 3)
        coef = (img - bg) @ proj.T  # (H, W, k)
        coef_s = (smooth - bg) @ proj.T
        a = coef[..., 0]
        b = coef[..., 1] if coef.shape[-1] > 1 else np.zeros_like(a)
        a_s = coef_s[..., 0]
    else:  # p - bg = a1 (obj - bg) + a2 (obj2 - bg) + b (out - bg), coverage a = a1 + a2
        basis = np.stack([obj - bg, obj2 - bg, out_rgb - bg], axis=1)  # (3, 3)
        gram = basis.T @ basis + 1e-6 * np.eye(3)
        if np.linalg.cond(gram) > 1e6:  # the three directions in one plane: no outline channel
            basis = basis[:, :2]
            gram = basis.T @ basis + 1e-6 * np.eye(2)
        proj = np.linalg.solve(gram, basis.T)  # (k, 3)
        coef = (img - bg) @ proj.T
        coef_s = (smooth - bg) @ proj.T
        a = coef[..., 0] + coef[..., 1]
        b = coef[..., 2] if coef.shape[-1] > 2 else np.zeros_like(a)
        a_s = coef_s[..., 0] + coef_s[..., 1]
    core_mask = largest_component((a_s > 0.5) & ~excluded)
    if core_mask.sum() < 2:
        return empty
    region = fill_holes(_dilate(core_mask, 2)) & ~excluded
    a_reg = np.where(region, a, 0.0)
    area, cx, cy = _centroid(a_reg)
    if area < 1.0:
        return empty

    # 5. shape fit
    a_clip = np.clip(a_reg, 0.0, 1.0)
    fits, temps = {}, {}
    for kind in SHAPES:
        fits[kind] = fit_shape(kind, a_reg, area, cx, cy)
        temps[kind] = template(kind, *fits[kind])
    sharp_iou = {k: _soft_iou(a_clip, temps[k]) for k in SHAPES}
    best = max(SHAPES, key=lambda k: sharp_iou[k])
    keep = ~excluded
    smear = _smear_coefficient(a, temps[best], keep)
    # A smeared image is compared with equally smeared templates, so that blur does not pass for a wrong shape
    # (fidelity still pays for the blur through ``smear``).
    if smear > SMEAR_MATCH_MIN:
        lam = min(smear, 2.0)
        ious = {k: _soft_iou(a_clip, np.clip(c + lam * (_box3(c) - c), 0, 1)) for k, c in temps.items()}
        best = max(SHAPES, key=lambda k: ious[k])
        smear = _smear_coefficient(a, temps[best], keep)
    else:
        ious = sharp_iou
    bx, by, br = fits[best]
    c_best = temps[best]
    sharpness = edge_sharpness(a, region, keep, area)

    # 6. outline
    ring = template(best, bx, by, br + OUTLINE_WIDTH) - c_best
    outline_ev = float((b * ring)[keep].sum() / max((ring**2)[keep].sum(), 1e-9))

    # 7. noise: horizontal differences of background pixels far from the object and the corners
    far = ~_dilate(region | (ring > 0), 2) & ~_corner_mask(list(CORNERS))
    noise = _noise_level(img, far)

    # colour of the core pixels (smoothed over core pixels only)
    core = region & (a >= 0.75)
    if core.sum() >= 1:
        cm = core.astype(np.float64)
        csum = _box3(img * cm[..., None])
        ccount = _box3(cm)[..., None]
        core_rgb = (csum / np.maximum(ccount, 1e-9))[core]
        color_match_arr = soft_palette_match(core_rgb, _OBJ_RGB).mean(0)
    else:
        color_match_arr = soft_palette_match(obj, _OBJ_RGB)
    color_name = _OBJ_NAMES[int(np.argmin(((_OBJ_RGB - obj) ** 2).sum(-1)))]

    radius = br + 0.5 * float(np.clip(outline_ev, 0.0, 1.0))
    size_name = min(SIZES, key=lambda k: abs(math.log(max(radius, 1e-6) / SIZES[k])))
    full_r = br + OUTLINE_WIDTH * float(np.clip(outline_ev, 0.0, 1.0))
    c_full = template(best, bx, by, full_r)
    cut = float(max(0.0, 1.0 - c_full.sum() / (math.pi * full_r**2)))
    extent = c_full > 0.05
    rows_any, cols_any = np.flatnonzero(extent.any(1)), np.flatnonzero(extent.any(0))
    margin = float(
        min(rows_any[0], cols_any[0], IMAGE_SIZE - 1 - rows_any[-1], IMAGE_SIZE - 1 - cols_any[-1])
        if cut < 1e-3
        else -1.0
    )
    return Analysis(
        background=bg_name,
        background_rgb=tuple(float(v) for v in bg),
        background_match=dict(zip(_BG_NAMES, map(float, bg_match_arr), strict=True)),
        has_object=True,
        foreground=region,
        coverage=a_reg,
        color=color_name,
        color_rgb=tuple(float(v) for v in obj),
        color_match=dict(zip(_OBJ_NAMES, map(float, color_match_arr), strict=True)),
        centroid=(cx, cy),
        area=area,
        shape=best,
        shape_iou=ious,
        shape_fit=fits,
        center=(bx, by),
        radius=radius,
        size=size_name,
        outline_evidence=outline_ev,
        hazard_evidence=hz,
        noise=noise,
        smear=smear,
        contrast=float(np.clip(np.linalg.norm(obj - bg) / 160.0, 0.0, 1.0)),
        cut_fraction=cut,
        margin=margin,
        edge_sharpness=sharpness,
        extras={} if obj2 is None else {"color2_rgb": tuple(float(v) for v in obj2)},
    )


def _two_tone_object(
    img: np.ndarray,
    d_bg: np.ndarray,
    far: np.ndarray,
    raw_d_bg: np.ndarray,
    raw_d_out: np.ndarray,
    bg: np.ndarray,
    out_rgb: np.ndarray,
    excluded: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Step 3b: the object's two colours, or ``None``. The object region of step 3 after a morphological closing
    (where a pattern's two colours meet, their mix can come near the background and cut the region apart), its
    candidates far from every background-outline mix, of those the inner ones (4 neighbours in the set too: no
    edge pixel, so no mix with the background or the outline), :func:`two_tone_colors` of their colours, and the
    two colours must meet (``TWO_TONE_MIN_CONTACT``). Measured: found on none of 512 base-model images of world
    captions (3 without the contact test: two blobs side by side), on every reference image of ``subjects.py``."""
    m = (d_bg > FAR_FROM_BG) & ~excluded
    closed = (m | ~_dilate(~_dilate(m, 1), 1)) & ~excluded
    if not np.array_equal(closed, m):  # (unchanged by the closing: step 3's region)
        far = fill_holes(largest_component(closed))
    cand = _dilate(far, 1) & (raw_d_bg > FAR_FROM_OUTLINE) & (raw_d_out > FAR_FROM_OUTLINE) & ~excluded
    seg = _distance_to_segment(img.reshape(-1, 3), bg, out_rgb).reshape(img.shape[:2])
    members = cand & (seg > FAR_FROM_OUTLINE)
    inner = members & ~_dilate(~members, 1)
    tones = two_tone_colors(img[inner])
    if tones is None:
        return None
    # The two colours must meet inside one object (a pattern), not be two blobs side by side: most pixels of the
    # smaller colour lie within 2 px of the larger one.
    near_major = ((img[..., None, :] - np.stack(tones)) ** 2).sum(-1).argmin(-1) == 0
    minor = inner & ~near_major
    contact = float((minor & _dilate(inner & near_major, 2)).sum() / max(int(minor.sum()), 1))
    if contact < TWO_TONE_MIN_CONTACT:
        return None
    return tones


def two_tone_colors(pure: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The two colours of a two-tone object from its inner pixels ``(n, 3)``: 2-means (medians; started at the pixel
    farthest from the mean and the pixel farthest from that one). ``(larger cluster's median, smaller's)`` when both
    clusters hold at least ``TWO_TONE_MIN_SHARE`` of the pixels (and ``TWO_TONE_MIN_PIXELS``), their medians are at
    least ``TWO_TONE_MIN_SEPARATION`` apart and their pixels within ``TWO_TONE_MAX_SPREAD`` (median distance to
    their cluster's median); ``None`` otherwise (a one-colour object, also with noise or smear)."""
    if len(pure) < 2 * TWO_TONE_MIN_PIXELS:
        return None
    first = pure[int(np.argmax(((pure - pure.mean(0)) ** 2).sum(1)))]
    second = pure[int(np.argmax(((pure - first) ** 2).sum(1)))]
    centres = np.stack([first, second])
    for _ in range(TWO_TONE_ITERATIONS):
        label = np.argmin(((pure[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        if label.min() == label.max():
            return None
        centres = np.stack([np.median(pure[label == k], axis=0) for k in (0, 1)])
    label = np.argmin(((pure[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(label, minlength=2)
    if counts.min() < max(TWO_TONE_MIN_PIXELS, TWO_TONE_MIN_SHARE * len(pure)):
        return None
    if np.linalg.norm(centres[0] - centres[1]) < TWO_TONE_MIN_SEPARATION:
        return None
    spread = max(float(np.median(np.linalg.norm(pure[label == k] - centres[k], axis=1))) for k in (0, 1))
    if spread > TWO_TONE_MAX_SPREAD:
        return None
    major = int(np.argmax(counts))
    return centres[major], centres[1 - major]


def _soft_iou(a: np.ndarray, c: np.ndarray) -> float:
    """``sum(min(a, c)) / sum(max(a, c))`` of two (H, W) maps in [0, 1]."""
    return float(np.minimum(a, c).sum() / max(float(np.maximum(a, c).sum()), 1e-9))


def _smear_coefficient(a: np.ndarray, c: np.ndarray, keep: np.ndarray) -> float:
    """Regression coefficient of ``a - c`` on ``box3(c) - c`` over ``keep`` pixels (0 sharp, ~1 for a 3x3 blur)."""
    dd = _box3(c) - c
    w = keep & (np.abs(dd) > 1e-9)
    return float(((a - c) * dd)[w].sum() / max(float((dd**2)[w].sum()), 1e-9))


def edge_sharpness(a: np.ndarray, region: np.ndarray, keep: np.ndarray, area: float) -> float:
    """Step 9: how steep the object's edges are, in coverage per pixel (1 for a crisp edge, ~0.4/sigma after a
    Gaussian blur of sigma pixels). The gradient magnitude ``hypot(|a[y, x+1] - a[y, x]|, |a[y+1, x] - a[y, x]|)``
    of the unclipped coverage ``a`` (differences with a pixel outside ``keep`` count 0), over the ``region`` pixels;
    the mean of its ``max(4, round(sqrt(area)))`` largest values. The coverage is the colour difference divided by
    the object-background contrast, so this is the edge gradient relative to the colour contrast."""
    gx = np.zeros_like(a)
    gy = np.zeros_like(a)
    gx[:, :-1] = np.where(keep[:, 1:] & keep[:, :-1], np.abs(a[:, 1:] - a[:, :-1]), 0.0)
    gy[:-1] = np.where(keep[1:] & keep[:-1], np.abs(a[1:] - a[:-1]), 0.0)
    g = np.sort(np.hypot(gx, gy)[region])
    if g.size == 0:
        return 0.0
    k = min(g.size, max(EDGE_MIN_TOP, int(round(math.sqrt(max(area, 0.0))))))
    return float(g[-k:].mean())


def _distance_to_segment(p: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Euclidean distance of points ``p`` (n, 3) to the segment from ``u`` to ``v`` (3,)."""
    d = v - u
    t = np.clip((p - u) @ d / max(float(d @ d), 1e-9), 0.0, 1.0)
    return np.linalg.norm(p - (u + t[:, None] * d), axis=-1)


def _noise_level(img: np.ndarray, mask: np.ndarray) -> float:
    """MAD estimate of the noise std (0..1 units) from horizontal differences where both pixels are in ``mask``."""
    both = mask[:, 1:] & mask[:, :-1]
    if both.sum() < 8:
        return 0.0
    d = (img[:, 1:] - img[:, :-1])[both]  # (n, 3)
    return float(np.median(np.abs(d), axis=0).mean() / (0.6745 * math.sqrt(2.0)) / 255.0)


def _empty_analysis(bg_name, bg, bg_match_arr, hz, img, excluded) -> Analysis:
    """The analysis of an image in which nothing stands out from the background."""
    zeros = np.zeros(img.shape[:2])
    return Analysis(
        background=bg_name,
        background_rgb=tuple(float(v) for v in bg),
        background_match=dict(zip(_BG_NAMES, map(float, bg_match_arr), strict=True)),
        has_object=False,
        foreground=zeros.astype(bool),
        coverage=zeros,
        color=None,
        color_rgb=None,
        color_match=dict.fromkeys(_OBJ_NAMES, 0.0),
        centroid=(IMAGE_SIZE / 2, IMAGE_SIZE / 2),
        area=0.0,
        shape=None,
        shape_iou=dict.fromkeys(SHAPES, 0.0),
        shape_fit={},
        center=(IMAGE_SIZE / 2, IMAGE_SIZE / 2),
        radius=0.0,
        size=None,
        outline_evidence=0.0,
        hazard_evidence=hz,
        noise=_noise_level(img, ~excluded & ~_corner_mask(list(CORNERS))),
        smear=0.0,
        contrast=0.0,
        cut_fraction=1.0,
        margin=-1.0,
    )
