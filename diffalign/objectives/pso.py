r"""PSO: pairwise sample optimisation for timestep-distilled few-step models (Miao et al., ICLR 2025, arXiv 2410.03190).

Plain diffusion fine-tuning (Diffusion-DPO included) trains a distilled model (SDXL-Turbo, LCM, DMD2, the sandbox's
``sandbox-4step``) at every ``t`` against the data's denoising target, pulling it back towards a many-step denoiser:
its few-step samples blur. PSO trains only at the model's **own sampling timesteps** and widens the likelihood margin
between *target* images and *reference* images **sampled from the current distilled model**, so the model is compared
with itself at the steps it actually takes.

**Offline / customisation form** (``pso``, ``pso_hinge``; the offline-pairs loop). Slot 0 of every pair is the target
image (the preferred image of a preference pair, or a subject's reference photo); slot 1 is replaced by a sample of the
current model for the pair's caption (:mod:`diffalign.training.model_samples`: ``model_sample_steps`` steps,
``model_sample_guidance``, regenerated every ``model_sample_refresh`` optimizer steps; 0 = drawn once, at first use,
as the official customisation script does at step 0). The two images of a pair share ``t``, drawn from
``timestep_grid``, as in the official script, and here also ε (the core's pair stream; the script draws ε per image,
which for two unrelated images changes only the variance). Errors are ``σ_t⁻²``-weighted x̂0 errors ``L = ᾱ/(1−ᾱ)·mean(x̂0 − x0)²`` (EDM style, the official
``weighting = sigmas**-2``; for an ε-prediction model this equals the ε error). Per pair::

    pso        (with a reference model, the paper's general form)
        logits = (Lref_w − Lθ_w) − γ·(Lref_l − Lθ_l)
        loss   = −log σ(β·logits) + prior_weight·Lθ_l
    pso_hinge  (no reference model: the official customisation script, loss_type "pso_db")
        logits = −(Lθ_w − γ·Lθ_l)
        loss   = relu(1 − β·logits) + prior_weight·Lθ_l

γ (``neg_defactor``) < 1 lets the model keep most of its likelihood on its own samples; the prior term
``prior_weight·Lθ_l`` keeps it fitting them (the official 0.5) so that it does not forget how it samples.
As coded, the official customisation script draws a grid index ``k`` and trains at ``scheduler.timesteps[250k + 249]``
of a 1000-step Euler schedule, which is descending, so it visits t ∈ {750, 500, 250, 0}, not the sampling grid
{999, 749, 499, 249} its comment names; ``timestep_grid`` here is the model's own grid (set it to ``[0, 250, 500,
750]`` to reproduce the script).

**The dataset's own pairs** (``pso_pairs``; an ablation, not the paper's method). The paper presents PSO as a
general formulation that covers the popular preference objectives: with the data's rejected image in slot 1 instead
of a sample of the model, ``pso``'s loss is Diffusion-DPO restricted to the distilled model's own timesteps (γ 1, no
prior term, ``error_weighting: snr`` on an ε-prediction model: exactly DPO's ε errors at ``timestep_grid``). What PSO
adds on top, the references sampled from the current model, is then absent; the pair isolates the other half of the
paper's argument, training only where the model samples.

**Online form** (``pso_online``; the online loop). Two (or more) trajectories per prompt from independent ``x_T``
with the model's few-step sampler (Euler-ancestral at 4 steps, no guidance: ``sampler: euler_ancestral``), scored by a
learned reward; the last step is deterministic and not trained. For every within-prompt pair with ``r_w > r_l``
(equal rewards: no pair; the official script counts a tie as a win of the second image), per trained step ``s``::

    ρ_s    = clamp(log π_θ(x_{s−1}|x_s) − log π_ref(x_{s−1}|x_s), log(1 − ε), log(1 + ε))
    loss_s = −log σ(β·(ρ_s(w) − ρ_s(l)))              loss = mean_s loss_s

the log of the official ``clamp(exp(logp_θ − logp_ref), 1 − ε, 1 + ε)`` (the same value and zero gradient outside the
range). The reference is the model without its LoRA (the official ``disable_adapters()``), not θ_old. Log-probs are
per-element means (:class:`~diffalign.objectives.inputs.TrajectoryLogProbs`), the official convention too, so its β 50
and ε 0.1 carry over unchanged. The official script steps the optimizer once per step ``s``; the mean over steps here is
one update over the same terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..utils.lazy import lazy_module
from .inputs import PairErrors, TrajectoryLogProbs
from .registry import ObjectiveSpec

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

PSO_METRICS = ("reward_margin", "target_err", "sample_err", "implicit_acc", "prior")
PSO_ONLINE_METRICS = ("pairs", "clip_frac", "margin", "log_ratio")
DISTILLED_GRID = [249, 499, 749, 999]  # SDXL-Turbo's (and sandbox-4step's) four sampling timesteps


def _check_same_shape(name: str, *tensors) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"{name} expects tensors of one shape [B], got shapes {sorted(shapes)}")


def _pso_metrics(logits, model_w, model_l, prior):
    return {
        "reward_margin": logits.detach(),  # the logits (named as DPO's margin: held-out accuracy reads it)
        "target_err": model_w.detach(),
        "sample_err": model_l.detach(),
        "implicit_acc": (logits.detach() > 0).float(),
        "prior": prior.detach(),
    }


def pso_loss(model_w, model_l, ref_w, ref_l, *, beta: float, gamma: float, prior_weight: float):
    """PSO with a reference model: ``−log σ(β·[(ref_w − θ_w) − γ·(ref_l − θ_l)]) + prior_weight·θ_l`` per pair.

    ``model_*``/``ref_*`` ``[B]``: errors of the target image (``w``) and of the model's own sample (``l``) under the
    trained model and the frozen reference. Returns ``(loss [B], metrics)`` (metric names :data:`PSO_METRICS`)."""
    _check_same_shape("pso_loss", model_w, model_l, ref_w, ref_l)
    m_w, m_l = model_w.float(), model_l.float()
    logits = (ref_w.detach().float() - m_w) - gamma * (ref_l.detach().float() - m_l)
    prior = prior_weight * m_l
    loss = -F.logsigmoid(beta * logits) + prior
    return loss, _pso_metrics(logits, m_w, m_l, prior)


def pso_hinge_loss(model_w, model_l, *, beta: float, gamma: float, prior_weight: float):
    """PSO without a reference (official customisation, ``loss_type="pso_db"``):
    ``relu(1 + β·(θ_w − γ·θ_l)) + prior_weight·θ_l`` per pair (``logits = −(θ_w − γ·θ_l)``)."""
    _check_same_shape("pso_hinge_loss", model_w, model_l)
    m_w, m_l = model_w.float(), model_l.float()
    logits = -(m_w - gamma * m_l)
    prior = prior_weight * m_l
    loss = torch.relu(1.0 - beta * logits) + prior
    return loss, _pso_metrics(logits, m_w, m_l, prior)


def pso_online_loss(log_prob, log_prob_ref, rewards, groups, *, beta: float, clip_range: float):
    """Online PSO per within-prompt pair (module docstring). ``log_prob``/``log_prob_ref`` ``[n, s]`` (trained model
    with gradient; reference), ``rewards``/``groups`` ``[n]``.

    Returns ``(loss [P], metrics)``: one loss per pair ``(a, b)`` with ``groups[a] == groups[b]`` and ``rewards[a] >
    rewards[b]``, ordered by ``a`` then ``b``; without any pair a single 0 still connected to ``log_prob``. Metrics:
    ``pairs`` ``[1]``; ``clip_frac`` ``[n]`` share of each trajectory's steps whose log-ratio is clamped; ``margin``
    ``[P]`` β·mean_s(ρ_s(w) − ρ_s(l)); ``log_ratio`` ``[n]`` mean_s of the unclamped log-ratio."""
    if log_prob.dim() != 2 or log_prob_ref is None or tuple(log_prob_ref.shape) != tuple(log_prob.shape):
        raise ValueError(
            f"pso_online_loss expects log_prob and log_prob_ref of one shape [n, s], got {tuple(log_prob.shape)} "
            f"and {None if log_prob_ref is None else tuple(log_prob_ref.shape)}"
        )
    n = log_prob.shape[0]
    if tuple(rewards.shape) != (n,) or tuple(groups.shape) != (n,):
        raise ValueError(f"pso_online_loss: rewards and groups must have shape [{n}]")
    if not beta > 0 or not 0 < clip_range < 1:
        raise ValueError(f"pso_online_loss needs beta > 0 and 0 < clip_range < 1, got {beta}, {clip_range}")
    device = log_prob.device
    raw = log_prob.float() - log_prob_ref.detach().to(device, torch.float32)
    lo, hi = math.log(1.0 - clip_range), math.log(1.0 + clip_range)
    rho = raw.clamp(lo, hi)
    rewards = rewards.detach().to(device, torch.float32)
    groups = groups.detach().to(device)
    valid = (groups[:, None] == groups[None, :]) & (rewards[:, None] > rewards[None, :])
    a, b = valid.nonzero(as_tuple=True)
    per_traj = {
        "clip_frac": ((raw.detach() < lo) | (raw.detach() > hi)).float().mean(dim=1),
        "log_ratio": raw.detach().mean(dim=1),
    }
    pairs = torch.tensor([float(a.numel())], device=device)
    if a.numel() == 0:
        zero = torch.zeros(1, device=device)
        return (log_prob.sum() * 0.0).reshape(1), {"pairs": pairs, "margin": zero, **per_traj}
    inside = beta * (rho[a] - rho[b])  # [P, s]
    loss = -F.logsigmoid(inside).mean(dim=1)
    return loss, {"pairs": pairs, "margin": inside.detach().mean(dim=1), **per_traj}


# ---------------------------------------------------------------------------------------------------------------
# Registry entries


@dataclass
class PSOPairsParams:
    """``pso_pairs`` (PSO's loss on the dataset's pairs): the hyperparameters every offline PSO form shares."""

    beta: float = field(default=5.0, metadata={"help": "β inside the loss (official customisation: 5)"})
    gamma: float = field(
        default=1.0,
        metadata={"help": "γ: weight of the second image (the rejected one) in the margin (1: symmetric)"},
    )
    prior_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the prior term, a denoising loss on the second image (0: none)"},
    )
    timestep_grid: list[int] = field(
        default_factory=lambda: list(DISTILLED_GRID),
        metadata={"help": "the distilled model's sampling timesteps; t is drawn from them only"},
    )
    error_weighting: str = field(
        default="snr", metadata={"help": "x̂0 error weighting: 'snr' (σ⁻², official) or 'none'"}
    )

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"config field beta must be > 0, got {self.beta}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"config field gamma must be in [0, 1] (official 0.1), got {self.gamma}")
        if not self.prior_weight >= 0:
            raise ConfigError(f"config field prior_weight must be >= 0, got {self.prior_weight}")
        if not self.timestep_grid:
            raise ConfigError(
                "config field timestep_grid is empty: give the model's timesteps, e.g. [249, 499, 749, 999]"
            )
        if self.error_weighting not in ("snr", "none"):
            raise ConfigError(
                f"config field error_weighting must be 'snr' or 'none', got {self.error_weighting!r}"
            )
        self.timestep_grid = [int(t) for t in self.timestep_grid]


@dataclass
class PSOParams(PSOPairsParams):
    """Offline PSO hyperparameters against the model's own samples (flat ``--flags`` and YAML keys)."""

    gamma: float = field(
        default=0.1,
        metadata={"help": "γ (official neg_defactor): weight of the model's own samples in the margin"},
    )
    prior_weight: float = field(
        default=0.5,
        metadata={
            "help": "weight of the prior term on the model's own samples (official prior_loss_weight 0.5)"
        },
    )
    model_sample_steps: int = field(
        default=4, metadata={"help": "sampling steps of the model's own samples (slot 1 of every pair)"}
    )
    model_sample_guidance: float = field(
        default=0.0,
        metadata={
            "help": "classifier-free guidance of those samples (<= 1: none, as distilled models sample)"
        },
    )
    model_sample_sampler: str = field(
        default="euler_ancestral",
        metadata={
            "help": "sampler of those samples: euler_ancestral (SDXL-Turbo), lcm (LCM, DMD2), ddim or ddpm (η 1)"
        },
    )
    model_sample_refresh: int = field(
        default=0,
        metadata={
            "help": "redraw a pair's model sample when it is older than N optimizer steps (0: drawn once, at first "
            "use, as the official customisation script)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_sample_steps < 1 or self.model_sample_refresh < 0:
            raise ConfigError(
                "config fields model_sample_steps must be >= 1 and model_sample_refresh >= 0, got "
                f"{self.model_sample_steps} and {self.model_sample_refresh}"
            )
        if self.model_sample_sampler not in ("euler_ancestral", "lcm", "ddim", "ddpm"):
            raise ConfigError(
                "config field model_sample_sampler must be euler_ancestral, lcm, ddim or ddpm, got "
                f"{self.model_sample_sampler!r}"
            )


@dataclass
class PSOOnlineParams:
    """Online PSO hyperparameters (flat ``--flags`` and YAML keys)."""

    beta: float = field(default=50.0, metadata={"help": "β on the per-step clamped log-ratios (official 50)"})
    clip_range: float = field(
        default=0.1, metadata={"help": "ε: the per-step ratio to the reference is clamped to [1 − ε, 1 + ε]"}
    )

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"config field beta must be > 0, got {self.beta} (official 50)")
        if not 0 < self.clip_range < 1:
            raise ConfigError(
                f"config field clip_range must be in (0, 1), got {self.clip_range} (official 0.1)"
            )


def _pso(x: PairErrors, p: PSOParams):
    return pso_loss(
        x.model_w, x.model_l, x.ref_w, x.ref_l, beta=p.beta, gamma=p.gamma, prior_weight=p.prior_weight
    )


def _pso_hinge(x: PairErrors, p: PSOParams):
    return pso_hinge_loss(x.model_w, x.model_l, beta=p.beta, gamma=p.gamma, prior_weight=p.prior_weight)


def _pso_online(x: TrajectoryLogProbs, p: PSOOnlineParams):
    return pso_online_loss(
        x.log_prob, x.log_prob_ref, x.rewards, x.groups, beta=p.beta, clip_range=p.clip_range
    )


_OFFLINE = dict(
    params=PSOParams,
    inputs="pair_errors",
    timesteps="grid",
    error_space="x0",
    loser_source="model_samples",
    metric_prefix="pso",
)
_PAIRS = {**_OFFLINE, "params": PSOPairsParams, "loser_source": "data"}

SPECS = {
    "pso": ObjectiveSpec(
        name="pso",
        loss=_pso,
        description="PSO (Miao et al. 2025): target images against the distilled model's own samples, at its own "
        "timesteps, σ⁻²-weighted x̂0 errors, with a reference model",
        needs_reference=True,
        **_OFFLINE,
    ),
    "pso_hinge": ObjectiveSpec(
        name="pso_hinge",
        loss=_pso_hinge,
        description="PSO without a reference model (the official customisation loss: hinge + prior term)",
        needs_reference=False,
        **_OFFLINE,
    ),
    "pso_pairs": ObjectiveSpec(
        name="pso_pairs",
        loss=_pso,
        description="ablation: PSO's loss on the dataset's pairs (preferred against rejected, no model samples), i.e. "
        "Diffusion-DPO at the distilled model's own timesteps, σ⁻²-weighted x̂0 errors, with a reference model",
        needs_reference=True,
        **_PAIRS,
    ),
    "pso_online": ObjectiveSpec(
        name="pso_online",
        loss=_pso_online,
        params=PSOOnlineParams,
        description="online PSO (Miao et al. 2025): two few-step trajectories per prompt, the better by a reward; "
        "per-step log-ratio to the reference clamped to [1-ε, 1+ε], β",
        loop="online",
        inputs="trajectory_logprobs",
        needs_reference=True,
        metric_prefix="pso",
        min_images_per_prompt=2,
    ),
}
