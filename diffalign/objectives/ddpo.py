r"""DDPO: PPO-clip over the denoising steps (Black et al. 2023, arXiv 2305.13301), as the official ``ddpo-pytorch``.

Each denoising step of a stochastic sampler (DDIM with η > 0) is an action; the reward of the final image, turned
into an advantage ``A`` per trajectory, is credited to every step. With ``ρ = π_θ(x_{t−1}|x_t) / π_old(x_{t−1}|x_t)``
per step (θ_old the frozen snapshot that sampled the trajectory)::

    A    = clip(advantage, −adv_clip_max, adv_clip_max)
    loss = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))          per (trajectory, step); mean over both

(``scripts/train.py`` of kvablack/ddpo-pytorch: ε = ``clip_range`` 1e-4, ``adv_clip_max`` 5). Log-probs are
per-element means of the Gaussian transition density, as in the official code.

Advantages (:func:`ddpo_prepare_rewards`, once per epoch on the gathered rewards) follow the official
``ddpo_pytorch/stat_tracking.py::PerPromptStatTracker.update``, read for this module (commit 2fda3d4): for each prompt
the epoch's rewards of that prompt are **appended first** to its buffer (a ``deque(maxlen=buffer_size)``, so the
oldest values drop out), **then** the statistics are computed: if the buffer holds fewer than ``min_count`` values,
the mean and ``np.std`` (population, ddof 0) of *all* rewards of the call, else those of the buffer; the advantage is
``(r − mean) / (std + 1e-6)``. With per-prompt tracking off the official script normalises globally with
``(r − mean) / (std + 1e-8)`` (note 1e-8 there), which is what we do too. We compute in float64; the buffers live
in a JSON-serialisable ``state`` dict (``state["per_prompt"][prompt] = [floats]``) that the loop checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..utils.lazy import lazy_module
from .inputs import TrajectoryLogProbs
from .registry import ObjectiveSpec

torch = lazy_module("torch")  # imported on first use: building the command line must not wait for torch
np = lazy_module("numpy")

#: Names of the metrics of the ddpo objective (logged as ``ddpo/<name>``); ``reward`` is added by the adapter.
DDPO_METRICS = ("clip_frac", "approx_kl", "advantage", "reward")

#: ``std + eps`` in the denominators, as the official code has them.
PER_PROMPT_STD_EPS = 1e-6
GLOBAL_STD_EPS = 1e-8


def ddpo_loss(
    log_prob: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's PPO-clip loss per (trajectory, step).

    Args:
        log_prob: ``[n, s]`` per-step log-probs under the trained model (carries the gradient).
        log_prob_old: ``[n, s]`` under θ_old, the sampling snapshot (detached here).
        advantages: ``[n]`` per trajectory (from :func:`ddpo_prepare_rewards`); clamped to ``±adv_clip_max``.
        clip_range: ε > 0 of the ratio clip ``[1 − ε, 1 + ε]``.
        adv_clip_max: > 0.

    Returns:
        ``(loss[n·s], metrics)``, the loss flattened trajectory-major. Metrics (detached, float32):
        ``clip_frac`` ``[n·s]`` 1 where ``|ρ − 1| > ε``; ``approx_kl`` ``[n]`` 0.5·mean_s (log_prob − log_prob_old)²;
        ``advantage`` ``[n]`` the clamped advantages the loss used.
    """
    shape = tuple(log_prob.shape)
    if len(shape) != 2 or tuple(log_prob_old.shape) != shape or tuple(advantages.shape) != shape[:1]:
        raise ValueError(
            f"ddpo_loss expects log_prob and log_prob_old of shape [n, s] and advantages [n], got "
            f"{shape}, {tuple(log_prob_old.shape)}, {tuple(advantages.shape)}"
        )
    if not clip_range > 0 or not adv_clip_max > 0:
        raise ValueError(
            f"ddpo_loss needs clip_range > 0 and adv_clip_max > 0, got {clip_range}, {adv_clip_max}"
        )
    lp = log_prob.float()
    lp_old = log_prob_old.detach().to(lp.device, torch.float32)
    adv = advantages.detach().to(lp.device, torch.float32).clamp(-adv_clip_max, adv_clip_max)

    ratio = torch.exp(lp - lp_old)
    unclipped = -adv[:, None] * ratio
    clipped = -adv[:, None] * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).reshape(-1)
    metrics = {
        "clip_frac": ((ratio.detach() - 1.0).abs() > clip_range).float().reshape(-1),
        "approx_kl": 0.5 * ((lp.detach() - lp_old) ** 2).mean(dim=1),
        "advantage": adv,
    }
    return loss, metrics


