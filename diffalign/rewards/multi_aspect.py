"""Multi-aspect reward model (VP-Score-style; VisionPrefer, arXiv 2404.15100) and the Bradley–Terry loss.

VisionPrefer annotates preferences on four aspects (prompt-following, aesthetic, fidelity, harmlessness) and trains
VP-Score on them; its exact architecture is not public, so here VP-Score is "a CLIP backbone with one head per aspect,
trained with the toolkit on multi-aspect preference data". Architecture::

    u = normalise(E_img(x)),  v = normalise(E_txt(prompt))          (transformers CLIPModel, [B, D] each)
    h = [u, v, u ⊙ v]                                                 joint image–text features, [B, 3D]
    s_a = head_a(h)                                                   one head per aspect: Linear(3D, 1), or
                                                                      Linear(3D, H) → GELU → Linear(H, 1) if H > 0
    overall = Σ_a w_a s_a / Σ_a w_a                                   (w = config.overall_weights, default equal)

Bradley–Terry training (per aspect, on pairs where that aspect has a winner)::

    bt_loss(s_w, s_l) = −log σ(s_w − s_l)                             per pair, unreduced
    soft_bt_loss(s_a, s_b, p) = −[p log σ(s_a − s_b) + (1 − p) log σ(s_b − s_a)]   (p = 0.5 for a tie)

Checkpoint directory (``save``/``load``)::

    config.json         {"format": "diffalign-multi-aspect", "aspects": [...], "head_hidden": H, ...}
    heads.safetensors   head_<aspect>.<param> tensors
    backbone/           CLIPModel.save_pretrained + processor.save_pretrained
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from diffalign.rewards.base import ModelReward, freeze
from diffalign.rewards.hf_clip import (
    clip_image_embeds,
    clip_text_embeds,
    processor_geometry,
    processor_pixels,
    tensor_pixels,
    text_max_length,
)

VISIONPREFER_ASPECTS = ("prompt_following", "aesthetic", "fidelity", "harmlessness")
CHECKPOINT_FORMAT = "diffalign-multi-aspect"


def bt_loss(score_w: Tensor, score_l: Tensor) -> Tensor:
    """Bradley–Terry loss ``−log σ(s_w − s_l)`` per pair ``[B]`` (unreduced), via ``softplus(s_l − s_w)`` for
    stability. ``bt_loss(0, 0) = log 2``."""
    return F.softplus(score_l - score_w)


def soft_bt_loss(score_a: Tensor, score_b: Tensor, prob_a: Tensor | float) -> Tensor:
    """Bradley–Terry loss with a soft label ``p = P(a ≻ b)`` (0.5 for a tie), per pair ``[B]``:
    ``−[p log σ(d) + (1 − p) log σ(−d)]``, ``d = s_a − s_b``."""
    d = score_a - score_b
    return -(prob_a * F.logsigmoid(d) + (1.0 - prob_a) * F.logsigmoid(-d))


@dataclass
class MultiAspectConfig:
    """Configuration of a :class:`MultiAspectRewardModel` (stored as ``config.json``)."""

    aspects: tuple[str, ...] = VISIONPREFER_ASPECTS  # one head per aspect, in this order
    head_hidden: int = 0  # 0: linear heads; > 0: Linear(3D, H) → GELU → Linear(H, 1)
    overall_weights: dict[str, float] = field(
        default_factory=dict
    )  # aspect → weight of "overall"; {} = equal
    format: str = CHECKPOINT_FORMAT

    def __post_init__(self) -> None:
        self.aspects = tuple(self.aspects)
        if not self.aspects or len(set(self.aspects)) != len(self.aspects):
            raise ValueError(f"aspects must be non-empty and unique, got {self.aspects}")
        if "overall" in self.aspects:
            raise ValueError("'overall' is computed from the aspects; it cannot be an aspect itself")
        unknown = set(self.overall_weights) - set(self.aspects)
        if unknown:
            raise ValueError(
                f"overall_weights names unknown aspects {sorted(unknown)}; aspects are {self.aspects}"
            )
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0, got {self.head_hidden}")

    def weights(self) -> list[float]:
        return [
            float(self.overall_weights.get(a, 1.0 if not self.overall_weights else 0.0)) for a in self.aspects
        ]


def _head(in_dim: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(in_dim, 1)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))


class MultiAspectRewardModel(nn.Module):
    """CLIP backbone + one head per aspect over ``[u, v, u ⊙ v]`` (see the module docstring). Trainable.

    Args:
        backbone: ``transformers.CLIPModel``.
        processor: its ``CLIPProcessor``.
        config: :class:`MultiAspectConfig`.
    """

    def __init__(self, backbone: nn.Module, processor, config: MultiAspectConfig | None = None) -> None:
        super().__init__()
        self.config = config or MultiAspectConfig()
        self.backbone = backbone
        self.processor = processor
        dim = int(backbone.config.projection_dim)
        self.heads = nn.ModuleDict({a: _head(3 * dim, self.config.head_hidden) for a in self.config.aspects})
        self.max_length = text_max_length(backbone, processor)

    def joint_features(self, pixel_values: Tensor, prompts: Sequence[str]) -> Tensor:
        """``[u, v, u ⊙ v]``: ``[B, 3D]`` from preprocessed pixels ``[B, 3, S, S]`` and prompts."""
        u = clip_image_embeds(self.backbone, pixel_values)
        v = clip_text_embeds(self.backbone, self.processor, prompts, self.max_length)
        u = u / u.norm(dim=-1, keepdim=True)
        v = v / v.norm(dim=-1, keepdim=True)
        return torch.cat([u, v, u * v], dim=-1)

    def forward(self, pixel_values: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{aspect: [B]}`` plus ``"overall"`` (weighted mean of the aspects)."""
        h = self.joint_features(pixel_values, prompts)
        out = {a: head(h).squeeze(-1) for a, head in self.heads.items()}
        w = torch.tensor(self.config.weights(), dtype=h.dtype, device=h.device)
        stacked = torch.stack([out[a] for a in self.config.aspects], dim=-1)
        out["overall"] = (stacked * w).sum(-1) / w.sum()
        return out

    # -- checkpoint directory ----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json``, ``heads.safetensors`` and ``backbone/`` under ``directory``; returns it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["aspects"] = list(self.config.aspects)
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        state = {f"head_{k}": v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        save_file(state, str(directory / "heads.safetensors"))
        self.backbone.save_pretrained(directory / "backbone")
        self.processor.save_pretrained(directory / "backbone")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MultiAspectRewardModel:
        """Load a directory written by :meth:`save` (local files only)."""
        from safetensors.torch import load_file

        from diffalign.rewards.hf_clip import load_clip_dir

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"multi-aspect reward checkpoint {directory} has no config.json; expected a directory written by "
                "MultiAspectRewardModel.save (config.json, heads.safetensors, backbone/)"
            )
        raw = json.loads(cfg_path.read_text())
        if raw.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{cfg_path}: format is {raw.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        config = MultiAspectConfig(**raw)
        backbone, processor = load_clip_dir(directory / "backbone", dtype=dtype)
        model = cls(backbone, processor, config)
        state = load_file(str(directory / "heads.safetensors"))
        model.heads.load_state_dict({k.removeprefix("head_"): v for k, v in state.items()})
        return model.to(dtype)


class MultiAspectReward(ModelReward):
    """A :class:`MultiAspectRewardModel` as a frozen :class:`Reward`.

    ``score`` returns the aspect named by ``aspect`` (default ``"overall"``); ``score_aspects`` returns every aspect
    and ``"overall"``.
    """

    def __init__(
        self,
        model: MultiAspectRewardModel,
        *,
        name: str = "vp-score",
        aspect: str = "overall",
        batch_size: int = 32,
        differentiable: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, differentiable=differentiable)
        valid = (*model.config.aspects, "overall")
        if aspect not in valid:
            raise ValueError(f"aspect must be one of {valid}, got {aspect!r}")
        self.name = name
        self.aspect = aspect
        self.aspects = valid
        self.model = freeze(model)
        self.geometry = processor_geometry(model.processor)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> MultiAspectReward:
        return cls(MultiAspectRewardModel.load(directory, dtype=dtype), **kwargs).to(device, dtype)

    def preprocess_pil(self, images: list[Image.Image]) -> Tensor:
        return processor_pixels(self.model.processor, images)

    def preprocess_tensor(self, x: Tensor) -> Tensor:
        return tensor_pixels(self.geometry, x)

    def forward_scores(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return self.model(pixel_values, prompts)

    def score(self, images, prompts) -> Tensor:
        return self.score_aspects(images, prompts)[self.aspect]
