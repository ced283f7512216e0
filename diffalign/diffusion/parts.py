r"""The replaceable parts of a denoising training step, each a small function with its maths here.

An offline-pairs step (:mod:`diffalign.training.step`) is: per-pair randomness → timestep draw → noising →
denoiser → error space → per-sample reduction → objective. A method's :class:`~diffalign.objectives.registry.
ObjectiveSpec` names the part it uses at each seam (``timesteps``, ``noising``, ``error_space``); the loop looks
the name up in the dicts below.

**Per-pair randomness.** Everything random that decides a pair's loss (timestep, noise, prompt-dropout draw) comes
from one generator seeded by ``(seed, epoch, dataset index)`` (:func:`pair_seed`), drawn in a fixed order — the
timestep, then the noise, then the dropout uniform — so a pair gets the same draws whatever the process count, the
batch it lands in, or an interruption.

**Timesteps** (one per pair, shared by winner and loser):

- ``uniform``: ``t ~ U{0, …, T−1}`` (Diffusion-DPO);
- ``grid``: ``t ~ U(grid)`` for a fixed grid, e.g. a 4-step distilled model's ``{249, 499, 749, 999}`` (PSO).

**Noising** ``(x0, ε, t) -> (x_t, ε_used)``: ``gaussian`` is ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε`` with the drawn ε. A
noising part receives a :class:`NoisingContext` that can call the current model, so a DDIM-inversion noising (InPO)
plugs in here and returns the implied noise ``ε̃ = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t)`` as ``ε_used``.

**Error space** ``(pred, x0, ε_used, x_t, t) -> err[N]``:

- ``target``: ``mean_{C,H,W}(pred − target)²`` with target ε / v / x0 per the model's prediction type
  (Diffusion-DPO);
- ``x0``: ``w(t) · mean_{C,H,W}(x̂0 − x0)²`` with ``x̂0`` recovered from the prediction and a weighting ``w(t)``:
  ``1`` or ``σ_t⁻² = ᾱ_t/(1−ᾱ_t)`` (EDM-style, PSO's customisation form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .noise import _coefficients, add_noise, per_sample_mse, prediction_target

# ----------------------------------------------------------------------------------------------------------------------
# per-pair randomness


def pair_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, dataset index); distinct keys give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def slot_seed(seed: int, slot: int) -> int:
    """The seed of image ``slot``'s own (t, ε) stream when a pair's images do not share them; slot 0 keeps ``seed``
    (so its draws equal the shared ones)."""
    return seed if slot == 0 else (seed * 0x2545F4914F6CDD1D + slot * 0x9E3779B97F4A7C15) & (2**63 - 1)


def uniform_timestep(
    g: torch.Generator, num_train_timesteps: int, grid: tuple[int, ...] | None = None
) -> torch.Tensor:
    """``t ~ U{0, …, T−1}`` as a ``LongTensor[1]``."""
    return torch.randint(0, num_train_timesteps, (1,), generator=g)


def grid_timestep(
    g: torch.Generator, num_train_timesteps: int, grid: tuple[int, ...] | None = None
) -> torch.Tensor:
    """``t ~ U(grid)`` as a ``LongTensor[1]`` (every grid value must lie in ``[0, T)``)."""
    if not grid:
        raise ValueError("timesteps='grid' needs a non-empty grid of timesteps, e.g. (249, 499, 749, 999)")
    if min(grid) < 0 or max(grid) >= num_train_timesteps:
        raise ValueError(f"timestep grid {grid} must lie in [0, {num_train_timesteps})")
    i = torch.randint(0, len(grid), (1,), generator=g)
    return torch.tensor(grid, dtype=torch.long)[i]


TIMESTEP_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform_timestep,
    "grid": grid_timestep,
}


def pair_randomness(
    indices: torch.Tensor,
    seed: int,
    epoch: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    timesteps: str = "uniform",
    grid: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each pair: timestep ``[B]`` long, noise ``[B, *latent_shape]`` float32, dropout uniform ``[B]``.

    The winner and the loser of a pair share the timestep and the noise (Diffusion-DPO). ``timesteps`` names a
    :data:`TIMESTEP_SAMPLERS` entry (``grid`` reads ``grid``)."""
    draw = TIMESTEP_SAMPLERS[timesteps]
    ts, noises, us = [], [], []
    for idx in indices.tolist():
        g = torch.Generator().manual_seed(pair_seed(seed, epoch, int(idx)))
        ts.append(draw(g, num_train_timesteps, grid))
        noises.append(torch.randn((1, *latent_shape), generator=g))
        us.append(torch.rand((1,), generator=g))
    return torch.cat(ts), torch.cat(noises), torch.cat(us)


