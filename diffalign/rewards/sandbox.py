"""The sandbox world's rewards: the programmatic judge, and the tiny CLIP trained on sandbox captions.

- :class:`SandboxJudgeReward` wraps :class:`diffalign.sandbox.judge.Judge` (deterministic, pure numpy, 32 × 32
  images): ``score`` is one judge aspect (default ``"overall"``), ``score_aspects`` returns every key of the judge
  (``prompt_following``, ``aesthetic``, ``fidelity``, ``harmlessness``, ``overall`` and ``pf/<attr>`` with NaN where
  the caption leaves an attribute open). All scores are in [0, 1]. Not differentiable.
- :func:`sandbox_clip_reward` is the transformers CLIP path (:class:`~diffalign.rewards.hf_clip.HFClipReward`,
  raw cosine) on ``reward_models/sandbox-clip`` (a ``CLIPModel`` + ``CLIPProcessor`` directory).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffalign.rewards.base import ImageInput, check_prompts, to_pil_list


class SandboxJudgeReward:
    """The sandbox judge as a :class:`~diffalign.rewards.base.Reward` (no parameters, CPU, not differentiable).

    Args:
        aspect: which judge key ``score`` returns (``"overall"`` or one of the four aspects).
        device: where the returned score tensors are put.
    """

    def __init__(
        self, aspect: str = "overall", *, name: str | None = None, device: torch.device | str = "cpu"
    ) -> None:
        from diffalign.sandbox.judge import ASPECTS, Judge

        valid = (*ASPECTS, "overall")
        if aspect not in valid:
            raise ValueError(f"aspect must be one of {valid}, got {aspect!r}")
        self.judge = Judge()
        self.aspect = aspect
        self.aspects = valid
        self.name = name or ("sandbox-judge" if aspect == "overall" else f"sandbox-judge/{aspect}")
        self.device = torch.device(device)
        self.differentiable = False

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SandboxJudgeReward:
        """Move where results are returned (the judge itself runs in numpy; ``dtype`` is ignored: scores are
        float32)."""
        if device is not None:
            self.device = torch.device(device)
        return self

    def score_aspects(self, images: ImageInput, prompts: Sequence[str] | str) -> dict[str, Tensor]:
        prompts = check_prompts(images, prompts)
        arr = np.stack([np.asarray(im, dtype=np.uint8) for im in to_pil_list(images)])
        out = self.judge.score(arr, prompts)
        return {
            k: torch.as_tensor(np.asarray(v, dtype=np.float32), device=self.device) for k, v in out.items()
        }

    def score(self, images: ImageInput, prompts: Sequence[str] | str) -> Tensor:
        return self.score_aspects(images, prompts)[self.aspect]


def sandbox_clip_reward(
    model_dir: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
    differentiable: bool = False,
):
    """The sandbox CLIP's text–image cosine (an :class:`HFClipReward` named ``sandbox-clip``).

    ``model_dir`` defaults to ``diffalign.sandbox.SANDBOX_CLIP`` (``reward_models/sandbox-clip``).
    """
    from diffalign.rewards.hf_clip import HFClipReward
    from diffalign.sandbox import SANDBOX_CLIP

    model_dir = SANDBOX_CLIP if model_dir is None else model_dir
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(
            f"sandbox CLIP directory {model_dir} not found; build it with scripts/build_sandbox.py "
            "(it writes a transformers CLIPModel + CLIPProcessor there)"
        )
    return HFClipReward.from_pretrained(
        model_dir,
        name="sandbox-clip",
        score="cosine",
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        differentiable=differentiable,
    )
