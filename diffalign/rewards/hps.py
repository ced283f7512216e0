"""Human Preference Score v2 / v2.1 (Wu et al., 2023, arXiv 2306.09341) from a local checkpoint.

As the authors load it (``hpsv2/img_score.py``): open_clip ``ViT-H-14``, the HPS checkpoint's state dict (stored under
``"state_dict"`` in ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``) loaded over it; images go through the eval
transform of HPSv2's open_clip fork, ``ResizeMaxSize(224, fill=0)`` (resize the longer side to 224, bicubic, pad black
to 224 × 224, centred) then ``ToTensor`` and CLIP normalisation; the score is the diagonal of
``image_features @ text_features.T`` with L2-normalised features, i.e. the **cosine** (about 0.2–0.35; papers often
report it × 100, e.g. "HPSv2 28.16").

No ``hpsv2`` package and no download: the checkpoint is a local file (hub id ``xswu/HPSv2``).
"""

from __future__ import annotations

import os

import torch

from diffalign.rewards.clip import OpenClipReward

HPS_VERSIONS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def load_hps(
    checkpoint: str | os.PathLike,
    *,
    version: str = "v2.1",
    arch: str = "ViT-H-14",
    model_config: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    differentiable: bool = False,
) -> OpenClipReward:
    """HPSv2 (``version="v2.0"``) or HPSv2.1 (``"v2.1"``) as an :class:`OpenClipReward` named ``hpsv2``/``hpsv2.1``.

    Args:
        checkpoint: local path of ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` (hub: ``xswu/HPSv2``).
        arch, model_config: open_clip architecture (``ViT-H-14`` for the released checkpoints; tests use a tiny one).
    """
    if version not in HPS_VERSIONS:
        raise ValueError(f"HPS version must be one of {sorted(HPS_VERSIONS)}, got {version!r}")
    name = "hpsv2" if version == "v2.0" else "hpsv2.1"
    return OpenClipReward.from_pretrained(
        arch,
        checkpoint,
        model_config=model_config,
        device=device,
        dtype=dtype,
        name=name,
        resize="longest_pad",
        scale=1.0,
        batch_size=batch_size,
        differentiable=differentiable,
    )