# ----------------------------------------------------------------------------------------------------------------------
# noising


@dataclass
class NoisingContext:
    """What a noising part may use besides ``(x0, ε, t)``: the schedule; calls into the current model and the
    reference (``model(x [n, ...], t [n], rows [n]) -> prediction`` with the conditioning of batch ``rows`` bound)
    for inversion-style noisings; one seed per row for any extra randomness (keyed by (seed, epoch, pair, slot), so
    a resumed run draws the same); the scheduler's inverse-grid offset and initial ᾱ (diffusers'
    ``DDIMInverseScheduler``); ``params`` is the objective's hyperparameter dataclass."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    params: Any = None
    reference_model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    row_seeds: Callable[[], list[int]] | None = None  # called only by parts that need extra randomness
    steps_offset: int = 0
    initial_alpha_cumprod: float | None = None
    # per-image keys (dataset index, slot) and their epoch-free seeds, for parts that keep a per-image result for the
    # whole run in ``state`` (a dict the step owns; e.g. the reference's inversion of each image)
    image_keys: Callable[[], list[tuple[int, int]]] | None = None
    image_seeds: Callable[[], list[int]] | None = None
    state: dict | None = None


def gaussian_noising(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ctx: NoisingContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh Gaussian noising: ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``; returns ``(x_t, ε)``."""
    return add_noise(x0, noise, t, ctx.alphas_cumprod), noise


