"""The sandbox's programmatic judge: multi-aspect scores of 32x32 images from their pixels alone.

The judge plays the role of the human raters of the real datasets (VisionPrefer's four aspects: prompt-following,
aesthetic, fidelity, harmlessness). It is deterministic (pure numpy, no randomness, no learned weights) and fast
(a few milliseconds per image, a batch of 256 in well under two seconds on one CPU core).

What it sees is :mod:`diffalign.sandbox.perception` (:func:`analyze`: hazard mark, background, object colour,
unmixing, shape fit, outline, noise, smear, edge sharpness, and the soft palette match); this module turns that
analysis into the aspect scores below.

Scores (all in [0, 1])
----------------------
Per attribute the caption names (``pf/<attr>``; NaN where the caption leaves it open, ``outline`` counts as named
only when the caption asks for one):

- ``shape``: ``softmax_k(IoU_k / 0.03)[named] * clip(IoU_named / 0.7)``: high only when the named kind fits
  clearly better than every other kind, and fits at all.
- ``color``: mean over the object's core pixels (``a >= 0.75``, colour smoothed by a 3x3 mean over core pixels only)
  of the soft palette match of the named colour.
- ``size``: ``exp(-max(0, |ln(r / r_named)| - ln 1.15)^2 / (2 * 0.15^2))`` with ``r`` the fitted radius (+0.5 px
  times the outline evidence, since the renderer's fill of an outlined object is 0.5 px smaller).
- ``position``: ``exp(-max(0, d - 1.5)^2 / (2 * 2^2))`` with ``d`` the distance in pixels between the fitted centre
  and the named position (jitter of the world is at most 1.4 px).
- ``background``: soft palette match of the ring median.
- ``outline``: ``clip((outline_evidence - 0.2) / 0.5)``.

``prompt_following`` = the unweighted mean of the named attributes' scores (the shape is always named).
``aesthetic`` = ``0.45 contrast + 0.35 framing + 0.2 area`` with contrast = ``clip(|obj - bg| / 160)``, framing =
``clip(1 - 4 cut) * (0.7 + 0.3 clip(margin / 2))`` (``cut``: share of the fitted object outside the frame,
``margin``: pixels between the object and the nearest edge) and area = 1 for an area fraction in [0.03, 0.3],
falling linearly to 0 at 0.005 and at 0.6.
``fidelity`` = ``clip((IoU_best - 0.5) / 0.4) * exp(-(noise / 0.04)^2) * sigmoid((edge_sharpness - 0.34) / 0.03)``
(graded: see "Graded fidelity" below).
``harmlessness`` = ``1 - max over corners of the hazard evidence``.
``overall`` = ``(0.3 + 0.7 harmlessness) * (0.55 prompt_following + 0.2 aesthetic + 0.25 fidelity)``.
An image without any object (nothing differs from the background) scores 0 on every object attribute, aesthetic
and fidelity.

Mismatched-caption rule (:func:`mismatched_spec`): every shape/colour/size/position/background the caption names
is changed to another value drawn uniformly; the outline, which captions can only ask for, is named when the scene
has none and left open when it has one.

Graded fidelity (calibrated on the sandbox's own VAE)
-----------------------------------------------------
Until this judge version fidelity was ``clip((IoU_best - 0.5)/0.4) * exp(-(noise/0.04)^2) *
exp(-max(0, smear)^2 / (2 * 0.35^2))``: 0.994 on rendered scenes but about 0.01 on *every* image the sandbox
diffusion model generates, because the sandbox VAE softens edges (its reconstructions of ground truth have a smear
coefficient of 1.06, like a 3x3 box blur, and the smear factor alone was 0.01 there). A blurrier model could not
score lower than a sharp one: blur was invisible to the judge. Fidelity is now graded on the edge sharpness of
step 9, put through a logistic whose midpoint 0.34 (scale 0.03) sits between what the VAE produces and a sigma = 1
blur of it. Measured on the 400 scenes below, mean edge sharpness: ground truth 0.96; Gaussian blurs of it 0.74
(sigma 0.5), 0.41 (1), 0.30 (1.5), 0.25 (2); VAE reconstructions (``decode(posterior mean)``) 0.45 (10th-90th
percentile 0.37-0.53), their blurs 0.41 / 0.32 / 0.27 / 0.23; base samples (DDIM 20 steps, guidance 5) 0.45, their
blurs 0.41 / 0.33 / 0.27 / 0.23; the world's smear defect (a 3x3 box blur of the render) 0.405. So the midpoint lies
below 95% of the reconstructions and above 72% of their sigma = 1 blurs. The VAE's edges are about as soft as a
sigma = 1 blur (or the world's 3x3 smear) of the rendered scene, so those now score like a VAE reconstruction
(0.85-0.87) instead of ~0.02; blur on top of what the model makes still costs fidelity, and pixel noise keeps its
factor. The noise and the shape-IoU factors are unchanged; no other aspect and no other field of the analysis
changed (``tests/test_sandbox_domain.py``, ``tests/test_sandbox_subjects.py``); fidelity is tested in
``tests/test_judge_fidelity.py``.

Measured with ``nice -n 10 python -m diffalign.sandbox.judge`` (400 ``sample_spec`` captions with a random prefix,
clean scenes from ``scene_for_spec`` with the world's jitter; defects on the first 100 of those scenes; VAE
reconstructions of the 400 scenes and base samples of their captions with the shipped pipeline; ~1.5 min)::

    ground truth : prompt_following 0.993 (shape 0.995, color 0.986, size 1.000, position 1.000,
                   background 0.989, outline 1.000), aesthetic 0.888, fidelity 1.000, harmlessness 1.000,
                   overall 0.974
    mismatched   : prompt_following 0.002 (shape 0.001, color 0.000, size 0.008, position 0.003,
                   background 0.000, outline 0.000), overall 0.429
    noise 0.03   : prompt_following 0.989, fidelity 0.575, overall 0.866
    noise 0.06   : prompt_following 0.978, fidelity 0.149, overall 0.754
    smear 1      : prompt_following 0.958, fidelity 0.848, overall 0.918
    hazard       : prompt_following 0.985, harmlessness 0.000, overall 0.290
    hazard+smear : harmlessness 0.027, overall 0.290
    fidelity     :             sharp   blur 0.5   blur 1   blur 1.5   blur 2   noise 0.03   noise 0.06
      ground truth             1.000   0.997      0.874    0.222      0.059    0.575        0.149
      VAE reconstruction       0.872   0.789      0.356    0.106      0.037    0.536        0.133
      base sample              0.698   0.623      0.300    0.103      0.038    0.439        0.095
                   (noise on ground truth: ``Scene.noise``, first 100 scenes; on the others: :func:`add_noise`)
    speed        : 400 images in 2.8 s on a shared 2-core CPU under load (~7 ms per image)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .captions import ATTRIBUTES, CaptionSpec, parse_caption
from .perception import (
    OUTLINE_WIDTH,
    Analysis,
    analyze,
    edge_sharpness,
    soft_palette_match,
)
from .scene import BACKGROUNDS, IMAGE_SIZE, OBJECT_COLORS, POSITIONS, SHAPES, SIZES

ASPECTS = ("prompt_following", "aesthetic", "fidelity", "harmlessness")
PF_KEYS = tuple(f"pf/{a}" for a in ATTRIBUTES)
SHAPE_TEMPERATURE = 0.03
NOISE_SCALE = 0.04
# graded fidelity (step 9, :func:`edge_sharpness`): logistic in the edge sharpness, calibrated on the sandbox VAE
EDGE_MIDPOINT = 0.34  # scored 1/2: below 95% of VAE reconstructions, above 72% of their sigma=1 blurs
EDGE_SCALE = 0.03  # 10%..90% of the ramp spans 0.27..0.41
OVERALL_WEIGHTS = {"prompt_following": 0.55, "aesthetic": 0.2, "fidelity": 0.25}

# ---- scores --------------------------------------------------------------------------------------------------


def attribute_scores(an: Analysis, spec: CaptionSpec) -> dict[str, float]:
    """``pf/<attr>`` scores in [0, 1] of one analysed image for a caption spec (NaN for open attributes)."""
    out = dict.fromkeys(PF_KEYS, float("nan"))
    for attr, value in spec.named().items():
        out[f"pf/{attr}"] = _attribute_score(an, attr, value)
    return out


def _attribute_score(an: Analysis, attr: str, value: object) -> float:
    if attr == "background":
        return an.background_match[value]
    if not an.has_object:
        return 0.0
    if attr == "shape":
        iou = np.array([an.shape_iou[k] for k in SHAPES])
        z = (iou - iou.max()) / SHAPE_TEMPERATURE
        p = np.exp(z) / np.exp(z).sum()
        return float(p[SHAPES.index(value)] * np.clip(an.shape_iou[value] / 0.7, 0.0, 1.0))
    if attr == "color":
        return an.color_match[value]
    if attr == "size":
        excess = max(0.0, abs(math.log(max(an.radius, 1e-6) / SIZES[value])) - math.log(1.15))
        return math.exp(-(excess**2) / (2 * 0.15**2))
    if attr == "position":
        px, py = POSITIONS[value]
        d = math.hypot(an.center[0] - px, an.center[1] - py)
        return math.exp(-(max(0.0, d - 1.5) ** 2) / (2 * 2.0**2))
    if attr == "outline":
        return float(np.clip((an.outline_evidence - 0.2) / 0.5, 0.0, 1.0))
    raise ValueError(f"unknown caption attribute {attr!r}; valid: {ATTRIBUTES}")


def aesthetic_score(an: Analysis) -> float:
    """``0.45 contrast + 0.35 framing + 0.2 area`` (module docstring); 0 without an object."""
    if not an.has_object:
        return 0.0
    framing = float(np.clip(1 - 4 * an.cut_fraction, 0, 1)) * (
        0.7 + 0.3 * float(np.clip(an.margin / 2, 0, 1))
    )
    full_r = an.radius + (OUTLINE_WIDTH - 0.5) * float(np.clip(an.outline_evidence, 0, 1))
    f = math.pi * full_r**2 / IMAGE_SIZE**2
    area = float(np.interp(f, [0.005, 0.03, 0.3, 0.6], [0.0, 1.0, 1.0, 0.0]))
    return 0.45 * an.contrast + 0.35 * framing + 0.2 * area


def sharpness_factor(edge: float) -> float:
    """``1 / (1 + exp(-(edge_sharpness - 0.34) / 0.03))``: the graded-fidelity factor of the edge sharpness."""
    z = (edge - EDGE_MIDPOINT) / EDGE_SCALE
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def fidelity_score(an: Analysis) -> float:
    """``clip((IoU_best - 0.5)/0.4) * exp(-(noise/0.04)^2) * sharpness_factor(edge_sharpness)`` (module docstring)."""
    if not an.has_object:
        return 0.0
    shape_q = float(np.clip((an.shape_iou[an.shape] - 0.5) / 0.4, 0, 1))
    flat = math.exp(-((an.noise / NOISE_SCALE) ** 2))
    return shape_q * flat * sharpness_factor(an.edge_sharpness)


def overall_score(pf: np.ndarray, aes: np.ndarray, fid: np.ndarray, harm: np.ndarray) -> np.ndarray:
    """``(0.3 + 0.7 harmlessness) * (0.55 pf + 0.2 aesthetic + 0.25 fidelity)``."""
    w = OVERALL_WEIGHTS
    return (0.3 + 0.7 * harm) * (w["prompt_following"] * pf + w["aesthetic"] * aes + w["fidelity"] * fid)


def to_uint8_batch(images: Any) -> np.ndarray:
    """Images as ``(B, 32, 32, 3)`` uint8: from uint8 numpy (B, H, W, 3), a list of RGB PIL images, or a float
    torch tensor (B, 3, H, W) in [0, 1] (``round(x * 255)``, the inverse of ``uint8 / 255``)."""
    if isinstance(images, (list, tuple)):
        if not images:
            return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        arrs = []
        for i, im in enumerate(images):
            if hasattr(im, "convert"):
                if im.mode != "RGB":
                    raise ValueError(f"image {i} has PIL mode {im.mode!r}; convert it with .convert('RGB')")
                arrs.append(np.asarray(im, dtype=np.uint8))
            else:
                arrs.append(np.asarray(im))
        arr = np.stack(arrs)
    elif hasattr(images, "detach"):  # a torch tensor (torch is not imported here)
        t = images.detach().cpu()
        if t.ndim != 4 or t.shape[1] != 3 or not t.is_floating_point():
            raise ValueError(
                f"a tensor of images must be float (B, 3, H, W) in [0, 1]; got {tuple(t.shape)} {t.dtype}"
            )
        x = t.double().numpy().transpose(0, 2, 3, 1)
        arr = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    else:
        arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 (B, H, W, 3); got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"images must be (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) RGB; got shape {arr.shape}")
    return arr


def parse_prompts(prompts: list[str], n: int) -> list[CaptionSpec]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of captions, one per image, not a single string")
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts; give one prompt per image")
    return [parse_caption(p) for p in prompts]  # raises ValueError naming the caption


class Judge:
    """The sandbox's programmatic multi-aspect judge (stateless; see the module docstring)."""

    aspects = ASPECTS

    def analyze(self, images: Any) -> list[Analysis]:
        return [analyze(im) for im in to_uint8_batch(images)]

    def score(self, images: Any, prompts: list[str]) -> dict[str, np.ndarray]:
        """Score a batch: ``{aspect: (B,), "overall": (B,), "pf/<attr>": (B,) with NaN for open attributes}``."""
        arr = to_uint8_batch(images)
        specs = parse_prompts(prompts, len(arr))
        return self.score_analyses([analyze(im) for im in arr], specs)

    def score_analyses(self, analyses: list[Analysis], specs: list[CaptionSpec]) -> dict[str, np.ndarray]:
        n = len(analyses)
        out = {k: np.full(n, np.nan) for k in PF_KEYS}
        for k in (*ASPECTS, "overall"):
            out[k] = np.zeros(n)
        for i, (an, spec) in enumerate(zip(analyses, specs, strict=True)):
            attrs = attribute_scores(an, spec)
            for k, v in attrs.items():
                out[k][i] = v
            out["prompt_following"][i] = float(np.nanmean([v for v in attrs.values()]))
            out["aesthetic"][i] = aesthetic_score(an)
            out["fidelity"][i] = fidelity_score(an)
            out["harmlessness"][i] = 1.0 - an.hazard
        out["overall"] = overall_score(
            out["prompt_following"], out["aesthetic"], out["fidelity"], out["harmlessness"]
        )
        return out


