"""DDIM transitions as pure functions: a stochastic step with its log-probability, and DDIM inversion.

DDIM (Song et al., 2021, arXiv 2010.02502, Eqs. 12 and 16), with ``a_t = alphas_cumprod[t]`` (ᾱ_t)::

    x0^  = predicted clean sample,   eps^ = predicted noise          (from the model output, any prediction type)
    σ_t  = η · sqrt( (1 − a_prev) / (1 − a_t) · (1 − a_t / a_prev) )
    μ    = sqrt(a_prev) · x0^ + sqrt(1 − a_prev − σ_t²) · eps^
    x_prev ~ N(μ, σ_t² I)

For η > 0 the step is a Gaussian policy, so RL-style methods (DDPO, PRDP) can score a trajectory by
``log p(x_prev | x_t)``; :func:`ddim_step_with_logprob` returns it. The deterministic transition (σ = 0) run towards
*higher* noise is DDIM inversion (:func:`ddim_invert`), used by InPO to find the ``x_t`` a model associates with an
image. Timesteps ``< 0`` stand for the clean end of the chain and use ``final_alpha_cumprod`` (diffusers'
``set_alpha_to_one=True`` gives 1.0, the SD default for DDIM; ``False`` gives ``alphas_cumprod[0]``).

All arithmetic runs in float32 (log-densities of 16k-dimensional Gaussians and small variances lose precision in
half precision); returned samples take the dtype of the input ``x_t``. Thresholding/clipping of x0^ is not applied
(Stable Diffusion schedulers have it off).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffalign.diffusion.noise import PREDICTION_TYPES

LOGPROB_REDUCTIONS = ("mean", "sum")


def _alpha(
    alphas_cumprod: torch.Tensor, t: torch.Tensor | int, final_alpha_cumprod: float, like: torch.Tensor
) -> torch.Tensor:
    """``a_t`` as float32 ``[N, 1, ..., 1]`` broadcasting against ``like``; ``t < 0`` gives ``final_alpha_cumprod``."""
    ac = alphas_cumprod.to(device=like.device, dtype=torch.float32)
    t = torch.as_tensor(t, device=like.device).long().reshape(-1).expand(like.shape[0])
    a = torch.where(t >= 0, ac[t.clamp(min=0)], torch.full_like(ac[:1], final_alpha_cumprod))
    return a.reshape((-1,) + (1,) * (like.dim() - 1))


def predict_x0_and_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a model output at noise level ``a_t`` (broadcastable, e.g. ``[N, 1, 1, 1]``) to ``(x0^, eps^)``.

    - ``"epsilon"``: ``eps^ = out``, ``x0^ = (x_t − sqrt(1 − a)·out) / sqrt(a)``;
    - ``"v_prediction"``: ``x0^ = sqrt(a)·x_t − sqrt(1 − a)·out``, ``eps^ = sqrt(a)·out + sqrt(1 − a)·x_t``;
    - ``"sample"``: ``x0^ = out``, ``eps^ = (x_t − sqrt(a)·out) / sqrt(1 − a)``.
    """
    out, x, a = model_output.float(), x_t.float(), a_t.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    if prediction_type == "sample":
        return out, (x - a.sqrt() * out) / (1 - a).sqrt()
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}.")


