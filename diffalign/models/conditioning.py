"""The conditioning part of a training step: what the UNet receives besides ``(x_t, t)``.

Text embeddings (SD1.x: ``prompt_embeds``; SDXL: plus pooled embeds and micro-conditioning time ids), and the seams
later methods use: ``cross_attention_kwargs`` (extra tokens for decoupled cross-attention, e.g. user embeddings)
and ``timestep_cond`` (guidance-distilled models). One :class:`Conditioning` per UNet call, built by
:func:`text_conditioning` over the rows the call sees (for a pair step: winners then losers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import pipeline as mp


@dataclass
class Conditioning:
    """UNet keyword inputs for a batch of ``N`` samples (tensors with ``N`` rows)."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    timestep_cond: torch.Tensor | None = None

    def unet_kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments for ``unet(x_t, t, **kwargs)``, floating tensors cast to the compute ``dtype``
        (SDXL's ``text_embeds``/``time_ids`` too: under fp16 a float32 one reaches a half Linear otherwise)."""
        kw: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states.to(dtype)}
        if self.added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = {n: v.to(dtype) for n, v in self.added_cond_kwargs.items()}
        if self.cross_attention_kwargs is not None:
            kw["cross_attention_kwargs"] = self.cross_attention_kwargs
        if self.timestep_cond is not None:
            kw["timestep_cond"] = self.timestep_cond.to(dtype)
        return kw


def drop_prompts(text: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], drop: torch.Tensor) -> dict:
    """Prompt dropout: rows where ``drop[n]`` get the empty caption's embeddings (classifier-free guidance
    training). ``text`` ``{name: [N, ...]}``, ``empty`` ``{name: [1, ...]}``, ``drop`` bool ``[N]``."""
    return {
        k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), empty[k].to(v.device, v.dtype).expand_as(v), v)
        for k, v in text.items()
    }


def text_conditioning(
    components: mp.Components,
    text: dict[str, torch.Tensor],
    resolution: int,
    original_sizes: torch.Tensor | None = None,
    crop_top_lefts: torch.Tensor | None = None,
) -> Conditioning:
    """Text conditioning of ``N`` rows; SDXL's time ids from the images' original sizes and crops (``[N, 2]``)."""
    added = mp.unet_added_cond(components, text, original_sizes, crop_top_lefts, resolution)
    return Conditioning(encoder_hidden_states=text["prompt_embeds"], added_cond_kwargs=added)
