"""ImageReward (Xu et al., NeurIPS 2023, arXiv 2304.05977): loader skeleton, not implemented yet.

What the authors' model is (from the paper and the ``ImageReward`` package): BLIP (ViT-L/16 image encoder at 224 px,
BERT-base text encoder with cross-attention to the image tokens; tokenizer ``bert-base-uncased``, prompts padded to
35 tokens), the text encoder's first-token state fed to an MLP ``768 → 1024 → 128 → 64 → 16 → 1``, and the output
standardised as ``(s − 0.16717362830052426) / 1.0333394966054072``. Images: bicubic resize of the shorter side to
224, centre crop, CLIP normalisation.

Why it is not implemented: the released ``ImageReward.pt`` stores the *original* Salesforce BLIP parameter names.
transformers' BLIP classes can hold the model, but mapping those names onto them is a conversion that cannot be
checked here without the real checkpoint and a reference score, and a silently wrong mapping would give plausible
but meaningless rewards. Until it is verified, loading raises :class:`NotImplementedError` (after the catalog has
checked that the weight files exist).
"""

from __future__ import annotations

import torch

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


def load_imagereward(
    weights: dict, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **_
):
    """Not implemented (see the module docstring); raises ``NotImplementedError`` naming what is missing."""
    raise NotImplementedError(
        "ImageReward is not supported yet: converting the original BLIP parameter names of "
        f"{weights.get('checkpoint', 'ImageReward.pt')} to transformers' BlipModel is unverified. Use pickscore, "
        "hpsv2.1 or aesthetic, or score with the `image-reward` package outside diffalign."
    )