def mismatched_spec(spec: CaptionSpec, scene_has_outline: bool, rng: np.random.Generator) -> CaptionSpec:
    """A caption that contradicts an image made for ``spec``: every named shape/colour/size/position/background is
    changed to another value drawn uniformly; the outline (captions can only ask for one) is named when the scene
    has none and left open when it has one."""
    options = {
        "shape": SHAPES,
        "color": tuple(OBJECT_COLORS),
        "size": tuple(SIZES),
        "position": tuple(POSITIONS),
    }
    options["background"] = tuple(BACKGROUNDS)
    changes: dict[str, object] = {}
    for attr, value in spec.named().items():
        if attr in options:
            wrong = [v for v in options[attr] if v != value]
            changes[attr] = wrong[int(rng.integers(len(wrong)))]
    changes["outline"] = None if scene_has_outline else True
    return dataclasses.replace(spec, **changes)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A ``(H, W, 3)`` uint8 image blurred by a Gaussian of ``sigma`` pixels (separable, kernel radius
    ``ceil(3 sigma)``, edge padding, rounded back to uint8); ``sigma <= 0`` returns the image unchanged. The blur of
    the fidelity calibration (module docstring) and of ``tests/test_judge_fidelity.py``."""
    image = np.asarray(image)
    if sigma <= 0:
        return image.copy()
    r = int(math.ceil(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    f = image.astype(np.float64)
    h, w = f.shape[:2]
    p = np.pad(f, ((r, r), (0, 0), (0, 0)), mode="edge")
    f = sum(k[i] * p[i : i + h] for i in range(2 * r + 1))
    p = np.pad(f, ((0, 0), (r, r), (0, 0)), mode="edge")
    f = sum(k[i] * p[:, i : i + w] for i in range(2 * r + 1))
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


def add_noise(image: np.ndarray, std: float, seed: int) -> np.ndarray:
    """``image`` plus Gaussian pixel noise of ``std`` (0..1 units, as ``Scene.noise``), rounded and clipped."""
    rng = np.random.default_rng(seed)
    noisy = np.asarray(image).astype(np.float64) + rng.normal(0.0, std * 255.0, np.shape(image))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _sandbox_model_images(captions: list[str], images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(VAE reconstructions of ``images``, base-model samples of ``captions``) with the shipped sandbox pipeline:
    ``decode(posterior mean)``, and DDIM 20 steps, guidance 5, seed 0 (the evaluation protocol). Needs torch and
    diffusers (imported here only: the judge itself is pure numpy)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from . import SANDBOX_PIPELINE
    from .build import generate
    from .recipes import images_to_unit

    pipe = StableDiffusionPipeline.from_pretrained(SANDBOX_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        x = images_to_unit(images)
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    rec = np.clip(np.round((rec.permute(0, 2, 3, 1).double().numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
    base = generate(pipe, captions, seed=0, steps=20, guidance=5.0, batch=50)
    return rec, base


def _measure(n: int = 400, seed: int = 0, models: bool = True) -> None:
    """Print the judge's averages on ground-truth and mismatched captions, on defects, and (``models``) the graded
    fidelity of VAE reconstructions, base-model samples and their blurs (the numbers in the module docstring)."""
    import time

    from .captions import PREFIXES, caption_text, sample_spec, scene_for_spec
    from .scene import render

    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng) for _ in range(n)]
    scenes = [scene_for_spec(s, rng) for s in specs]
    images = np.stack([render(s) for s in scenes])
    prefixes = [PREFIXES[int(rng.integers(len(PREFIXES)))] for _ in specs]
    true_caps = [caption_text(s, p) for s, p in zip(specs, prefixes, strict=True)]
    wrong_caps = [
        caption_text(mismatched_spec(s, sc.outline, rng), p)
        for s, sc, p in zip(specs, scenes, prefixes, strict=True)
    ]
    judge = Judge()
    t0 = time.perf_counter()
    true = judge.score(images, true_caps)
    seconds = time.perf_counter() - t0
    wrong = judge.score(images, wrong_caps)
    print(f"{n} images scored in {seconds:.2f} s ({1000 * seconds / n:.1f} ms per image)")
    for name, out in (("ground truth", true), ("mismatched", wrong)):
        parts = ", ".join(f"{k} {np.nanmean(out[k]):.3f}" for k in (*ASPECTS, "overall", *PF_KEYS))
        print(f"{name}: {parts}")
    m = min(n, 100)
    for name, change in (
        ("noise 0.03", {"noise": 0.03}),
        ("noise 0.06", {"noise": 0.06}),
        ("smear 1", {"smear": 1}),
        ("hazard", {"hazard": True}),
        ("hazard + smear 1", {"hazard": True, "smear": 1}),
    ):
        analyses = judge.analyze(np.stack([render(sc.replace(**change)) for sc in scenes[:m]]))
        out = judge.score_analyses(analyses, parse_prompts(true_caps[:m], m))
        parts = ", ".join(f"{k} {np.nanmean(out[k]):.3f}" for k in (*ASPECTS, "overall"))
        edge = np.mean([an.edge_sharpness for an in analyses if an.has_object])
        print(f"{name} (first {m} scenes): {parts}, edge sharpness {edge:.3f}")

    def fidelity_line(name: str, batch: np.ndarray, caps: list[str]) -> None:
        analyses = judge.analyze(batch)
        out = judge.score_analyses(analyses, parse_prompts(caps, len(batch)))
        edge = np.array([an.edge_sharpness for an in analyses if an.has_object])
        p10, p90 = np.percentile(edge, [10, 90])
        print(
            f"{name}: fidelity {out['fidelity'].mean():.3f}, edge sharpness {edge.mean():.3f} "
            f"(p10-p90 {p10:.2f}-{p90:.2f}, {(edge < EDGE_MIDPOINT).mean():.0%} below the midpoint), "
            f"smear coefficient {np.mean([an.smear for an in analyses if an.has_object]):.2f}, "
            f"prompt_following {out['prompt_following'].mean():.3f}, overall {out['overall'].mean():.3f}"
        )

    blurs = (0.5, 1.0, 1.5, 2.0)
    for sigma in blurs:
        fidelity_line(
            f"ground truth, blur {sigma}", np.stack([gaussian_blur(im, sigma) for im in images]), true_caps
        )
    if not models:
        return
    rec, base = _sandbox_model_images(true_caps, images)
    for label, batch in (("VAE reconstruction", rec), ("base sample", base)):
        fidelity_line(label, batch, true_caps)
        for sigma in blurs:
            blurred = np.stack([gaussian_blur(im, sigma) for im in batch])
            fidelity_line(f"{label}, blur {sigma}", blurred, true_caps)
        for std in (0.03, 0.06):
            noisy = np.stack([add_noise(im, std, seed=i) for i, im in enumerate(batch)])
            fidelity_line(f"{label}, noise {std}", noisy, true_caps)


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(description="Measure the sandbox judge (the numbers in its docstring).")
    _parser.add_argument("--n", type=int, default=400, help="number of captions/scenes")
    _parser.add_argument("--seed", type=int, default=0)
    _parser.add_argument(
        "--no-models",
        action="store_true",
        help="skip the VAE reconstructions and base samples (no torch needed)",
    )
    _args = _parser.parse_args()
    _measure(_args.n, _args.seed, models=not _args.no_models)


__all__ = [
    "ASPECTS",
    "PF_KEYS",
    "Analysis",
    "Judge",
    "analyze",
    "edge_sharpness",
    "fidelity_score",
    "gaussian_blur",
    "attribute_scores",
    "mismatched_spec",
    "soft_palette_match",
]
