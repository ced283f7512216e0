"""The configuration of a multi-aspect (VP-Score-style) reward-model training run (``scripts/train_reward_model.py``).

Read by the pair builder (:func:`diffalign.rewards.aspect_pairs.build_pairs`: the data fields) and by the run
(:func:`diffalign.training.reward_model.train_reward_model`: the rest). It lives in ``rewards/``, below both, so
that the pair builder does not import ``training/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCES: tuple[str, ...] = ("pickapic", "rendered")
TIE_POLICIES: tuple[str, ...] = ("drop", "soft")
BACKBONE_STORAGE: tuple[str, ...] = ("auto", "reference", "copy")


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RenderConfig:
    """Defects of rendered pairs, drawn independently for each side of a pair (``WorldConfig``-like)."""

    p_wrong: float = 0.3  # the side shows the scene of a caption with one wrong attribute (corrupt_spec)
    p_hazard: float = 0.25  # the hazard mark in a random corner
    p_noise: float = 0.25  # additive Gaussian noise, std ~ U[0.06, 0.14]
    p_smear: float = 0.25  # 3x3 box blur


def _f(help_text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class RewardTrainConfig:
    """Train a VP-Score-style multi-aspect reward model (CLIP backbone + one Bradley–Terry head per aspect)."""

    # ---- data ------------------------------------------------------------------------------------------------
    source: str = _f(
        "'sandbox' (the shipped sandbox Pick-a-Pic data), 'rendered' (render defective scenes), or a "
        "Pick-a-Pic-schema directory / Parquet file / glob",
        "sandbox",
    )
    train_splits: str = _f("Pick-a-Pic splits to train on (comma-separated)", "train")
    eval_splits: str = _f(
        "Pick-a-Pic splits held out (comma-separated, prompt-disjoint from train); '' = hold out "
        "held_out_fraction of the training prompts instead",
        "test,test_unique",
    )
    max_train_pairs: int | None = _f(
        "use at most this many training pairs (first rows / first rendered)", None
    )
    max_eval_pairs: int | None = _f("use at most this many held-out pairs", None)
    num_pairs: int = _f("rendered source: pairs to render (train + held out)", 3000)
    held_out_fraction: float = _f("share of prompts held out when no eval split is used", 0.2)
    p_wrong: float = _f("rendered: probability that a side shows the scene of a wrong caption", 0.3)
    p_hazard: float = _f("rendered: probability of the hazard mark on a side", 0.25)
    p_noise: float = _f("rendered: probability of pixel noise (std 0.06-0.14) on a side", 0.25)
    p_smear: float = _f("rendered: probability of a 3x3 box blur on a side", 0.25)
    temperature: float = _f("Bradley-Terry temperature T of the judge labels: P(0 wins) = σ(Δ/T)", 0.05)
    tie_margin: float = _f("|Δ judge score| below this is a tie (0.5/0.5), per aspect", 0.01)
    tie_policy: str = _f("'drop' ties from the loss, or 'soft' (train them towards equal scores)", "drop")

    # ---- model -----------------------------------------------------------------------------------------------
    backbone: str = _f(
        "transformers CLIPModel + processor directory; 'sandbox' = reward_models/sandbox-clip", "sandbox"
    )
    freeze_backbone: bool = _f("train the heads only (features cached once) instead of fine-tuning", True)
    head_hidden: int = _f("0: linear heads; H > 0: Linear(3D, H) → GELU → Linear(H, 1)", 0)
    fit_overall: bool = _f(
        "fit the 'overall' weights of the aspects to the judge's overall labels (else equal weights)", True
    )
    backbone_storage: str = _f(
        "'reference' (checkpoint points to the frozen backbone directory, no copy), 'copy' (write backbone/), "
        "'auto' (reference when frozen, else copy)",
        "auto",
    )

    # ---- optimisation ----------------------------------------------------------------------------------------
    epochs: int = _f("passes over the training pairs", 30)
    batch_size: int = _f("pairs per optimisation step", 64)
    learning_rate: float = _f("AdamW learning rate of the heads", 3e-3)
    backbone_learning_rate: float = _f("AdamW learning rate of the backbone when fine-tuned", 2e-5)
    weight_decay: float = _f("AdamW weight decay", 1e-2)
    seed: int = _f("seeds the rendered data, the prompt split, the label draws, the heads and the order", 0)
    feature_batch_size: int = _f("images per forward pass when caching features / scoring", 256)
    judge_batch_size: int = _f("images per judge call (progress granularity)", 512)

    # ---- output ----------------------------------------------------------------------------------------------
    output_dir: str = _f("checkpoint directory (config.json, heads.safetensors, metrics.json, README.md)", "")
    progress: bool = _f("show progress bars", True)

    def __post_init__(self) -> None:
        if not self.output_dir:
            self.output_dir = "outputs/reward-model"
        for name, valid in (("tie_policy", TIE_POLICIES), ("backbone_storage", BACKBONE_STORAGE)):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"config field {name}={getattr(self, name)!r} is not valid; choose one of {valid}"
                )
        if self.backbone_storage == "reference" and not self.freeze_backbone:
            raise ValueError(
                "backbone_storage='reference' needs freeze_backbone=true: a fine-tuned backbone differs from the "
                "directory it came from, so it must be copied (backbone_storage='copy' or 'auto')"
            )
        for name in ("epochs", "batch_size", "num_pairs", "feature_batch_size", "judge_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name}={getattr(self, name)} must be >= 1")
        for name in ("p_wrong", "p_hazard", "p_noise", "p_smear"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"config field {name}={getattr(self, name)} must lie in [0, 1]")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction={self.held_out_fraction} must lie in (0, 1)")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)) or self.tie_margin < 0:
            raise ValueError("temperature must be finite and >= 0, tie_margin >= 0")
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden={self.head_hidden} must be >= 0")

    @property
    def source_kind(self) -> str:
        """``"rendered"`` or ``"pickapic"``."""
        return "rendered" if self.source == "rendered" else "pickapic"

    def render_config(self) -> RenderConfig:
        return RenderConfig(self.p_wrong, self.p_hazard, self.p_noise, self.p_smear)


def resolve_source(source: str) -> str:
    """``"sandbox"`` → the shipped sandbox data directory (``SANDBOX_DATA``), which must be built; anything else
    unchanged."""
    from diffalign.data.sources import resolve_built_dataset

    return resolve_built_dataset(source, instead="train on rendered pairs with --source rendered")


def resolve_backbone(backbone: str) -> Path:
    """``"sandbox"`` → ``reward_models/sandbox-clip``; a directory otherwise (checked)."""
    from diffalign.sandbox import SANDBOX_CLIP

    path = SANDBOX_CLIP if backbone == "sandbox" else Path(backbone)
    if not (path / "config.json").is_file():
        hint = (
            "build it with `python scripts/build_sandbox.py`"
            if backbone == "sandbox"
            else "give --backbone a transformers CLIPModel directory (config.json, weights, processor files)"
        )
        raise FileNotFoundError(f"CLIP backbone directory {path} has no config.json: {hint}")
    return path
