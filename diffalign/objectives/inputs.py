"""What a step hands an objective: per-pair denoising errors (offline pairs) or trajectory log-probs (online)."""

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


@dataclass
class TrajectoryLogProbs:
    """Per-step log-probabilities of stored sampling transitions, for online methods (PRDP, DDPO).

    Shapes: ``n`` trajectories of this micro-batch, ``s`` trained steps each (the same step positions for all
    trajectories of one prompt). Log-probs are per-element means of the Gaussian transition density
    (:func:`diffalign.diffusion.ddim.ddim_step_with_logprob`, ``reduction="mean"``).

    - ``log_prob`` ``[n, s]``: under the model being trained (carries the gradient);
    - ``log_prob_old`` ``[n, s]``: under θ_old, the frozen snapshot that sampled them (recorded while sampling);
    - ``log_prob_ref`` ``[n, s]`` or ``None``: under the reference (base) model, when the spec needs one;
    - ``rewards`` ``[n]`` float32: the reward of each trajectory's final image;
    - ``groups`` ``[n]`` long: the prompt of each trajectory (all images of one prompt are in the same micro-batch);
    - ``advantages`` ``[n]`` or ``None``: what the spec's ``prepare_rewards`` made of the epoch's rewards.
    """

    log_prob: Tensor
    log_prob_old: Tensor
    rewards: Tensor
    groups: Tensor
    log_prob_ref: Tensor | None = None
    advantages: Tensor | None = None
