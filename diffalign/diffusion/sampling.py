"""Stochastic sampling that records its trajectory and the log-probability of every transition, and re-scoring of
stored transitions under another model: the sampling half of online methods (PRDP, DDPO, online PSO).

A trajectory of ``S`` steps runs ``x_T = x^(0) → x^(1) → … → x^(S) = x_0`` on the timesteps of a diffusers scheduler
(``set_timesteps(S)``). Each transition is the DDIM step with ``η > 0`` of :func:`~diffalign.diffusion.ddim.
ddim_step_with_logprob` — a Gaussian ``N(μ_θ(x_t, t), σ_t² I)``. ``η = 1`` is DDPM's posterior (ancestral) step on
the same timesteps: the tests check both against diffusers' own ``DDIMScheduler.step`` and ``DDPMScheduler.step``
with the same noise.

Log-probs are per-element **means** of the Gaussian log-density (``reduction="mean"``, DDPO's convention): a number
that does not grow with resolution. The exact density of the whole latent is ``mean · C·H·W``.

Randomness is per *row*: each trajectory draws its initial latent and all its step noises from its own generator
(``noise [N, S+1, C, h, w]``, see :func:`row_noise`), so a trajectory does not depend on the batch it was sampled
in or on the number of processes.

A step whose variance is zero (the last step when the schedule's final ᾱ is 1, as in DDPM) is taken
deterministically; it has no density, its log-prob is recorded as 0 and ``Trajectory.trainable`` marks it ``False``.

**Euler-ancestral is DDIM with η = 1.** Distilled few-step models (SDXL-Turbo, the sandbox's ``sandbox-4step``) sample
with diffusers' ``EulerAncestralDiscreteScheduler``, which works on ``x_σ = x/√ᾱ`` with ``σ = √((1−ᾱ)/ᾱ)``. Its step
``σ_t → σ_p``: ``x̂0 = x_σ − σ_t·ε̂``, ``σ_up² = σ_p²(σ_t² − σ_p²)/σ_t²``, ``σ_down² = σ_p² − σ_up²``, ``x_p = x̂0 +
σ_down·ε̂ + σ_up·z``. Multiplying by ``√ᾱ_p``: the variance is ``ᾱ_p σ_up² = (1−ᾱ_p)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_p)`` — DDIM's
η = 1 variance — and the ε̂ coefficient ``√ᾱ_p σ_down = √(1 − ᾱ_p − ᾱ_p σ_up²)`` is DDIM's. So ``kind="euler_ancestral"``
takes that scheduler's timesteps (its ``timestep_spacing``: SDXL-Turbo's "trailing" gives 999, 749, 499, 249 at 4
steps), each step's predecessor the next of them and the clean end at ᾱ = 1 (σ = 0, a deterministic last step, which
the official online PSO does not train either), and samples with η = 1; the tests check it against diffusers' own
``EulerAncestralDiscreteScheduler.step`` for the same noise. Log-probs are of the same Gaussian in ``x`` rather than
``x_σ`` coordinates: they differ by the constant ``log √ᾱ_p`` per element, which cancels in every log-ratio.

**LCM's multistep sampling is DDIM with a per-step η.** ``LCMScheduler`` (LCM, DMD2) predicts ``x̂0`` and re-noises it
with fresh noise: ``x_p = √ᾱ_p·x̂0 + √(1−ᾱ_p)·z``, a Gaussian whose ε̂ coefficient is 0, i.e. DDIM with
``η_k² = (1−ᾱ_t)/(1 − ᾱ_t/ᾱ_p)`` (> 1) at step ``k``; ``kind="lcm"`` takes that scheduler's timesteps and these η
(``Schedule.eta_scale``), and its last step returns ``x̂0`` (deterministic, untrained). LCM's boundary condition
(``c_skip``, ``c_out``) differs from ``(0, 1)`` by < 1e-7 at the timesteps it visits (t ≥ 20 at 50 original steps) and
is left out; the tests check the steps against ``LCMScheduler.step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .ddim import _alpha, ddim_step_with_logprob, eps_coefficient, predict_x0_and_eps

ModelFn = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (x [N, C, h, w], t LongTensor[N]) -> output [N, ...]


@dataclass
class Schedule:
    """Sampling timesteps ``[S]``, their predecessors ``[S]`` (``< 0``: the clean end), the clean end's ᾱ, and the
    scale of the initial latent ``x_T = initial_scale · z`` (1, except Euler-ancestral with "trailing"/"linspace"
    spacing, which starts at ``σ_max·z`` in its coordinates, i.e. ``√(1 − ᾱ_T)·z`` in ours)."""

    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    final_alpha_cumprod: float
    initial_scale: float = 1.0
    # per-step factor on the sampler's η (LCM: the η that makes DDIM's step its re-noising); None = 1 everywhere
    eta_scale: torch.Tensor | None = None

    def step_eta(self, eta: float, k: torch.Tensor | int) -> torch.Tensor | float:
        """η of step(s) ``k``: a float for one step, ``[N, 1, 1, 1]`` for a ``LongTensor[N]`` of steps."""
        if self.eta_scale is None:
            return eta
        if isinstance(k, int):
            return eta * float(self.eta_scale[k])
        return (eta * self.eta_scale.float()[k.cpu()]).reshape(-1, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.timesteps)

    def trainable(self, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """``bool [S]``: steps with a positive variance (a density to train on)."""
        ac = alphas_cumprod.double()
        a_t = ac[self.timesteps]
        a_prev = torch.where(
            self.prev_timesteps >= 0,
            ac[self.prev_timesteps.clamp(min=0)],
            torch.full_like(a_t, self.final_alpha_cumprod),
        )
        return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev) > 0


SAMPLERS = ("ddim", "ddpm", "euler_ancestral", "lcm")


def sampling_schedule(scheduler, num_steps: int, kind: str = "ddim") -> Schedule:
    """The timesteps a diffusers scheduler of ``kind`` built from ``scheduler``'s config visits in ``num_steps``
    steps, with each step's predecessor.

    ``"ddpm"``: ``DDPMScheduler`` — predecessor from ``previous_timestep``, clean-end ᾱ = 1 (so the last step is
    deterministic). ``"ddim"``: ``DDIMScheduler`` — predecessor ``t − T/S``, clean end ``final_alpha_cumprod`` (1
    with ``set_alpha_to_one``, else ᾱ_0 as in the Stable Diffusion configs, which keeps the last step stochastic).
    ``"euler_ancestral"``: ``EulerAncestralDiscreteScheduler``'s timesteps, predecessor the next of them, clean-end
    ᾱ = 1; sample it with η = 1 (module docstring). ``"lcm"``: ``LCMScheduler``'s timesteps, the same predecessors,
    and the per-step η of its re-noising (module docstring).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
    if kind == "ddpm":
        sched = DDPMScheduler.from_config(scheduler.config)
        sched.set_timesteps(num_steps)
        ts = sched.timesteps.long()
        prev = torch.tensor([int(sched.previous_timestep(t)) for t in ts], dtype=torch.long)
        return Schedule(ts, prev, 1.0)
    if kind == "euler_ancestral":
        sched = EulerAncestralDiscreteScheduler.from_config(scheduler.config)
        sched.set_timesteps(num_steps)
        ts = sched.timesteps.round().long()
        if not torch.allclose(sched.timesteps.double(), ts.double()):
            raise ValueError(
                f"EulerAncestralDiscreteScheduler visits non-integer timesteps {sched.timesteps.tolist()} at "
                f"{num_steps} steps (timestep_spacing {sched.config.timestep_spacing!r}); use 'trailing' or 'leading'"
            )
        prev = torch.cat([ts[1:], torch.tensor([-1], dtype=torch.long)])
        sigma_max = float(sched.sigmas.max())
        # diffusers starts at init_noise_sigma·z in x/√ᾱ coordinates: σ_max·z for these spacings, √(σ_max²+1)·z else
        initial = float(sched.init_noise_sigma) / (sigma_max**2 + 1) ** 0.5
        return Schedule(ts, prev, 1.0, initial)
    if kind == "lcm":
        sched = LCMScheduler.from_config(scheduler.config)
        sched.set_timesteps(num_steps)
        ts = sched.timesteps.long()
        prev = torch.cat([ts[1:], torch.tensor([-1], dtype=torch.long)])
        ac = sched.alphas_cumprod.double()
        a_t = ac[ts]
        a_p = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones_like(a_t))
        scale = torch.where(
            prev >= 0, ((1 - a_t) / (1 - a_t / a_p).clamp(min=1e-30)).sqrt(), torch.ones_like(a_t)
        )
        return Schedule(ts, prev, 1.0, 1.0, scale)
    if kind != "ddim":
        raise ValueError(f"unknown sampler {kind!r}; valid: {', '.join(SAMPLERS)}")
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(num_steps)
    ts = sched.timesteps.long()
    prev = ts - sched.config.num_train_timesteps // num_steps
    return Schedule(ts, prev, float(sched.final_alpha_cumprod))


