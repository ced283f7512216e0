"""Image embeddings from a transformers vision model: the backbone of DreamBench's DINO metric.

The reward catalog loads it (manifest kind ``image_features``, e.g. ``dino-vits16``, ``sandbox-dino-standin``) and
:mod:`diffalign.eval.dreambench` computes its metrics with it; it lives here, below both, so that the catalog does
not import ``eval/``. It is not a reward: it embeds images and has no ``score``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFeatureExtractor"]


class ImageFeatureExtractor:
    """Image embeddings from any transformers vision model directory: DINO's metric backbone.

    - ``ViTModel`` / ``Dinov2Model`` (e.g. ``facebook/dino-vits16``): ``last_hidden_state[:, 0]``, the CLS token
      after the final layer norm (what DINO's own ``model(x)`` returns and what DreamBench's DINO metric uses);
    - ``CLIPVisionModel`` or a full ``CLIPModel`` (its vision tower): ``pooler_output`` = the CLS token after
      ``post_layernorm``, **before** the projection.

    Preprocessing is the directory's image processor (``preprocessor_config.json``, or the image part of a v5
    ``processor_config.json``); without one, a resize to the
    model's ``image_size`` square with ImageNet mean/std (DINO's normalisation).

    Args:
        model: the vision model (eval mode, frozen).
        processor: a transformers image processor.
        pooling: ``"cls"`` (``last_hidden_state[:, 0]``) or ``"pooler"`` (``pooler_output``).
        stand_in_for: when this backbone replaces another (the sandbox's DINO stand-in), that backbone's name.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        *,
        pooling: str,
        name: str = "image-features",
        stand_in_for: str | None = None,
        batch_size: int = 32,
    ) -> None:
        if pooling not in ("cls", "pooler"):
            raise ValueError(f"pooling must be 'cls' or 'pooler', got {pooling!r}")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.pooling = pooling
        self.name = name
        self.stand_in_for = stand_in_for
        self.batch_size = batch_size
        self.aspects: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
        stand_in_for: str | None = None,
        batch_size: int = 32,
    ) -> ImageFeatureExtractor:
        """Load from a local directory (never downloads)."""
        from transformers import AutoConfig, AutoModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: no config.json; give a transformers vision model directory (e.g. "
                "`huggingface-cli download facebook/dino-vits16 --local-dir DIR`)"
            )
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        pooling = "cls"
        if config.model_type == "clip":  # a full CLIPModel: keep its vision tower
            model, pooling = model.vision_model, "pooler"
        elif config.model_type == "clip_vision_model":
            pooling = "pooler"
        processor = _image_processor(path, config)
        return cls(
            model.to(device),
            processor,
            pooling=pooling,
            name=name or path.name,
            stand_in_for=stand_in_for,
            batch_size=batch_size,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image] | np.ndarray) -> Tensor:
        """``[B, D]`` float32 embeddings (not normalised) of PIL images or uint8 ``[B, H, W, 3]``."""
        if isinstance(images, np.ndarray):
            images = [Image.fromarray(a) for a in images]
        chunks = []
        dtype = next(self.model.parameters()).dtype
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=list(images[i : i + self.batch_size]), return_tensors="pt")[
                "pixel_values"
            ]
            out = self.model(pixel_values=px.to(self.device, dtype))
            feats = out.pooler_output if self.pooling == "pooler" else out.last_hidden_state[:, 0]
            chunks.append(feats.float().cpu())
        return torch.cat(chunks)

    def __repr__(self) -> str:
        extra = f", stand-in for {self.stand_in_for}" if self.stand_in_for else ""
        return f"ImageFeatureExtractor({self.name!r}, pooling={self.pooling}{extra})"


def _image_processor(path: Path, config):
    """The directory's image processor, or resize-to-square + ImageNet normalisation when it has none."""
    from transformers import AutoImageProcessor

    # transformers < 5 writes preprocessor_config.json; v5 writes a processor's settings to processor_config.json
    if (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    from transformers import ViTImageProcessor

    vc = getattr(config, "vision_config", config)
    size = int(getattr(vc, "image_size", 224))
    return ViTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
