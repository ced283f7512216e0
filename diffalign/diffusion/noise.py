"""Forward-process maths for preference training: pair-shared timesteps and noise, noising, targets, errors.

Batch layout used throughout diffalign (the Diffusion-DPO convention)::

    latents_2B = [w_0, w_1, ..., w_{B-1}, l_0, l_1, ..., l_{B-1}]     # winners first half, losers second

Winner ``w_i`` and loser ``l_i`` of pair ``i`` sit at rows ``i`` and ``i + B``. Diffusion-DPO (Wallace et al., 2023,
arXiv 2311.12908) noises both images of a pair with the **same** timestep ``t_i`` and the **same** noise ``eps_i``, so
that the two denoising errors differ only because the images differ; :func:`sample_pair_timesteps` +
:func:`repeat_for_pair` and :func:`pair_noise` build exactly that.

Forward process (DDPM, Ho et al., 2020), with ``a_t = alphas_cumprod[t]`` (written ᾱ_t in the papers)::

    x_t = sqrt(a_t) · x0 + sqrt(1 − a_t) · eps
    v_t = sqrt(a_t) · eps − sqrt(1 − a_t) · x0          (v-prediction, Salimans & Ho, 2022)

:func:`add_noise` and the ``"v_prediction"`` target are bit-for-bit equal to diffusers'
``DDPMScheduler.add_noise`` / ``DDPMScheduler.get_velocity`` (same operations in the same order and dtype).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ----------------------------------------------------------------------------------------------------------------------
# pair layout


def sample_pair_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One training timestep per *pair*, uniform on ``{0, ..., num_train_timesteps − 1}``.

    Args:
        batch_size: number of pairs ``B`` (not ``2B``).
        num_train_timesteps: ``T`` of the scheduler (``scheduler.config.num_train_timesteps``, 1000 for SD).
        generator: optional ``torch.Generator`` for reproducibility. The draw happens on the generator's device and
            the result is then moved to ``device``, so a CPU generator gives the same timesteps on any device.
        device: where the result lives (default: the generator's device, else CPU).

    Returns:
        ``LongTensor[B]``. Use :func:`repeat_for_pair` to get the ``[2B]`` timesteps of the stacked batch.
    """
    if batch_size < 1 or num_train_timesteps < 1:
        raise ValueError(
            f"sample_pair_timesteps: batch_size ({batch_size}) and num_train_timesteps ({num_train_timesteps}) "
            "must both be >= 1."
        )
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
    return t.to(device) if device is not None else t


def repeat_for_pair(x: torch.Tensor) -> torch.Tensor:
    """Expand a per-pair tensor ``[B, ...]`` to the stacked layout ``[2B, ...]`` (rows ``i`` and ``i + B`` equal).

    Used for pair-shared timesteps (and for anything else shared by winner and loser, e.g. prompt embeddings).
    """
    return torch.cat([x, x], dim=0)


def split_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stacked ``[2B, ...]`` tensor into ``(winners[B, ...], losers[B, ...])``; inverse of ``cat([w, l])``."""
    if x.shape[0] % 2:
        raise ValueError(
            f"split_pair: the stacked (winner, loser) batch must have an even first dimension, got shape "
            f"{tuple(x.shape)}. Stack pairs as torch.cat([winners, losers]) before calling."
        )
    winners, losers = x.chunk(2, dim=0)
    return winners, losers


def pair_noise(latents_2B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gaussian noise shaped like ``latents_2B`` and shared within each pair: ``noise[i] == noise[i + B]``.

    Args:
        latents_2B: ``[2B, C, H, W]`` (any number of trailing dims), winners first half, losers second.
        generator: optional generator; the draw happens on its device (then moves to the latents' device).

    Returns:
        Noise with the shape, dtype and device of ``latents_2B``.
    """
    if latents_2B.shape[0] % 2:
        raise ValueError(
            f"pair_noise: expected a stacked (winner, loser) batch with an even first dimension, got shape "
            f"{tuple(latents_2B.shape)}."
        )
    half_shape = (latents_2B.shape[0] // 2, *latents_2B.shape[1:])
    draw_device = generator.device if generator is not None else latents_2B.device
    noise = torch.randn(half_shape, generator=generator, device=draw_device, dtype=latents_2B.dtype)
    return repeat_for_pair(noise.to(latents_2B.device))


# ----------------------------------------------------------------------------------------------------------------------
# forward process


def scheduler_alphas_cumprod(scheduler) -> torch.Tensor:
    """``alphas_cumprod[T]`` (ᾱ_t for t = 0..T−1) of a diffusers scheduler, as a float32 CPU copy.

    Works for every scheduler that defines ``alphas_cumprod`` (DDPM, DDIM, Euler, DPM-Solver, ...).
    """
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no `alphas_cumprod`; use a DDPM-family scheduler "
            "(e.g. DDPMScheduler.from_pretrained(<model>, subfolder='scheduler'))."
        )
    return torch.as_tensor(ac).detach().to(device="cpu", dtype=torch.float32).clone()


