"""What the offline-pairs step hands an objective: per-pair denoising errors (and soft labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class PairErrors:
    """Per-pair errors ``[B]`` of the trained model and (when the spec asks for one) the reference.

    ``model_l``/``ref_l`` are ``None`` for objectives that train on winners only; ``ref_*`` are ``None`` without a
    reference. ``label_w`` ``[B]`` is the probability that the slot-0 image ("winner") is preferred: 1 for decided
    pairs, 0.5 for ties kept with ``tie_policy: keep``; ``None`` means all 1.
    """

    model_w: Tensor
    model_l: Tensor | None = None
    ref_w: Tensor | None = None
    ref_l: Tensor | None = None
    label_w: Tensor | None = None
