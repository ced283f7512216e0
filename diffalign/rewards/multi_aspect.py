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

or, for heads trained on a *frozen* backbone that already lives in a directory (``save(..., backbone_ref=dir)``),
no ``backbone/`` copy: ``config.json`` gains ``"backbone": {"path": <dir, relative to the checkpoint when
possible>, "sha256": <SHA-256 of dir/model.safetensors>}``, ``save`` checks that the model's backbone tensors equal
that file's, and ``load`` checks the hash (a rebuilt backbone no longer matches its heads). Checkpoints without the
key load as before.
"""

from __future__ import annotations

import hashlib
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
BACKBONE_WEIGHTS = "model.safetensors"  # the weight file a referenced backbone directory must hold


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
    def save(self, directory: str | os.PathLike, backbone_ref: str | os.PathLike | None = None) -> Path:
        """Write ``config.json``, ``heads.safetensors`` and ``backbone/`` under ``directory``; returns it.

        With ``backbone_ref`` (a ``CLIPModel`` directory holding ``model.safetensors``), ``backbone/`` is not
        written: the checkpoint records that directory (relative to ``directory`` when both are on one drive) and
        the SHA-256 of its weights. Raises ``ValueError`` when the model's backbone differs from those weights
        (e.g. it was fine-tuned): such a backbone must be saved as a copy."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["aspects"] = list(self.config.aspects)
        if backbone_ref is not None:
            cfg["backbone"] = self._backbone_reference(Path(backbone_ref), directory)
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        state = {f"head_{k}": v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        save_file(state, str(directory / "heads.safetensors"))
        if backbone_ref is None:
            self.backbone.save_pretrained(directory / "backbone")
            self.processor.save_pretrained(directory / "backbone")
        return directory

    def _backbone_reference(self, ref: Path, directory: Path) -> dict[str, str]:
        """``{"path", "sha256"}`` of a backbone directory after checking the model's backbone equals it."""
        from safetensors.torch import load_file

        weights = ref / BACKBONE_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(
                f"backbone_ref {ref} has no {BACKBONE_WEIGHTS}; reference a directory written by "
                "CLIPModel.save_pretrained (safetensors), or save without backbone_ref to copy the backbone"
            )
        own = self.backbone.state_dict()
        for key, tensor in load_file(str(weights)).items():
            mine = own.get(key)
            if (
                mine is None
                or mine.shape != tensor.shape
                or not torch.equal(mine.detach().cpu().to(tensor.dtype), tensor)
            ):
                raise ValueError(
                    f"the model's backbone differs from {weights} (tensor {key!r}); only an unchanged (frozen) "
                    "backbone can be saved by reference: save without backbone_ref to write a copy"
                )
        try:
            path = os.path.relpath(ref.resolve(), directory.resolve())
        except ValueError:  # different drives (Windows): keep the absolute path
            path = str(ref.resolve())
        return {"path": Path(path).as_posix(), "sha256": _sha256_file(weights)}

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
        backbone_dir = directory / "backbone"
        ref = raw.pop("backbone", None)
        if ref is not None:
            backbone_dir = _check_backbone_reference(ref, directory, cfg_path)
        config = MultiAspectConfig(**raw)
        backbone, processor = load_clip_dir(backbone_dir, dtype=dtype)
        model = cls(backbone, processor, config)
        state = load_file(str(directory / "heads.safetensors"))
        model.heads.load_state_dict({k.removeprefix("head_"): v for k, v in state.items()})
        return model.to(dtype)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_backbone_reference(ref: dict, directory: Path, cfg_path: Path) -> Path:
    """The directory a checkpoint's ``"backbone"`` entry points to, after checking its weights' SHA-256."""
    if not isinstance(ref, dict) or "path" not in ref or "sha256" not in ref:
        raise ValueError(f'{cfg_path}: \'backbone\' must be {{"path": ..., "sha256": ...}}, got {ref!r}')
    path = Path(ref["path"])
    path = path if path.is_absolute() else directory / path
    weights = path / BACKBONE_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{cfg_path}: the heads were trained on the backbone {path} (resolved from {ref['path']!r}), which has "
            f"no {BACKBONE_WEIGHTS}. Put that CLIP directory there (checkpoint and backbone keep their relative "
            "places), or retrain the heads (scripts/train_reward_model.py)"
        )
    digest = _sha256_file(weights)
    if digest != ref["sha256"]:
        raise ValueError(
            f"{cfg_path}: the backbone {weights} has SHA-256 {digest[:12]}..., but the heads were trained on one "
            f"with {ref['sha256'][:12]}... (was the backbone rebuilt?). Retrain the heads with "
            "scripts/train_reward_model.py, or restore the original backbone"
        )
    return path


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
