"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", Schuhmann et al.) from local files.

As its authors run it: OpenAI CLIP ViT-L/14 image embedding (768-d), **L2-normalised**, then an MLP::

    layers = Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
                        Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))

(no activations: the head is linear overall, as released). Scores are roughly 1–10 (mean rating of the AVA/LAION
annotators). The released head ``sac+logos+ava1-l14-linearMSE.pth`` is a state dict with keys ``layers.0.weight``,
``layers.2.*``, ``layers.4.*``, ``layers.6.*``, ``layers.7.*``, which :class:`AestheticHead` matches exactly. The
prompt is ignored. The CLIP backbone is an open_clip ``ViT-L-14`` loaded from a local OpenAI checkpoint file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from diffalign.rewards.base import ModelReward, freeze
from diffalign.rewards.clip import OpenClipReward


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: ``[B, D] → [B]`` (``D = 768`` for ViT-L/14)."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: str | os.PathLike, input_dim: int = 768) -> AestheticHead:
    """Load the head from ``.pth``/``.pt`` (a state dict, or ``{"state_dict": ...}``) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic head {path} not found; download sac+logos+ava1-l14-linearMSE.pth from "
            "https://github.com/christophschuhmann/improved-aesthetic-predictor and pass its path"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    head = AestheticHead(input_dim)
    head.load_state_dict(state)
    return head


class AestheticReward(ModelReward):
    """LAION aesthetic score of images (the prompt is ignored): ``head(normalise(E_img(x)))``.

    Args:
        clip: an :class:`OpenClipReward` providing the CLIP image tower and its preprocessing.
        head: the :class:`AestheticHead`.
    """

    def __init__(
        self,
        clip: OpenClipReward,
        head: AestheticHead,
        *,
        name: str = "aesthetic",
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, differentiable=differentiable)
        self.name = name
        self.clip = clip
        self.head = freeze(head)

    @classmethod
    def from_pretrained(
        cls,
        clip_checkpoint: str | os.PathLike,
        head_path: str | os.PathLike,
        *,
        arch: str = "ViT-L-14",
        model_config: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> AestheticReward:
        clip = OpenClipReward.from_pretrained(arch, clip_checkpoint, model_config=model_config, name="clip")
        head = load_aesthetic_head(head_path, input_dim=int(clip.model.visual.output_dim))
        return cls(clip, head, **kwargs).to(device, dtype)

    def preprocess_pil(self, images: list[Image.Image]) -> Tensor:
        return self.clip.preprocess_pil(images)

    def preprocess_tensor(self, x: Tensor) -> Tensor:
        return self.clip.preprocess_tensor(x)

    def forward_scores(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        emb = self.clip.image_features(pixel_values)  # L2-normalised, float32
        return {self.name: self.head(emb.to(self.dtype))}
