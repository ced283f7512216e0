"""Base-vs-aligned comparison in the Pick-a-Pic protocol: same prompts, same seeds, per-prompt reward comparison.

For LoRA models the base is the *same* pipeline with the adapters disabled, so both sides share every other weight
and every random draw: the only difference between a base image and its aligned twin is the adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .stats import mean_ci, paired_win_rate


@dataclass
class PairedSamples:
    """Images ``[N, H, W, 3]`` uint8 for base and aligned, with the prompt and seed of each row."""

    prompts: list[str]
    seeds: list[int]
    base: np.ndarray
    aligned: np.ndarray


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    guidance: float = 5.0,
    batch_size: int = 64,
    negative_prompt: str | None = None,
    desc: str = "sampling",
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """Sample one image per (prompt, seed) row; each row's initial noise comes from its own seeded generator, so
    the image of a row does not depend on the batch it was drawn in. Returns ``[N, H, W, 3]`` uint8."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts ({len(prompts)}) and seeds ({len(seeds)}) must have the same length")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        p = list(prompts[i : i + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        kwargs = {}
        if height is not None:
            kwargs.update(height=height, width=width)
        images = pipe(
            p,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            negative_prompt=[negative_prompt] * len(p) if negative_prompt else None,
            output_type="np",
            **kwargs,
        ).images
        out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out, axis=0)


@contextlib.contextmanager
def adapters_disabled(pipe) -> Iterator[None]:
    """Run ``pipe`` as its base model: LoRA adapters of the UNet disabled inside the block."""
    unet = pipe.unet
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def expand_prompts(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    """Every prompt with every seed: rows ordered prompt-major."""
    rows_p = [p for p in prompts for _ in seeds]
    rows_s = [int(s) for _ in prompts for s in seeds]
    return rows_p, rows_s


def generate_paired_lora(pipe, prompts, seeds, **kw) -> PairedSamples:
    """Base (adapters disabled) and aligned (adapters on) images from one LoRA pipeline, same seeds."""
    rows_p, rows_s = expand_prompts(prompts, seeds)
    with adapters_disabled(pipe):
        base = generate(pipe, rows_p, rows_s, desc="base", **kw)
    aligned = generate(pipe, rows_p, rows_s, desc="aligned", **kw)
    return PairedSamples(rows_p, rows_s, base, aligned)


def generate_paired(base_pipe, aligned_pipe, prompts, seeds, **kw) -> PairedSamples:
    """Base and aligned images from two pipelines (e.g. a fully fine-tuned UNet), same prompts and seeds."""
    rows_p, rows_s = expand_prompts(prompts, seeds)
    base = generate(base_pipe, rows_p, rows_s, desc="base", **kw)
    aligned = generate(aligned_pipe, rows_p, rows_s, desc="aligned", **kw)
    return PairedSamples(rows_p, rows_s, base, aligned)


def per_prompt_mean(values: np.ndarray, prompts: Sequence[Any]) -> np.ndarray:
    """Average rows that share a prompt (the unit of the win rate is the prompt, seeds are averaged within it), in
    first-appearance order; any hashable key works (PPD's unit is a (user, prompt) pair)."""
    order: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        order.setdefault(p, []).append(i)
    return np.array([float(np.mean(values[idx])) for idx in order.values()])


def compare(
    samples: PairedSamples,
    score_fn: Callable[[np.ndarray, list[str]], dict[str, np.ndarray]],
    *,
    primary: str,
    tie_tol: float = 1e-6,
) -> dict:
    """Score both sides with ``score_fn(images, prompts) -> {aspect: [N]}`` and compare them.

    The win rate is per prompt (seeds averaged within a prompt), ties count half, with a Wilson 95% interval.
    Every aspect gets its mean ± 95% CI before and after.
    """
    base_scores = score_fn(samples.base, samples.prompts)
    aligned_scores = score_fn(samples.aligned, samples.prompts)
    if primary not in base_scores:
        raise KeyError(f"score '{primary}' is not among the reward's outputs {sorted(base_scores)}")
    a = per_prompt_mean(np.asarray(aligned_scores[primary], dtype=np.float64), samples.prompts)
    b = per_prompt_mean(np.asarray(base_scores[primary], dtype=np.float64), samples.prompts)
    result = {
        "primary": primary,
        "num_prompts": int(len(a)),
        "num_images_per_side": int(len(samples.prompts)),
        "seeds_per_prompt": int(len(samples.prompts) // max(1, len(a))),
        "win_rate": paired_win_rate(a, b, tie_tol=tie_tol),
        "aspects": {},
    }
    for name in base_scores:
        bv = np.asarray(base_scores[name], dtype=np.float64)
        av = np.asarray(aligned_scores[name], dtype=np.float64)
        keep = ~(np.isnan(bv) | np.isnan(av))  # per-attribute scores are NaN where a caption leaves it open
        if keep.sum() < 2:
            continue
        result["aspects"][name] = {"base": mean_ci(bv[keep]), "aligned": mean_ci(av[keep])}
    return result
