"""Diffusion maths as pure functions: pair-shared timesteps and noise, noising, targets, per-sample errors.

Stacked pair layout: ``[w_0..w_{B-1}, l_0..l_{B-1}]`` (winners first half, losers second); see :mod:`.noise`.
DDIM transitions for later methods (PRDP, InPO, DDPO-style sampling) are in :mod:`.ddim`.
"""

from diffalign.diffusion.ddim import (
    LOGPROB_REDUCTIONS,
    ddim_invert,
    ddim_step_with_logprob,
    ddim_transition,
    inversion_timesteps,
    predict_x0_and_eps,
)
from diffalign.diffusion.noise import (
    PREDICTION_TYPES,
    add_noise,
    implied_noise,
    pair_noise,
    per_sample_mse,
    prediction_target,
    repeat_for_pair,
    sample_pair_timesteps,
    scheduler_alphas_cumprod,
    split_pair,
)

__all__ = [
    "LOGPROB_REDUCTIONS",
    "ddim_invert",
    "ddim_step_with_logprob",
    "ddim_transition",
    "inversion_timesteps",
    "predict_x0_and_eps",
    "PREDICTION_TYPES",
    "add_noise",
    "implied_noise",
    "pair_noise",
    "per_sample_mse",
    "prediction_target",
    "repeat_for_pair",
    "sample_pair_timesteps",
    "scheduler_alphas_cumprod",
    "split_pair",
]