def ddim_inversion_noising(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ctx: NoisingContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """InPO: ``x_t`` by DDIM inversion of ``x0`` with the current model (or the reference), ``ε̃`` its implied noise
    (:mod:`diffalign.diffusion.inversion`). Reads ``inversion_steps``, ``inversion_eta``, ``inversion_model`` from
    ``ctx.params``; the drawn Gaussian ``noise`` is not used."""
    from .inversion import ddim_inversion_noise

    p = ctx.params
    if getattr(p, "inversion_cache", False):
        return _cached_reference_inversion(x0, t, ctx)
    model = ctx.model if p.inversion_model == "current" else ctx.reference_model
    generators = None
    if p.inversion_eta > 0:
        generators = [torch.Generator().manual_seed(s) for s in ctx.row_seeds()]
    return ddim_inversion_noise(model, x0, t, ctx.alphas_cumprod, generators=generators,
                                exact_t=getattr(p, "inversion_exact_t", False), **_inversion_options(ctx))  # fmt: skip


def _inversion_options(ctx: NoisingContext) -> dict[str, Any]:
    """The inversion's constants: the objective's (steps, extra noise) and the scheduler's (prediction, grid)."""
    p = ctx.params
    return dict(num_steps=p.inversion_steps, eta=p.inversion_eta, prediction_type=ctx.prediction_type,
                steps_offset=ctx.steps_offset, initial_alpha_cumprod=ctx.initial_alpha_cumprod)  # fmt: skip


def _cached_reference_inversion(
    x0: torch.Tensor, t: torch.Tensor, ctx: NoisingContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inversion_cache: true``: each image is inverted once, by the frozen reference, through the whole grid, the
    first time the run meets it (its extra noise from a generator keyed by (seed, pair, slot), the same every epoch);
    its grid latents stay in ``ctx.state`` and every later visit reads ``x_t`` from them (no UNet pass)."""
    from .inversion import ddim_inversion_grid, grid_noising, inverse_grid

    p = ctx.params
    store = ctx.state.setdefault("inversion_grid", {})
    keys = ctx.image_keys()
    missing = [r for r, key in enumerate(keys) if key not in store]
    if missing:
        rows = torch.tensor(missing, device=x0.device)
        seeds = ctx.image_seeds()
        generators = (
            [torch.Generator().manual_seed(seeds[r]) for r in missing] if p.inversion_eta > 0 else None
        )
        latents = ddim_inversion_grid(
            lambda x, s, sub: ctx.reference_model(x, s, rows[sub]), x0[rows], ctx.alphas_cumprod,
            generators=generators, **_inversion_options(ctx),
        ).to("cpu", x0.dtype if x0.dtype != torch.float16 else torch.float32)  # fmt: skip
        for j, r in enumerate(missing):
            store[keys[r]] = latents[j]
    stacked = torch.stack([store[key] for key in keys]).to(x0.device)
    grid = inverse_grid(len(ctx.alphas_cumprod), p.inversion_steps, ctx.steps_offset)
    return grid_noising(stacked, x0, t, ctx.alphas_cumprod, grid)


NOISINGS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "gaussian": gaussian_noising,
    "ddim_inversion": ddim_inversion_noising,
}


def reference_error_inputs(spec: Any, params: Any) -> dict[str, Any] | None:
    """What the reference's error of an image depends on besides the data, the seed and the schedule — the
    timestep distribution, the noising and the error space with the hyperparameters they read — or ``None`` when
    the noised input depends on the trained model (then no reference error can be stored and reused:
    :mod:`diffalign.training.reference_cache`). Loss-only hyperparameters (β, loss type, label smoothing) are not
    part of it, so sweeps over them share stored reference errors."""
    out: dict[str, Any] = {
        "timesteps": spec.timesteps,
        "grid": list(getattr(params, "timestep_grid", None) or []),
        "noising": spec.noising,
        "error_space": spec.error_space,
        "error_weighting": getattr(params, "error_weighting", "none"),
    }
    if not getattr(spec, "shared_noise", True):  # (keys of caches made with shared noise stay as they were)
        out["shared_noise"] = False
    if getattr(params, "user_pair_groups", False):  # PPD: (t, ε) keyed by the image pair, not the row
        out["noise_keys"] = "image-pair groups"
    if spec.noising == "gaussian":
        return out
    if spec.noising == "ddim_inversion":
        if params.inversion_model != "reference":
            return None
        out = {**out, "inversion_steps": params.inversion_steps, "inversion_eta": params.inversion_eta}
        if getattr(
            params, "inversion_cache", False
        ):  # epoch-free extra noise: other inputs than the uncached
            out["inversion_cache"] = True
        if getattr(params, "inversion_exact_t", False):
            out["inversion_exact_t"] = True
        return out
    return None  # a noising this function does not know: do not cache


# ----------------------------------------------------------------------------------------------------------------------
# error spaces


def x0_from_prediction(
    pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """``x̂0`` from a denoiser output: ε → ``(x_t − √(1−ᾱ)·ε̂)/√ᾱ``; v → ``√ᾱ·x_t − √(1−ᾱ)·v̂``; sample → itself."""
    sqrt_a, sqrt_1ma = _coefficients(alphas_cumprod, t, x_t)
    if prediction_type == "epsilon":
        return (x_t - sqrt_1ma * pred) / sqrt_a
    if prediction_type == "v_prediction":
        return sqrt_a * x_t - sqrt_1ma * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"Unknown prediction_type {prediction_type!r}")


def snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``σ_t⁻² = ᾱ_t / (1 − ᾱ_t)`` per sample, float32 ``[N]`` (the signal-to-noise ratio)."""
    a = alphas_cumprod.to(t.device, torch.float32)[t]
    return a / (1.0 - a)


def target_space_error(
    pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    ctx: NoisingContext,
    weighting: str = "none",
) -> torch.Tensor:
    """``mean_{C,H,W}(pred − target)²`` with the model's own target (ε, v or x0); float32 ``[N]``."""
    return per_sample_mse(pred, prediction_target(x0, noise, t, ctx.alphas_cumprod, ctx.prediction_type))


def x0_space_error(
    pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    ctx: NoisingContext,
    weighting: str = "snr",
) -> torch.Tensor:
    """``w(t) · mean_{C,H,W}(x̂0 − x0)²``; ``weighting`` ``"none"`` (w = 1) or ``"snr"`` (w = σ_t⁻²). float32 ``[N]``.

    For an ε-predicting model, ``x̂0 − x0 = −√(1−ᾱ)/√ᾱ · (ε̂ − ε)``, so the σ⁻²-weighted x0 error equals the ε error."""
    x0_hat = x0_from_prediction(pred.float(), x_t.float(), t, ctx.alphas_cumprod, ctx.prediction_type)
    err = per_sample_mse(x0_hat, x0)
    if weighting == "snr":
        return err * snr_weight(t, ctx.alphas_cumprod)
    if weighting == "none":
        return err
    raise ValueError(f"unknown x0 error weighting {weighting!r}; valid: ['none', 'snr']")


ERROR_SPACES: dict[str, Callable[..., torch.Tensor]] = {"target": target_space_error, "x0": x0_space_error}