def _coefficients(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(a_t), sqrt(1 − a_t))`` gathered at ``t`` and shaped ``[N, 1, ..., 1]`` to broadcast against ``like``.

    Mirrors diffusers exactly: cast ``alphas_cumprod`` to ``like``'s dtype *before* the square roots.
    """
    ac = alphas_cumprod.to(device=like.device, dtype=like.dtype)
    a_t = ac[t.to(like.device)]
    sqrt_a = (a_t**0.5).flatten()
    sqrt_1ma = ((1 - a_t) ** 0.5).flatten()
    view = (-1,) + (1,) * (like.dim() - 1)
    return sqrt_a.reshape(view), sqrt_1ma.reshape(view)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion ``x_t = sqrt(a_t)·x0 + sqrt(1 − a_t)·noise``; equals ``DDPMScheduler.add_noise``.

    Args:
        x0: clean latents ``[N, C, H, W]``.
        noise: ``[N, C, H, W]``.
        t: ``LongTensor[N]`` timesteps in ``[0, T)``.
        alphas_cumprod: ``[T]`` (see :func:`scheduler_alphas_cumprod`); cast to ``x0``'s dtype and device.
    """
    sqrt_a, sqrt_1ma = _coefficients(alphas_cumprod, t, x0)
    return sqrt_a * x0 + sqrt_1ma * noise


def prediction_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the denoiser is trained to output at ``(x_t, t)``, given its ``prediction_type``.

    - ``"epsilon"``: ``noise``;
    - ``"v_prediction"``: ``v = sqrt(a_t)·noise − sqrt(1 − a_t)·x0`` (equals ``DDPMScheduler.get_velocity``);
    - ``"sample"``: ``x0``.

    Shapes as in :func:`add_noise`. Read the type from ``scheduler.config.prediction_type``.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        sqrt_a, sqrt_1ma = _coefficients(alphas_cumprod, t, x0)
        return sqrt_a * noise - sqrt_1ma * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}.")


def implied_noise(
    x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The noise that maps ``x0`` to a given ``x_t``: ``eps~ = (x_t − sqrt(a_t)·x0) / sqrt(1 − a_t)``.

    Inverse of :func:`add_noise` in ``noise`` (requires ``t`` with ``a_t < 1``). InPO (Lu et al., 2025) uses it as the
    epsilon target when ``x_t`` comes from DDIM inversion instead of fresh Gaussian noise.
    """
    sqrt_a, sqrt_1ma = _coefficients(alphas_cumprod, t, x0)
    return (x_t - sqrt_a * x0) / sqrt_1ma


# ----------------------------------------------------------------------------------------------------------------------
# errors


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising error ``err[n] = mean_{c,h,w} (pred − target)²`` → ``float32 Tensor[N]``.

    A **mean** over all non-batch dims (C·H·W), not a sum: the Diffusion-DPO β (5000) is calibrated for the mean.

    Computed in float32 on purpose: DPO uses differences of errors such as ``err_θ(w) − err_ref(w)``, which are
    ~1e-4 while the errors themselves are ~0.1, so fp16/bf16 rounding of the squares and of the 16k-term mean
    (bf16 keeps ~3 significant digits) would swamp the signal through catastrophic cancellation.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"per_sample_mse: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}."
        )
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)
