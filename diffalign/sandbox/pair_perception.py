"""A perception stand-in for the vision-language model PPD reads preference pairs with, on the sandbox.

The paper (Dang et al., CVPR 2025) embeds a user from the hidden states of LLaVA-OneVision reading a few of the
user's pairs: a model that *sees* what differs between the chosen and the rejected image (larger, darker, warmer,
outlined ...) and what the caption asked for. The sandbox's tiny CLIP does not: the difference of its embeddings
over 4 context pairs identifies an unseen user no better than chance (``docs/sandbox.md``). This featuriser gives the
encoder what such a VLM would read, from the judge's image analysis (:func:`diffalign.sandbox.judge.analyze`):

    per pair:  [ m ⊙ (v(pref) − v(rej)),  m ⊙ (v(pref) + v(rej)),  m ]          F = 3 × 9 = 27
    v(image)   the 9 taste-component values of the image (large, small, contrast, centred, light/dark background,
               outlined, warm, cool: diffalign.sandbox.user_population.COMPONENT_NAMES), each in [0, 1]
    m          1 where the caption leaves that component's attribute open, else 0 (what the caption did not ask)

It reads the images and the caption only — never the user's weights or scores — so the projector still has to learn
which differences a user's choices reveal, from 4 noisy pairs. It is an *oracle perception* (the judge's own
attribute read-out), not a learned model: results with it say what PPD does when the encoder perceives well, and are
labelled as such next to the CLIP encoder's (``user_encoder: sandbox-attributes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .judge import analyze, parse_prompts, to_uint8_batch
from .user_population import COMPONENT_NAMES, component_values, open_mask

NAME = "sandbox-attributes"


class AttributePairFeaturizer:
    """``features(captions, preferred, rejected) -> [P, 27]`` (the module docstring); frozen, deterministic."""

    kind = "attributes"

    def __init__(self, model_path: str = NAME, **_: Any) -> None:
        self.model_path = NAME
        self.dim = 3 * len(COMPONENT_NAMES)
        self.odd_dims = len(COMPONENT_NAMES)  # the difference block

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_path": self.model_path}

    def features(self, captions: Sequence[str], preferred: Any, rejected: Any) -> torch.Tensor:
        pref = to_uint8_batch(np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
                                        for im in preferred]))  # fmt: skip
        rej = to_uint8_batch(np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
                                       for im in rejected]))  # fmt: skip
        if not len(captions) == len(pref) == len(rej):
            raise ValueError(f"{len(captions)} captions, {len(pref)} preferred, {len(rej)} rejected images")
        vp, _ = component_values([analyze(im) for im in pref])
        vr, _ = component_values([analyze(im) for im in rej])
        m = open_mask(parse_prompts(list(captions), len(captions))).astype(np.float64)
        out = np.concatenate([m * (vp - vr), m * (vp + vr), m], axis=1)
        return torch.from_numpy(out).float()