@dataclass
class Trajectory:
    """``N`` sampled trajectories.

    ``latents [N, S+1, C, h, w]`` float32 (``x_T`` first, the final sample last); ``log_probs [N, S]`` float32 under
    the model that sampled them; ``schedule`` the steps; ``trainable [S]`` the steps with a density.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    schedule: Schedule
    trainable: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def row_noise(seeds: Sequence[int], num_steps: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``[N, S+1, *shape]`` float32 standard normal noise, row ``n`` from ``torch.Generator().manual_seed(seeds[n])``
    (index 0 is the initial latent, index ``k + 1`` the noise of step ``k``)."""
    out = torch.empty((len(seeds), num_steps + 1, *shape), dtype=torch.float32)
    for n, s in enumerate(seeds):
        g = torch.Generator(device="cpu").manual_seed(int(s))
        out[n] = torch.randn((num_steps + 1, *shape), generator=g, dtype=torch.float32)
    return out


def _step_mean_std(
    out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    prediction_type: str,
    final_alpha_cumprod: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    a_t = _alpha(alphas_cumprod, t, final_alpha_cumprod, x_t)
    a_prev = _alpha(alphas_cumprod, t_prev, final_alpha_cumprod, x_t)
    x0_hat, eps_hat = predict_x0_and_eps(out, x_t, a_t, prediction_type)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0_hat + eps_coefficient(a_prev, torch.as_tensor(std)) * eps_hat
    return mean, std


@torch.no_grad()
def sample_trajectories(
    model_fn: ModelFn,
    noise: torch.Tensor,
    schedule: Schedule,
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    init_noise_sigma: float = 1.0,
) -> Trajectory:
    """Run ``S = len(schedule)`` stochastic steps from ``x_T = init_noise_sigma · initial_scale · noise[:, 0]``
    and record them.

    Args:
        model_fn: the (guided) denoiser, ``(x, t [N]) -> output`` — see :func:`guided_model`.
        noise: ``[N, S+1, C, h, w]`` from :func:`row_noise` (on any device; moved to ``alphas_cumprod``'s).
        eta: DDIM η > 0 (1 = DDPM's ancestral step).
    """
    if not eta > 0:
        raise ValueError(f"sampling with log-probs needs eta > 0 (got {eta})")
    device = alphas_cumprod.device
    noise = noise.to(device)
    n, steps = noise.shape[0], len(schedule)
    if noise.shape[1] != steps + 1:
        raise ValueError(
            f"noise has {noise.shape[1]} draws per row; a {steps}-step schedule needs {steps + 1}"
        )
    trainable = schedule.trainable(alphas_cumprod.cpu())
    x = noise[:, 0] * (init_noise_sigma * schedule.initial_scale)
    latents, logps = [x], []
    for k in range(steps):
        t = schedule.timesteps[k].to(device).expand(n)
        t_prev = schedule.prev_timesteps[k].to(device).expand(n)
        out = model_fn(x, t)
        eta_k = schedule.step_eta(eta, k)
        if bool(trainable[k]):
            prev = _noisy_prev(out, x, t, t_prev, alphas_cumprod, eta_k, prediction_type,
                               schedule.final_alpha_cumprod, noise[:, k + 1])  # fmt: skip
            x, lp = ddim_step_with_logprob(
                out, t, t_prev, x, alphas_cumprod, eta=eta_k, prediction_type=prediction_type,
                final_alpha_cumprod=schedule.final_alpha_cumprod, prev_sample=prev,
            )  # fmt: skip
        else:
            mean, _ = _step_mean_std(out, x, t, t_prev, alphas_cumprod, eta_k, prediction_type,
                                     schedule.final_alpha_cumprod)  # fmt: skip
            x, lp = mean, torch.zeros(n, device=device)
        latents.append(x.float())
        logps.append(lp.float())
    return Trajectory(torch.stack(latents, 1), torch.stack(logps, 1), schedule, trainable)


def _noisy_prev(out, x_t, t, t_prev, alphas_cumprod, eta, prediction_type, final_alpha_cumprod, z):
    """``μ + σ·z`` for the given standard-normal draw ``z`` (the row's own noise)."""
    mean, std = _step_mean_std(out, x_t, t, t_prev, alphas_cumprod, eta, prediction_type, final_alpha_cumprod)
    return mean + std * z.float()


def transition_log_probs(
    model_fn: ModelFn,
    latents: torch.Tensor,
    schedule: Schedule,
    step_index: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Log-probs ``[N, s]`` of stored transitions under ``model_fn`` (gradients flow if enabled).

    ``latents [N, S+1, ...]`` from a :class:`Trajectory`; ``step_index`` ``LongTensor [N, s]``: which steps of each
    row to score (rows may differ; each column is one batched model call with per-row timesteps). Re-scoring the
    sampling model's own transitions reproduces ``Trajectory.log_probs`` (tested).
    """
    device = alphas_cumprod.device
    n = latents.shape[0]
    rows = torch.arange(n, device=latents.device)
    step_index = step_index.to(latents.device)
    out = []
    for j in range(step_index.shape[1]):
        k = step_index[:, j]
        x_t = latents[rows, k].to(device)
        x_prev = latents[rows, k + 1].to(device)
        t = schedule.timesteps.to(device)[k.to(device)]
        t_prev = schedule.prev_timesteps.to(device)[k.to(device)]
        pred = model_fn(x_t, t)
        eta_k = schedule.step_eta(eta, k)
        if torch.is_tensor(eta_k):
            eta_k = eta_k.to(device)
        _, lp = ddim_step_with_logprob(
            pred, t, t_prev, x_t, alphas_cumprod, eta=eta_k, prediction_type=prediction_type,
            final_alpha_cumprod=schedule.final_alpha_cumprod, prev_sample=x_prev,
        )  # fmt: skip
        out.append(lp)
    return torch.stack(out, 1)


def guided_model(
    unet: torch.nn.Module,
    cond_kwargs: dict,
    uncond_kwargs: dict | None,
    guidance: float,
    dtype: torch.dtype,
) -> ModelFn:
    """Classifier-free guidance ``out = u + g·(c − u)`` as one batched UNet call over ``[uncond; cond]`` rows.

    ``cond_kwargs`` / ``uncond_kwargs``: UNet keyword inputs for the ``N`` rows
    (:meth:`~diffalign.models.conditioning.Conditioning.unet_kwargs`). ``guidance <= 1`` (or no uncond) runs the
    conditional model alone, as diffusers' pipelines do (``do_classifier_free_guidance`` is ``guidance_scale > 1``;
    distilled models such as SDXL-Turbo sample with ``guidance_scale=0``). The output is float32.
    """
    if guidance <= 1.0 or uncond_kwargs is None:

        def plain(x, t):
            return unet(x.to(dtype), t, **cond_kwargs).sample.float()

        return plain
    both = _cat_kwargs(uncond_kwargs, cond_kwargs)

    def guided(x, t):
        out = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]), **both).sample.float()
        u, c = out.chunk(2)
        return u + guidance * (c - u)

    return guided


def _cat_kwargs(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if torch.is_tensor(v):
            out[k] = torch.cat([v, b[k]])
        elif isinstance(v, dict) and k == "added_cond_kwargs":
            out[k] = {n: torch.cat([v[n], b[k][n]]) for n in v}
        else:
            out[k] = v
    return out