def per_prompt_advantages(
    rewards: Any, prompts: Sequence[str], state: dict, *, buffer_size: int, min_count: int
) -> np.ndarray:
    """Official ``PerPromptStatTracker.update`` (module docstring), buffers kept in ``state["per_prompt"]``.

    Returns float64 advantages ``[M]``; ``state`` is updated in place with Python floats only.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    prompts = [str(p) for p in prompts]
    if len(prompts) != r.shape[0]:
        raise ValueError(f"per_prompt_advantages: {len(prompts)} prompts for {r.shape[0]} rewards")
    buffers = state.setdefault("per_prompt", {})
    advantages = np.zeros_like(r)
    if r.size == 0:
        return advantages
    names = np.asarray(prompts, dtype=object)
    for prompt in dict.fromkeys(prompts):  # first-appearance order; prompts are independent of each other
        mask = names == prompt
        buffer = (list(buffers.get(prompt, [])) + [float(v) for v in r[mask]])[-buffer_size:]
        buffers[prompt] = buffer
        stats = r if len(buffer) < min_count else np.asarray(buffer, dtype=np.float64)
        advantages[mask] = (r[mask] - np.mean(stats)) / (np.std(stats) + PER_PROMPT_STD_EPS)
    return advantages


def global_advantages(rewards: Any) -> np.ndarray:
    """``(r − mean) / (std + 1e-8)`` over all rewards of the call (the official script without stat tracking)."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return r
    return (r - r.mean()) / (r.std() + GLOBAL_STD_EPS)


def ddpo_prepare_rewards(
    rewards: Any, prompts: Sequence[str], params: DDPOParams, state: dict
) -> torch.Tensor:
    """The spec's ``prepare_rewards``: an epoch's rewards ``[M]`` (Tensor or array) → advantages ``Tensor[M]`` float32.

    ``prompts[i]`` is the prompt of ``rewards[i]``; ``state`` is the loop's persisted dict (JSON-serialisable).
    """
    if hasattr(rewards, "detach"):
        rewards = rewards.detach().double().cpu().numpy()
    if params.per_prompt_stat_tracking:
        adv = per_prompt_advantages(
            rewards, prompts, state, buffer_size=params.stat_buffer_size, min_count=params.stat_min_count
        )
    else:
        adv = global_advantages(rewards)
    return torch.as_tensor(adv, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Registry entry (diffalign.objectives.registry)


@dataclass
class DDPOParams:
    """DDPO hyperparameters (flat ``--flags`` and YAML keys); defaults are the official ddpo-pytorch ones."""

    clip_range: float = field(
        default=1e-4, metadata={"help": "PPO ratio clip ε: ρ is clipped to [1 − ε, 1 + ε] (official 1e-4)"}
    )
    adv_clip_max: float = field(
        default=5.0, metadata={"help": "advantages are clamped to ±adv_clip_max (official 5)"}
    )
    per_prompt_stat_tracking: bool = field(
        default=True,
        metadata={"help": "normalise rewards per prompt over recent epochs (official); off: over the epoch"},
    )
    stat_buffer_size: int = field(
        default=16, metadata={"help": "recent rewards kept per prompt for its mean/std (official 16)"}
    )
    stat_min_count: int = field(
        default=16,
        metadata={
            "help": "a prompt with fewer buffered rewards uses the epoch's mean/std instead (official 16)"
        },
    )

    def __post_init__(self) -> None:
        if not self.clip_range > 0:
            raise ConfigError(f"config field clip_range must be > 0, got {self.clip_range}")
        if not self.adv_clip_max > 0:
            raise ConfigError(f"config field adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.stat_buffer_size < 1:
            raise ConfigError(f"config field stat_buffer_size must be >= 1, got {self.stat_buffer_size}")
        if self.stat_min_count < 1:
            raise ConfigError(f"config field stat_min_count must be >= 1, got {self.stat_min_count}")
        if self.per_prompt_stat_tracking and self.stat_min_count > self.stat_buffer_size:
            raise ConfigError(
                f"config field stat_min_count={self.stat_min_count} exceeds stat_buffer_size="
                f"{self.stat_buffer_size}: a buffer never reaches it, so per-prompt statistics would never be used"
            )


def _ddpo_objective(x: TrajectoryLogProbs, p: DDPOParams):
    if x.advantages is None:
        raise ValueError("ddpo needs advantages: the loop must call the spec's prepare_rewards each epoch")
    loss, metrics = ddpo_loss(
        x.log_prob, x.log_prob_old, x.advantages, clip_range=p.clip_range, adv_clip_max=p.adv_clip_max
    )
    metrics["reward"] = x.rewards.detach().to(loss.device, torch.float32).reshape(-1)
    return loss, metrics


SPECS = {
    "ddpo": ObjectiveSpec(
        name="ddpo",
        loss=_ddpo_objective,
        description="DDPO (Black et al. 2023): PPO-clip over denoising steps with per-prompt reward normalisation",
        params=DDPOParams,
        loop="online",
        inputs="trajectory_logprobs",
        needs_reference=False,
        metric_prefix="ddpo",
        prepare_rewards=ddpo_prepare_rewards,
    ),
}
