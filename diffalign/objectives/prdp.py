r"""PRDP: proximal reward difference prediction (Deng et al., CVPR 2024, arXiv 2402.08714).

From the KL-regularised objective ``max E[r] − β·KL(π_θ‖π_ref)`` the optimal policy satisfies
``β·log(π*(τ)/π_ref(τ)) = r(τ) − β·log Z(c)``; for two trajectories of one prompt ``c`` the partition function
cancels, so the model is trained to *predict reward differences* from its log-ratios (a regression, no RL)::

    r̂_θ(τ) = log π_θ(τ) − log π_ref(τ)                      (trajectory log-ratio)
    L      = ( [r̂_θ(τ_a) − r̂_θ(τ_b)] − [r(x0_a) − r(x0_b)] / β )²

As coded in the paper's Appendix G (JAX; there is no official repository), with ``θ_old`` the frozen snapshot that
sampled the trajectories and ε the per-step proximal range::

    log_ratio[n, s] = log π_θ(x_{s−1}|x_s) − log π_ref(x_{s−1}|x_s)
    old[n, s]       = log π_old(x_{s−1}|x_s) − log π_ref(x_{s−1}|x_s)
    clipped[n, s]   = clip(log_ratio, old − ε, old + ε)             (per step; zero gradient where clipped)
    r̂[n]  = mean_s log_ratio,   r̂_c[n] = mean_s clipped             (mean over the steps, not Eq. 21's sum)
    for every pair (a, b) of one prompt with r_a > r_b:              (equal rewards: no pair)
        mse_u = (r̂[a] − r̂[b] − (r_a − r_b)/β)²,   mse_c = (r̂_c[a] − r̂_c[b] − (r_a − r_b)/β)²
        loss  = max(mse_u, mse_c)                                   (PPO-style: the worse of the two)

and the mean over pairs (the training loop's ``.mean()``; it averages within a micro-batch, so micro-batches with
different numbers of pairs weigh their pairs slightly differently under gradient accumulation).

**Scale of β and ε.** Our per-step log-probs are per-element MEANS of the Gaussian transition log-density over the
latent's C·H·W elements (DDPO's convention, :class:`~diffalign.objectives.inputs.TrajectoryLogProbs`), so a
log-ratio here is 1/(C·H·W) of the sum-convention one: for the same behaviour β here is C·H·W times smaller than a
sum-convention β, and ε is on the per-element-mean scale. The paper's Table 4 (β 3e-5 / 3e-6, ε 1e-6 / 1e-4) does
not state its normalisation, so its scale is unverified for ours; the defaults below (β 1.0, ε 1e-4) are
placeholders for the loop owner to calibrate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..utils.lazy import lazy_module
from .inputs import TrajectoryLogProbs
from .registry import ObjectiveSpec

torch = lazy_module("torch")  # imported on first use: building the command line must not wait for torch

#: Names of the metrics returned by :func:`prdp_loss` (logged as ``prdp/<name>``).
PRDP_METRICS = ("pairs", "clip_frac", "pred_diff", "target_diff", "log_ratio", "approx_kl_old")


def _check_shapes(log_prob, log_prob_old, log_prob_ref, rewards, groups) -> None:
    shape = tuple(log_prob.shape)
    if len(shape) != 2:
        raise ValueError(f"prdp_loss expects log_prob of shape [n, s] (trajectories, steps), got {shape}")
    for name, t in (("log_prob_old", log_prob_old), ("log_prob_ref", log_prob_ref)):
        if t is None:
            raise ValueError(
                f"prdp_loss needs {name} [n, s]; PRDP's spec asks the loop for a reference model"
            )
        if tuple(t.shape) != shape:
            raise ValueError(f"prdp_loss: {name} has shape {tuple(t.shape)}, log_prob has {shape}")
    for name, t in (("rewards", rewards), ("groups", groups)):
        if tuple(t.shape) != shape[:1]:
            raise ValueError(
                f"prdp_loss: {name} must have shape [{shape[0]}] (one per trajectory), got {tuple(t.shape)}"
            )


def prdp_loss(
    log_prob: torch.Tensor,
    log_prob_old: torch.Tensor,
    log_prob_ref: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor,
    *,
    beta: float,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PRDP loss per within-prompt pair (module docstring: Appendix G's equations).

    Args:
        log_prob: ``[n, s]`` per-step log-probs under the trained model (carries the gradient).
        log_prob_old: ``[n, s]`` under θ_old, the sampling snapshot (detached here).
        log_prob_ref: ``[n, s]`` under the reference model (detached here).
        rewards: ``[n]`` reward of each trajectory's final image.
        groups: ``[n]`` prompt id of each trajectory; only trajectories of one group are paired.
        beta: KL weight β > 0; the regression target is Δreward/β.
        clip_range: ε > 0, per step, on the per-element-mean log-prob scale.

    Returns:
        ``(loss[P], metrics)``: one loss per pair ``(a, b)`` with ``groups[a] == groups[b]`` and
        ``rewards[a] > rewards[b]``, ordered by ``a`` then ``b``. Without any pair, ``loss`` is a single 0 that is
        still connected to ``log_prob`` (backward works, all gradients 0). Metrics (detached, float32, 1-D, never
        empty): ``pairs`` ``[1]`` number of pairs; ``clip_frac`` ``[P]`` 1 where the clipped mse is strictly the
        larger; ``pred_diff`` ``[P]`` r̂[a] − r̂[b]; ``target_diff`` ``[P]`` (r_a − r_b)/β; ``log_ratio`` ``[n]`` r̂;
        ``approx_kl_old`` ``[n]`` 0.5·mean_s (log_prob − log_prob_old)². Without a pair the per-pair metrics are a
        single 0.
    """
    _check_shapes(log_prob, log_prob_old, log_prob_ref, rewards, groups)
    if not beta > 0 or not clip_range > 0:
        raise ValueError(
            f"prdp_loss needs beta > 0 and clip_range > 0, got beta={beta}, clip_range={clip_range}"
        )
    device = log_prob.device
    lp = log_prob.float()
    lp_old = log_prob_old.detach().to(device, torch.float32)
    lp_ref = log_prob_ref.detach().to(device, torch.float32)
    rewards = rewards.detach().to(device, torch.float32)
    groups = groups.detach().to(device)

    log_ratio = lp - lp_ref
    old = lp_old - lp_ref
    clipped = torch.minimum(torch.maximum(log_ratio, old - clip_range), old + clip_range)
    r_hat = log_ratio.mean(dim=1)
    r_hat_clip = clipped.mean(dim=1)

    valid = (groups[:, None] == groups[None, :]) & (rewards[:, None] > rewards[None, :])
    a, b = valid.nonzero(as_tuple=True)  # row-major: a ascending, then b
    per_traj = {
        "log_ratio": r_hat.detach(),
        "approx_kl_old": 0.5 * ((lp.detach() - lp_old) ** 2).mean(dim=1),
    }
    num_pairs = torch.tensor([float(a.numel())], device=device)
    if a.numel() == 0:
        zero = torch.zeros(1, device=device)
        metrics = {"pairs": num_pairs, "clip_frac": zero, "pred_diff": zero, "target_diff": zero, **per_traj}
        return (log_prob.sum() * 0.0).reshape(1), metrics

    target = (rewards[a] - rewards[b]) / beta
    pred = r_hat[a] - r_hat[b]
    mse_unclipped = (pred - target) ** 2
    mse_clipped = (r_hat_clip[a] - r_hat_clip[b] - target) ** 2
    loss = torch.maximum(mse_unclipped, mse_clipped)
    metrics = {
        "pairs": num_pairs,
        "clip_frac": (mse_clipped > mse_unclipped).float().detach(),
        "pred_diff": pred.detach(),
        "target_diff": target,
        **per_traj,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Registry entry (diffalign.objectives.registry)


@dataclass
class PRDPParams:
    """PRDP hyperparameters (flat ``--flags`` and YAML keys)."""

    beta: float = field(
        default=1.0,
        metadata={
            "help": "the KL weight β; the regression target is Δreward/β (per-element-mean log-prob scale: "
            "C·H·W times smaller than a sum-convention β)"
        },
    )
    clip_range: float = field(
        default=1e-4,
        metadata={
            "help": "proximal range ε per step around θ_old's log-ratio, on the per-element-mean log-prob scale"
        },
    )

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"config field beta must be > 0, got {self.beta} (the target is Δreward/β)")
        if not self.clip_range > 0:
            raise ConfigError(f"config field clip_range must be > 0, got {self.clip_range}")


def _prdp_objective(x: TrajectoryLogProbs, p: PRDPParams):
    return prdp_loss(
        x.log_prob,
        x.log_prob_old,
        x.log_prob_ref,
        x.rewards,
        x.groups,
        beta=p.beta,
        clip_range=p.clip_range,
    )


SPECS = {
    "prdp": ObjectiveSpec(
        name="prdp",
        loss=_prdp_objective,
        description="PRDP (Deng et al. 2024): reward-difference regression on trajectory log-ratios, "
        "proximal per-step clipping",
        params=PRDPParams,
        loop="online",
        inputs="trajectory_logprobs",
        needs_reference=True,
        metric_prefix="prdp",
        min_images_per_prompt=2,
    ),
}
