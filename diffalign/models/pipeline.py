"""Load the pieces of a Stable Diffusion-family pipeline for training, and encode images and prompts.

One code path for SD1.x (one CLIP text encoder, ``last_hidden_state``) and SDXL (two text encoders, penultimate
hidden states concatenated, pooled embedding of the second encoder, ``time_ids``), as the diffusers pipelines do it.
The sandbox model is an ordinary SD1.x pipeline directory; ``"sandbox"`` is only a name for its path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from ..errors import ConfigError
from ..sandbox import SANDBOX_PIPELINE


def resolve_model_path(name: str) -> str:
    """``"sandbox"`` -> the shipped sandbox pipeline directory; ``"sandbox-4step"`` -> a pipeline directory of the
    distilled 4-step sandbox model (Euler-ancestral, no guidance), assembled once under the cache root
    (:func:`diffalign.data.ppd.cache_root`: ``$DIFFALIGN_CACHE``, else ``$XDG_CACHE_HOME/diffalign``, else
    ``~/.cache/diffalign``) from links to the shipped parts
    (:func:`diffalign.sandbox.distill.materialise_pipeline`); anything else is returned unchanged."""
    if name == "sandbox-4step":
        from ..data.ppd import cache_root
        from ..sandbox import SANDBOX_DISTILLED
        from ..sandbox.distill import materialise_pipeline

        return str(materialise_pipeline(cache_root(), SANDBOX_DISTILLED, Path(resolve_model_path("sandbox"))))
    if name == "sandbox":
        if not (SANDBOX_PIPELINE / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the sandbox pipeline is missing at {SANDBOX_PIPELINE}; rebuild it with "
                "`python scripts/build_sandbox.py` (or reinstall diffalign from a full checkout)"
            )
        return str(SANDBOX_PIPELINE)
    return name


def is_sdxl(model_path: str) -> bool:
    """SDXL-family pipelines have a second text encoder."""
    index = Path(model_path) / "model_index.json"
    if index.is_file():
        return "text_encoder_2" in json.loads(index.read_text())
    # Hub ids: fall back on the name (users of hub SDXL models get the right thing for the usual repos).
    return "xl" in model_path.lower()


@dataclass
class Components:
    """What training needs from a pipeline. ``text_encoders``/``tokenizers`` have one entry (SD1.x) or two (SDXL)."""

    model_path: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: DDPMScheduler
    sdxl: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, *self.text_encoders]


def load_components(model: str, revision: str | None = None, variant: str | None = None) -> Components:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and a DDPM training scheduler from a pipeline directory or id.

    The VAE and text encoders are frozen (``requires_grad_(False)``, eval mode); the UNet is returned trainable.
    """
    path = resolve_model_path(model)
    kw = {"revision": revision, "variant": variant}
    sdxl = is_sdxl(path)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)]
        text_encoders: list[torch.nn.Module] = [
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        ]
        if sdxl:
            tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision))
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
            )
    except OSError as err:
        raise ConfigError(
            f"config field pretrained_model: could not load the pipeline components from {path!r} ({err}). Point `pretrained_model` at a diffusers "
            "pipeline directory (with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or use "
            "'sandbox'. Without network access hub ids only work if the model is already in the HF cache."
        ) from err
    for module in [vae, *text_encoders]:
        module.requires_grad_(False)
        module.eval()
    return Components(path, unet, vae, text_encoders, tokenizers, scheduler, sdxl)


# ---------------------------------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_prompts(components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning as the diffusers pipelines compute it.

    SD1.x: ``{"prompt_embeds": [N, L, D]}`` (last hidden state).
    SDXL: ``{"prompt_embeds": [N, L, D1 + D2], "pooled_prompt_embeds": [N, D2]}`` (penultimate hidden states of
    both encoders concatenated; pooled projection of the second).
    """
    device = components.unet.device
    if not components.sdxl:
        tok = components.tokenizers[0]
        ids = tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        enc = components.text_encoders[0]
        return {"prompt_embeds": enc(ids.input_ids.to(enc.device))[0].to(device)}
    embeds, pooled = [], None
    for tok, enc in zip(components.tokenizers, components.text_encoders):
        ids = tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = enc(ids.input_ids.to(enc.device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's pooled projection is what SDXL uses
        embeds.append(out.hidden_states[-2])
    return {"prompt_embeds": torch.cat(embeds, dim=-1).to(device), "pooled_prompt_embeds": pooled.to(device)}


@torch.no_grad()
def encode_images(components: Components, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> latents ``[N, C, H/f, W/f]`` scaled by the VAE's scaling factor.

    Uses the posterior mean (not a sample): encoding is deterministic, so runs resume bit-exactly and a cache holds
    what on-the-fly encoding computes — up to the cache's storage dtype (float16: ≤ 4.9e-4 relative error, measured
    in ``diffalign/data/cache.py``) and the VAE's batch-size-dependent summation order (float32, ~1e-6). The
    posterior std of SD's VAE is tiny, so this is the usual choice for latent caches. Returns float32 whatever the
    VAE's dtype (SDXL's VAE is kept in float32 under fp16 mixed precision: it overflows to NaN in half precision).
    """
    vae = components.vae
    latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mean
    return latents.float() * components.vae_scaling_factor


def sdxl_time_ids(
    original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, resolution: int
) -> torch.Tensor:
    """SDXL micro-conditioning ``[N, 6]`` = (original h, w, crop top, left, target h, w)."""
    target = torch.tensor([resolution, resolution], dtype=original_sizes.dtype).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crop_top_lefts, target.to(original_sizes.device)], dim=1)


def unet_added_cond(
    components: Components,
    text: dict[str, torch.Tensor],
    original_sizes: torch.Tensor | None,
    crop_top_lefts: torch.Tensor | None,
    resolution: int,
) -> dict[str, torch.Tensor] | None:
    """``added_cond_kwargs`` for the UNet: ``None`` for SD1.x, text embeds and time ids for SDXL."""
    if not components.sdxl:
        return None
    n = text["pooled_prompt_embeds"].shape[0]
    if original_sizes is None:
        original_sizes = torch.full((n, 2), resolution, dtype=torch.long)
        crop_top_lefts = torch.zeros((n, 2), dtype=torch.long)
    time_ids = sdxl_time_ids(original_sizes, crop_top_lefts, resolution)
    dtype = text["prompt_embeds"].dtype
    return {
        "text_embeds": text["pooled_prompt_embeds"],
        "time_ids": time_ids.to(text["prompt_embeds"].device, dtype),
    }


def set_attention_backend(unet: UNet2DConditionModel, attention: str = "auto") -> str:
    """'auto': xformers when installed and on CUDA, otherwise PyTorch SDPA (diffusers' default). Returns the choice."""
    if attention == "sdpa":
        return "sdpa"
    want_xformers = attention == "xformers" or (attention == "auto" and unet.device.type == "cuda")
    if not want_xformers:
        return "sdpa"
    try:
        import xformers  # noqa: F401

        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    except Exception as err:  # ImportError, or no CUDA kernels
        if attention == "xformers":
            raise RuntimeError(
                f"attention='xformers' was asked for but cannot be used ({err}); install the `xformers` extra on "
                "a CUDA machine or use attention='sdpa'"
            ) from err
        return "sdpa"
