"""The "models" of a preference-data build (:mod:`diffalign.data.builder`) and the sampling of the pairs' images.

The images of many pairs are generated together, grouped by generator, ``batch_size`` prompts per pipeline call,
each image with its own ``torch.Generator`` seeded with its planned seed (so an image does not depend on which batch
it lands in). DDIM, ``num_inference_steps`` (20) steps, ``eta`` 0 by default (deterministic sampling given the
initial noise).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from .build_plan import BuilderConfig, PairPlan

# ---------------------------------------------------------------------------------------------------------------
# Generators


@dataclass(frozen=True)
class GeneratorSpec:
    """One "model" of the data: a pipeline, optionally with another UNet, sampled at one guidance scale.

    ``name`` is what ``model_0``/``model_1`` record. ``unet`` is a ``UNet2DConditionModel`` directory that replaces
    the pipeline's own UNet (``None``: the pipeline's UNet)."""

    name: str
    guidance_scale: float = 5.0
    unet: str | None = None

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise ValueError(f"generator name {self.name!r} must be non-empty and contain no ':'")
        if not self.guidance_scale >= 0 or not math.isfinite(self.guidance_scale):
            raise ValueError(f"generator {self.name!r}: guidance_scale={self.guidance_scale} must be >= 0")


def parse_generator_spec(text: str) -> GeneratorSpec:
    """``"NAME:GUIDANCE"`` or ``"NAME:GUIDANCE:UNET_DIR"`` -> :class:`GeneratorSpec`.

    >>> parse_generator_spec("sandbox-base-cfg2:2")
    GeneratorSpec(name='sandbox-base-cfg2', guidance_scale=2.0, unet=None)
    """
    parts = text.split(":", 2)
    if len(parts) < 2:
        raise ValueError(
            f"generator {text!r} must be NAME:GUIDANCE or NAME:GUIDANCE:UNET_DIR, e.g. 'sandbox-base:5' or "
            "'sandbox-early:5:diffalign/sandbox/assets/unet-early'"
        )
    try:
        guidance = float(parts[1])
    except ValueError as err:
        raise ValueError(f"generator {text!r}: guidance {parts[1]!r} is not a number") from err
    return GeneratorSpec(parts[0], guidance, parts[2] if len(parts) == 3 and parts[2] else None)


def sandbox_generator_specs() -> list[GeneratorSpec]:
    """The default mix of the sandbox data: the base model at guidance 5 and 2, and the early UNet at guidance 5."""
    from ..sandbox import SANDBOX_UNET_EARLY

    return [
        GeneratorSpec("sandbox-base", 5.0),
        GeneratorSpec("sandbox-base-cfg2", 2.0),
        GeneratorSpec("sandbox-early", 5.0, str(SANDBOX_UNET_EARLY)),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Sampling


class ImageGenerator(Protocol):
    """Makes one image per (prompt, seed): ``sample(prompts, seeds) -> [B]`` uint8 ``(H, W, 3)`` arrays."""

    def sample(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]: ...


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] ``(B, H, W, 3)`` -> uint8 ``round(255·x)`` (as PIL would save them)."""
    return np.clip(np.round(np.asarray(images, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


class PipelineGenerator:
    """A diffusers text-to-image pipeline at one guidance scale, with DDIM sampling and per-image seeds.

    Each image's initial noise comes from its own CPU ``torch.Generator`` seeded with its planned seed, so the
    noise (and, with ``eta = 0``, the image up to floating-point batch effects) does not depend on the batch."""

    def __init__(
        self,
        pipe: Any,
        guidance_scale: float,
        num_inference_steps: int = 20,
        eta: float = 0.0,
        resolution: int | None = None,
    ) -> None:
        self.pipe = pipe
        self.guidance_scale = float(guidance_scale)
        self.num_inference_steps = int(num_inference_steps)
        self.eta = float(eta)
        self.resolution = resolution

    def sample(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            out = self.pipe(
                list(prompts),
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                eta=self.eta,
                generator=generators,
                output_type="np",
            ).images
        return list(to_uint8(out))


def with_ddim(pipe: Any) -> Any:
    """Switch ``pipe`` to a DDIM scheduler built from its own scheduler config (same noise schedule)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_generators(
    model: str,
    specs: Sequence[GeneratorSpec],
    cfg: BuilderConfig,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, PipelineGenerator]:
    """Load ``model`` (a pipeline directory, a hub id already cached, or ``"sandbox"``) once and build one
    :class:`PipelineGenerator` per spec; a spec with ``unet`` gets a pipeline that shares every component except
    its UNet, loaded with ``UNet2DConditionModel.from_pretrained(spec.unet)``."""
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from ..models.pipeline import resolve_model_path

    path = resolve_model_path(model)
    torch_dtype = getattr(torch, dtype)
    try:
        base = DiffusionPipeline.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not load the pipeline {path!r} ({err}). Give --model a diffusers pipeline directory "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or 'sandbox'."
        ) from err
    base = with_ddim(base.to(device))
    out: dict[str, PipelineGenerator] = {}
    for spec in specs:
        pipe = base
        if spec.unet is not None:
            unet_dir = Path(spec.unet)
            if not (unet_dir / "config.json").is_file():
                raise FileNotFoundError(
                    f"generator {spec.name!r}: no UNet at {unet_dir} (expected config.json and weights, as written "
                    "by UNet2DConditionModel.save_pretrained); fix the path or drop the generator"
                )
            unet = UNet2DConditionModel.from_pretrained(unet_dir, dtype=torch_dtype).to(device).eval()
            kwargs = {**base.components, "unet": unet}
            if "requires_safety_checker" in inspect.signature(type(base).__init__).parameters:
                kwargs["requires_safety_checker"] = base.config.get("requires_safety_checker", False)
            pipe = with_ddim(type(base)(**kwargs))
        out[spec.name] = PipelineGenerator(
            pipe, spec.guidance_scale, cfg.num_inference_steps, cfg.eta, cfg.resolution
        )
    return out


def sample_pair_images(
    plans: Sequence[PairPlan],
    generators: Mapping[str, ImageGenerator],
    batch_size: int,
    bar: tqdm | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images of the pairs: ``(images_0, images_1)``, each a list of uint8 ``(H, W, 3)`` arrays, one per plan.

    Jobs (both sides of every pair) are grouped by generator (in the order of ``generators``) and run
    ``batch_size`` prompts per call. ``bar`` is advanced by the number of images made."""
    missing = sorted(({p.model_0 for p in plans} | {p.model_1 for p in plans}) - set(generators))
    if missing:
        raise KeyError(f"plans name generators {missing} that were not given (have {sorted(generators)})")
    jobs: dict[str, list[tuple[int, int]]] = defaultdict(list)  # name -> [(plan index, side)]
    for i, p in enumerate(plans):
        jobs[p.model_0].append((i, 0))
        jobs[p.model_1].append((i, 1))
    out: list[list[np.ndarray | None]] = [[None] * len(plans), [None] * len(plans)]
    for name, gen in generators.items():
        todo = jobs.get(name, [])
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts = [plans[i].caption for i, _ in batch]
            seeds = [plans[i].seed_0 if side == 0 else plans[i].seed_1 for i, side in batch]
            images = gen.sample(prompts, seeds)
            if len(images) != len(batch):
                raise RuntimeError(
                    f"generator {name!r} returned {len(images)} images for {len(batch)} prompts"
                )
            for (i, side), img in zip(batch, images, strict=True):
                out[side][i] = np.asarray(img, dtype=np.uint8)
            if bar is not None:
                bar.update(len(batch))
    return out[0], out[1]  # type: ignore[return-value]