def eps_coefficient(a_prev: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """DDIM's ``√(1 − ᾱ_prev − σ²)``, with a residue below 1e-6·(1 − ᾱ_prev) taken as 0: LCM's re-noising sets σ² to
    1 − ᾱ_prev, where float32 rounding would leave ~1e-7, whose square root (3e-4) is no longer negligible."""
    c2 = 1 - a_prev - std**2
    return torch.where(c2 > 1e-6 * (1 - a_prev), c2, torch.zeros_like(c2)).sqrt()


def ddim_step_with_logprob(
    model_output: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    x_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step ``x_t → x_prev`` and ``log N(x_prev; μ, σ_t² I)`` per sample.

    Args:
        model_output: denoiser output at ``(x_t, t)``, ``[N, C, H, W]`` (after classifier-free guidance, if any).
        t, t_prev: current and previous timestep, ``int`` or ``LongTensor[N]`` (``t_prev < 0``: clean end).
        x_t: ``[N, C, H, W]``.
        alphas_cumprod: ``[T]``.
        eta: η > 0 (σ = 0 has no density). η = 1 gives the DDPM posterior variance. A tensor broadcasting against
            ``x_t`` (``[N, 1, 1, 1]``) gives each row its own η (LCM's re-noising, :mod:`.sampling`).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        final_alpha_cumprod: ``a`` used for ``t_prev < 0`` (see the module docstring).
        prev_sample: if given, score this ``x_prev`` instead of sampling one (re-evaluating a stored trajectory
            under another model, e.g. the reference or the current policy in PRDP / DDPO).
        generator: for the sampling noise when ``prev_sample`` is None (drawn on the generator's device).
        reduction: ``"mean"`` (default, as DDPO: the average per-element log-density, resolution-independent) or
            ``"sum"`` (the exact log-density of the whole sample; = mean · C·H·W). Both include the constant
            ``−log σ − ½·log 2π`` per element, which cancels in log-ratios of two models at the same step.

    Returns:
        ``(prev_sample [N, C, H, W] in x_t's dtype, log_prob float32 [N])``. Gradients flow into ``log_prob``
        through ``model_output`` (the mean); a sampled ``prev_sample`` is detached from it (a Gaussian sample, not a
        reparametrised one).
    """
    if not bool(torch.as_tensor(eta).gt(0).all()):
        raise ValueError(f"ddim_step_with_logprob needs eta > 0 for a density (got eta={eta}).")
    if reduction not in LOGPROB_REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}; valid: {', '.join(LOGPROB_REDUCTIONS)}.")
    a_t = _alpha(alphas_cumprod, t, final_alpha_cumprod, x_t)
    a_prev = _alpha(alphas_cumprod, t_prev, final_alpha_cumprod, x_t)
    x0_hat, eps_hat = predict_x0_and_eps(model_output, x_t, a_t, prediction_type)

    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    if not bool((std > 0).all()):
        raise ValueError(
            "ddim_step_with_logprob: the step has zero variance (t_prev < 0 with final_alpha_cumprod = 1, or "
            "t_prev >= t), so its log-probability is undefined; take the last step deterministically instead."
        )
    mean = a_prev.sqrt() * x0_hat + eps_coefficient(a_prev, std) * eps_hat

    if prev_sample is None:
        draw_device = generator.device if generator is not None else x_t.device
        z = torch.randn(x_t.shape, generator=generator, device=draw_device, dtype=torch.float32).to(
            x_t.device
        )
        prev_sample = (mean + std * z).detach().to(x_t.dtype)

    x_prev = prev_sample.detach().float()
    log_prob = -((x_prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.reshape(log_prob.shape[0], -1)
    log_prob = log_prob.mean(dim=1) if reduction == "mean" else log_prob.sum(dim=1)
    return prev_sample, log_prob


def ddim_transition(
    model_output: torch.Tensor,
    t: torch.Tensor | int,
    t_to: torch.Tensor | int,
    x_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float = 1.0,
) -> torch.Tensor:
    """Deterministic DDIM move (η = 0) from level ``t`` to level ``t_to`` (either direction): float32 result.

    ``x_to = sqrt(a_to)·x0^ + sqrt(1 − a_to)·eps^``; with ``t_to > t`` this is one DDIM-inversion step (the usual
    approximation ``eps^(x_t, t) ≈ eps^(x_to, t_to)``). ``t < 0`` means ``x_t`` is the clean sample.
    """
    a_t = _alpha(alphas_cumprod, t, final_alpha_cumprod, x_t)
    a_to = _alpha(alphas_cumprod, t_to, final_alpha_cumprod, x_t)
    x0_hat, eps_hat = predict_x0_and_eps(model_output, x_t, a_t, prediction_type)
    return a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps_hat


def inversion_timesteps(t_end: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Per-sample inversion grid ``[K + 1, N]``: ``s_k = round(−1 + k·(t_end + 1)/K)``, from −1 (clean) to ``t_end``.

    E.g. ``t_end = 999, K = 10`` gives −1, 99, 199, …, 999.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (got {num_steps}).")
    k = torch.arange(num_steps + 1, device=t_end.device, dtype=torch.float64).unsqueeze(1)
    return torch.round(-1 + k * (t_end.double() + 1).unsqueeze(0) / num_steps).long()


def ddim_invert(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t_end: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_steps: int = 10,
    prediction_type: str = "epsilon",
    extra_noise_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM inversion of clean latents ``x0`` up to per-sample timesteps ``t_end`` → ``x_t`` (x0's dtype).

    Runs ``num_steps`` deterministic DDIM steps along :func:`inversion_timesteps`. The first starts from the clean
    sample: the model is evaluated at timestep 0, ``x0^ = x0`` exactly, and ``eps^`` is read from the output as the
    noise that output implies at timestep 0 for that ``x0`` (so a model that knows the noise inverts exactly, for
    epsilon- and v-prediction alike). InPO (Lu et al., CVPR 2025, arXiv 2503.18454) inverts
    each preference image with the current model (10 steps) and then uses ``implied_noise(x_t, x0, t)`` as the
    epsilon target of the Diffusion-DPO loss.

    Args:
        model_fn: ``model_fn(x [N, C, H, W], t LongTensor[N]) -> model output`` (close over the prompt embeddings;
            call inside ``torch.no_grad()`` unless gradients through the inversion are wanted).
        x0: ``[N, C, H, W]`` clean latents.
        t_end: ``LongTensor[N]`` target timesteps (>= 0).
        num_steps: number of inversion steps K.
        extra_noise_scale: after each step that raises the noise level, add ``scale · sqrt(1 − a_next) · z``,
            z ~ N(0, I). InPO adds "a small extra noise 0.1·σ" per inverse step; which σ is meant is unverified —
            this reading takes σ as the marginal noise std of the new level. 0 (default) is plain DDIM inversion.
        generator: for the extra noise.
    """
    if prediction_type == "sample":
        raise ValueError(
            "ddim_invert: prediction_type='sample' cannot start from the clean end (eps^ = (x − x0^)/sqrt(1 − 1) is "
            "undefined); invert with an epsilon- or v-prediction model."
        )
    if t_end.dim() != 1 or t_end.shape[0] != x0.shape[0] or bool((t_end < 0).any()):
        raise ValueError(
            f"ddim_invert: t_end must be a LongTensor[N] of timesteps >= 0 with N = {x0.shape[0]}, "
            f"got shape {tuple(t_end.shape)}."
        )
    grid = inversion_timesteps(t_end.to(x0.device), num_steps)
    x = x0.float()
    for k in range(num_steps):
        s, s_next = grid[k], grid[k + 1]
        out = model_fn(x.to(x0.dtype), s.clamp(min=0))
        if k == 0:
            # clean anchor: x0^ = x exactly; eps^ solved from the output's definition at timestep 0 with x0 = x
            # (epsilon: the output itself; v = sqrt(a_0)·eps − sqrt(1 − a_0)·x0  =>  eps = (v + sqrt(1 − a_0)·x)/sqrt(a_0))
            a_0, a_next = (_alpha(alphas_cumprod, 0, 1.0, x), _alpha(alphas_cumprod, s_next, 1.0, x))
            eps_hat = out.float()
            if prediction_type == "v_prediction":
                eps_hat = (eps_hat + (1 - a_0).sqrt() * x) / a_0.sqrt()
            x = a_next.sqrt() * x + (1 - a_next).sqrt() * eps_hat
        else:
            x = ddim_transition(out, s, s_next, x, alphas_cumprod, prediction_type=prediction_type)
        if extra_noise_scale > 0:
            draw_device = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=draw_device).to(x.device)
            a_next = _alpha(alphas_cumprod, s_next, 1.0, x)
            moved = (s_next > s).float().reshape(a_next.shape)  # no noise where the grid did not advance
            x = x + moved * extra_noise_scale * (1 - a_next).sqrt() * z
    return x.to(x0.dtype)
