"""CLIP score with any open_clip architecture, from a local checkpoint (no downloads).

Score (text–image alignment)::

    s = scale · cos(E_img(x), E_txt(prompt))            (then max(s, clamp_min) when clamp_min is set)

Choices, documented: the default is the raw cosine (``scale = 1``, no clamp; differentiable everywhere). The
"CLIP score" reported by text-to-image papers (torchmetrics ``CLIPScore``) is ``100 · max(cos, 0)``: set
``scale=100, clamp_min=0`` (as the ``clip-vit-l14`` manifest does). The CLIPScore paper (Hessel et al., 2021) uses
``2.5 · max(cos, 0)``: ``scale=2.5, clamp_min=0``.

Loading: ``open_clip.create_model_and_transforms(arch, pretrained=<local file>)``; a custom architecture is
registered first from its JSON config with ``open_clip.add_model_config``. open_clip accepts a checkpoint whose
state dict sits under ``"state_dict"`` (HPSv2's files) and strips a ``module.`` prefix.

Preprocessing: ``resize="shortest"`` is open_clip's own eval transform (bicubic resize of the shorter side, centre
crop, CLIP normalisation); ``resize="longest_pad"`` is HPSv2's (resize the longer side, pad black to a square).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from diffalign.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ModelReward,
    cosine_rows,
    freeze,
    normalize,
    pil_resize_longest_pad,
    pil_to_tensor,
    tensor_resize_longest_pad,
    tensor_resize_shortest_center_crop,
)

RESIZE_MODES = ("shortest", "longest_pad")


def build_open_clip(
    arch: str,
    pretrained: str | os.PathLike,
    *,
    model_config: str | os.PathLike | None = None,
    weights_only: bool = True,
):
    """Build an open_clip model from a **local** checkpoint file; returns ``(model, preprocess_val, tokenizer)``.

    Args:
        arch: open_clip architecture name (``"ViT-L-14"``, ``"ViT-H-14"``, or the name of ``model_config``).
        pretrained: path of the checkpoint (``.pt``/``.bin``/``.safetensors``). A pretrained *tag* such as
            ``"openai"`` is refused: it would download.
        model_config: optional JSON file (or folder of them) of a custom architecture, registered with
            ``open_clip.add_model_config`` (the file stem is the architecture name).
        weights_only: passed to ``torch.load`` (set False only for trusted pickled checkpoints that need it).
    """
    import open_clip

    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(
            f"open_clip checkpoint {path} not found. diffalign never downloads weights: pass the path of a local "
            f"checkpoint file for architecture {arch!r} (a pretrained tag like 'openai' is not accepted)"
        )
    if model_config is not None:
        open_clip.add_model_config(str(model_config))
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; give its JSON config via model_config "
            f"(known: {', '.join(open_clip.list_models()[:8])}, ...)"
        )
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        arch, pretrained=str(path), weights_only=weights_only
    )
    tokenizer = open_clip.get_tokenizer(arch)
    return model, preprocess_val, tokenizer


class OpenClipReward(ModelReward):
    """Text–image cosine of an open_clip model (CLIP score; HPSv2 with ``resize="longest_pad"``).

    Args:
        model: an open_clip ``CLIP`` model (``encode_image``/``encode_text``).
        tokenizer: its tokenizer (``open_clip.get_tokenizer(arch)``).
        preprocess_val: open_clip's eval transform (used for the exact PIL path when ``resize="shortest"``).
        name: reward name (metrics key ``reward/<name>``).
        resize: ``"shortest"`` (CLIP) or ``"longest_pad"`` (HPSv2).
        scale, clamp_min: ``s = max(scale · cos, clamp_min)``; see the module docstring.
        image_size: model input side; read from ``model.visual.image_size`` when None.
        mean, std: normalisation; read from ``model.visual.preprocess_cfg`` (CLIP's constants) when None.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        preprocess_val=None,
        name: str = "clip",
        resize: str = "shortest",
        scale: float = 1.0,
        clamp_min: float | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, differentiable=differentiable)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.name = name
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.preprocess_val = preprocess_val
        self.resize = resize
        self.scale = float(scale)
        self.clamp_min = clamp_min
        size = image_size or model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(mean or cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(std or cfg.get("std", OPENAI_CLIP_STD))

    @classmethod
    def from_pretrained(
        cls,
        arch: str,
        pretrained: str | os.PathLike,
        *,
        model_config: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        weights_only: bool = True,
        **kwargs,
    ) -> OpenClipReward:
        """Build from a local checkpoint (see :func:`build_open_clip`); ``kwargs`` go to the constructor."""
        model, preprocess_val, tokenizer = build_open_clip(
            arch, pretrained, model_config=model_config, weights_only=weights_only
        )
        return cls(model, tokenizer, preprocess_val=preprocess_val, **kwargs).to(device, dtype)

    # -- preprocessing -----------------------------------------------------------------------------------------
    def preprocess_pil(self, images: list[Image.Image]) -> Tensor:
        """The authors' pipeline: open_clip's eval transform, or HPSv2's resize-longest-and-pad + normalisation."""
        if self.resize == "longest_pad":
            x = torch.stack([pil_to_tensor(pil_resize_longest_pad(img, self.image_size)) for img in images])
            return normalize(x, self.mean, self.std)
        if self.preprocess_val is not None:
            return torch.stack([self.preprocess_val(img) for img in images])
        x = torch.stack([pil_to_tensor(img) for img in images])
        return self.preprocess_tensor(x)

    def preprocess_tensor(self, x: Tensor) -> Tensor:
        """Differentiable version: ``[B, 3, H, W]`` in [0, 1] → normalised ``[B, 3, S, S]``."""
        if self.resize == "longest_pad":
            x = tensor_resize_longest_pad(x, self.image_size)
        else:
            x = tensor_resize_shortest_center_crop(x, self.image_size)
        return normalize(x, self.mean, self.std)

    # -- features ----------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(prompts)).to(self.device)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32) of preprocessed pixels."""
        f = self.model.encode_image(pixel_values).float()
        return f / f.norm(dim=-1, keepdim=True)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``[B, D]`` (float32)."""
        f = self.model.encode_text(self.tokenize(prompts)).float()
        return f / f.norm(dim=-1, keepdim=True)

    def embed_images(self, images) -> Tensor:
        """Normalised image embeddings ``[B, D]`` of raw images (CLIP-I, λ-Harmonic image similarity)."""
        grad = torch.enable_grad() if self.differentiable else torch.no_grad()
        with grad:
            return torch.cat(
                [
                    self.image_features(self.pixel_values(images[i : i + self.batch_size]))
                    for i in range(0, len(images), self.batch_size)
                ]
            )

    def forward_scores(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        cos = cosine_rows(self.image_features(pixel_values), self.text_features(prompts))
        s = self.scale * cos
        if self.clamp_min is not None:
            s = s.clamp_min(self.clamp_min)
        return {self.name: s}
