"""transformers CLIP rewards: PickScore and a plain CLIP cosine, from a local model directory (no downloads).

PickScore (Kirstain et al., 2023, arXiv 2305.01569), as its authors load it: ``CLIPModel`` (ViT-H/14, hub id
``yuvalkirstain/PickScore_v1``) with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; text padded and
truncated to 77 tokens; image and text embeddings L2-normalised; score::

    pickscore = exp(logit_scale) · cos(E_img, E_txt)          (logit_scale = ln 100 after training: ≈ 100 · cos)

``score="cosine"`` gives ``scale · cos`` instead (the sandbox CLIP reward uses the raw cosine).

Embeddings are ``visual_projection(vision_model(x).pooler_output)`` and
``text_projection(text_model(ids).pooler_output)``: the definition of ``CLIPModel.get_image_features`` /
``get_text_features``, written out so the result does not depend on the transformers version's return type.
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
    resize_tensor,
    tensor_resize_shortest_center_crop,
)

SCORE_KINDS = ("pickscore", "cosine")


def load_clip_dir(
    model_dir: str | os.PathLike,
    processor_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load ``(CLIPModel, processor)`` from local directories (``HF_HUB_OFFLINE`` style: ``local_files_only``)."""
    from transformers import AutoProcessor, CLIPModel

    model_dir = Path(model_dir)
    processor_dir = Path(processor_dir) if processor_dir is not None else model_dir
    for d, what in (
        (model_dir, "model (config.json + weights)"),
        (processor_dir, "processor (tokenizer + preprocessor_config.json)"),
    ):
        if not d.is_dir():
            raise FileNotFoundError(
                f"CLIP {what} directory {d} not found; diffalign never downloads weights: download the model "
                "(e.g. `huggingface-cli download <hub id> --local-dir <dir>`) and pass that directory"
            )
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)
    return model, processor


def _size_dict(size) -> dict | None:
    """A processor size (int, dict, or transformers v5 ``SizeDict``) as a plain dict without ``None`` entries."""
    if size is None:
        return None
    if isinstance(size, int):
        return {"shortest_edge": size}
    return {k: int(v) for k, v in dict(size).items() if v is not None}


def processor_geometry(processor) -> dict:
    """Read the image preprocessing of a transformers CLIP processor: resize rule, crop, mean, std."""
    ip = getattr(processor, "image_processor", processor)
    size = _size_dict(getattr(ip, "size", None)) or {"shortest_edge": 224}
    crop = _size_dict(getattr(ip, "crop_size", None))
    return {
        "size": dict(size),
        "crop": dict(crop) if (crop and getattr(ip, "do_center_crop", True)) else None,
        "mean": tuple(getattr(ip, "image_mean", None) or OPENAI_CLIP_MEAN),
        "std": tuple(getattr(ip, "image_std", None) or OPENAI_CLIP_STD),
    }


def text_max_length(model, processor) -> int:
    """Token budget: the tokenizer's ``model_max_length`` capped by the text encoder's position table."""
    tok = getattr(processor, "tokenizer", processor)
    max_pos = int(model.config.text_config.max_position_embeddings)
    return int(min(getattr(tok, "model_max_length", max_pos) or max_pos, max_pos))


def processor_pixels(processor, images: list[Image.Image]) -> Tensor:
    """Exact path: the processor's own image pipeline → float32 ``[B, 3, S, S]``."""
    return processor(images=images, return_tensors="pt")["pixel_values"].float()


def tensor_pixels(geometry: dict, x: Tensor) -> Tensor:
    """Differentiable path: resize (shortest edge, or to height × width) → centre crop → normalise."""
    size, crop = geometry["size"], geometry["crop"]
    if "shortest_edge" in size:
        if crop and int(crop["height"]) != int(crop["width"]):
            raise ValueError(f"non-square crop {crop} is not supported by the tensor path")
        crop_side = int(crop["height"]) if crop else int(size["shortest_edge"])
        x = tensor_resize_shortest_center_crop(x, int(size["shortest_edge"]), crop_side)
    else:
        x = resize_tensor(x, (int(size["height"]), int(size["width"])))
    return normalize(x, geometry["mean"], geometry["std"])


def clip_image_embeds(model, pixel_values: Tensor) -> Tensor:
    """``visual_projection(vision_model(x).pooler_output)``: ``[B, D]`` (not normalised)."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def clip_text_embeds(model, processor, prompts: Sequence[str], max_length: int) -> Tensor:
    """``text_projection(text_model(ids).pooler_output)`` with padding and truncation to ``max_length``."""
    device = model.text_projection.weight.device
    tok = processor(
        text=list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    out = model.text_model(
        input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
    )
    return model.text_projection(out.pooler_output)


class HFClipReward(ModelReward):
    """PickScore (``score="pickscore"``) or scaled cosine (``score="cosine"``) of a transformers ``CLIPModel``.

    Args:
        model: ``transformers.CLIPModel``.
        processor: its ``CLIPProcessor`` (tokenizer + image processor).
        name: reward name.
        score: ``"pickscore"`` (``exp(logit_scale) · cos``) or ``"cosine"`` (``scale · cos``).
        scale: multiplier of the cosine for ``score="cosine"``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        *,
        name: str = "pickscore",
        score: str = "pickscore",
        scale: float = 1.0,
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, differentiable=differentiable)
        if score not in SCORE_KINDS:
            raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")
        self.name = name
        self.model = freeze(model)
        self.processor = processor
        self.score_kind = score
        self.scale = float(scale)
        self.geometry = processor_geometry(processor)
        self.max_length = text_max_length(model, processor)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        processor_dir: str | os.PathLike | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> HFClipReward:
        model, processor = load_clip_dir(model_dir, processor_dir, dtype=dtype)
        return cls(model, processor, **kwargs).to(device, dtype)

    # -- preprocessing -----------------------------------------------------------------------------------------
    def preprocess_pil(self, images: list[Image.Image]) -> Tensor:
        """The authors' pipeline: the processor itself."""
        return processor_pixels(self.processor, images)

    def preprocess_tensor(self, x: Tensor) -> Tensor:
        """Differentiable version of the processor's resize → centre crop → normalise."""
        return tensor_pixels(self.geometry, x)

    # -- features ----------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected image embeddings ``[B, D]`` (not normalised)."""
        return clip_image_embeds(self.model, pixel_values)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Projected text embeddings ``[B, D]`` (not normalised); padding/truncation to ``max_length`` as PickScore."""
        return clip_text_embeds(self.model, self.processor, prompts, self.max_length)

    def forward_scores(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        cos = cosine_rows(self.image_features(pixel_values), self.text_features(prompts))
        if self.score_kind == "pickscore":
            s = self.model.logit_scale.float().exp() * cos
        else:
            s = self.scale * cos
        return {self.name: s}
