r"""DDIM-inversion noising (InPO: Lu et al., "InPO: Inversion Preference Optimization with Reparametrized DDIM for
Efficient Diffusion Model Alignment", CVPR 2025, arXiv 2503.18454) as a noising part of the training step.

Diffusion-DPO noises a preference image with fresh Gaussian noise. InPO instead finds the ``x_t`` the model itself
associates with the image, by DDIM inversion, and trains on the noise that ``x_t`` implies. As the official code does
it (``../shared/METHODS.md``), with ``K`` inverse steps on diffusers' ``DDIMInverseScheduler`` grid
``s_k = offset + k·T/K`` (``1, 101, …, 901`` for SD's ``steps_offset = 1``, ``T = 1000``, ``K = 10``)::

    x ← x0
    for s in grid with s ≤ t:                     # every grid step up to the pair's sampled t
        ε̂ = model(x, s)                            # under no_grad; the current model (official) or the reference
        x ← √ᾱ_s · x̂0 + √(1−ᾱ_s) · ε̂,   x̂0 = (x − √(1−ᾱ_{s−Δ})·ε̂)/√ᾱ_{s−Δ}   # DDIMInverseScheduler.step, Δ = T/K
        x ← x + η · z · √var(s, s−Δ),   z ~ N(0, I)     # "0.1·σ extra noise": var = (1−ᾱ_{s−Δ})/(1−ᾱ_s)·(1−ᾱ_s/ᾱ_{s−Δ})
    ε̃ = (x − √ᾱ_t·x0) / √(1−ᾱ_t)                   # the implied noise at the *sampled* t (official), not at s
    x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε̃  (= x)             # the UNet input; ε̃ is the epsilon target

ᾱ at a level below 0 is the scheduler's ``initial_alpha_cumprod`` (``alphas_cumprod[0]`` for SD, which sets
``set_alpha_to_one = False``). For a v-prediction model the target is ``√ᾱ_t·ε̃ − √(1−ᾱ_t)·x0`` (the error space
computes it from ``ε̃``). The extra noise comes from a generator per image keyed by (seed, epoch, pair, slot), so a
resumed run draws the same noise; winner and loser are inverted with independent extra noise, as in the official code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ddim import predict_x0_and_eps
from .noise import implied_noise


def inverse_grid(num_train_timesteps: int, num_steps: int, steps_offset: int = 1) -> list[int]:
    """``DDIMInverseScheduler.set_timesteps(num_steps).timesteps`` (the "leading" spacing): ``offset + k·T//K``."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"inversion_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    step = num_train_timesteps // num_steps
    return [min(k * step + steps_offset, num_train_timesteps - 1) for k in range(num_steps)]


def _level(alphas_cumprod: torch.Tensor, s: int, initial: float) -> torch.Tensor:
    return alphas_cumprod[s] if s >= 0 else torch.tensor(initial, dtype=alphas_cumprod.dtype)


@torch.no_grad()
def ddim_inversion_noise(
    model,
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_steps: int = 10,
    eta: float = 0.1,
    prediction_type: str = "epsilon",
    steps_offset: int = 1,
    initial_alpha_cumprod: float | None = None,
    generators: Sequence[torch.Generator] | None = None,
    exact_t: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, ε̃)`` for clean latents ``x0 [N, C, H, W]`` and per-sample timesteps ``t [N]`` (see the module).

    ``exact_t``: one more inverse step, from the last grid level reached to ``t`` itself (the model called at ``t``,
    as in the grid steps, with the same extra noise), so that ``x_t`` is at noise level ``t`` and not at the grid
    level below it; off in the official code, where the UNet at ``t`` sees a latent up to ``T/K − 1`` steps less
    noisy. For a model whose ε-prediction is a constant ε and ``eta = 0`` the result is then exactly that model's
    DDIM trajectory at level ``t``, ``√ᾱ_t·x̂0 + √(1−ᾱ_t)·ε``, at every ``t`` (the grid alone reaches it only on the
    grid).

    ``model(x [n, ...], s LongTensor[n], rows LongTensor[n]) -> prediction`` for the rows still inverting (the rows
    index the batch, so the caller can select their conditioning). ``generators``: one per row, for the extra noise
    (required when ``eta > 0``). Arithmetic in float32.
    """
    ac = alphas_cumprod.to(x0.device, torch.float32)
    x, _ = _invert(model, x0, t.to(x0.device), ac, num_steps, eta, prediction_type, steps_offset,
                   initial_alpha_cumprod, generators, exact_t=exact_t)  # fmt: skip
    eps_tilde = implied_noise(x, x0.float(), t.to(x0.device), ac)
    return x.to(x0.dtype), eps_tilde.to(x0.dtype)


@torch.no_grad()
def ddim_inversion_grid(
    model,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_steps: int = 10,
    eta: float = 0.1,
    prediction_type: str = "epsilon",
    steps_offset: int = 1,
    initial_alpha_cumprod: float | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """The whole inversion of each image: ``[N, K, C, H, W]`` float32, entry ``k`` the latent after the inverse step
    to grid level ``inverse_grid(...)[k]``. Row ``n``'s entry at the last grid level ``≤ t`` is exactly the ``x_t``
    :func:`ddim_inversion_noise` returns for that ``t`` with the same generator (the extra-noise draws of a row come
    in grid order), so one pass per image serves every later timestep (:func:`grid_noising`)."""
    ac = alphas_cumprod.to(x0.device, torch.float32)
    full = torch.full((len(x0),), len(ac) - 1, dtype=torch.long, device=x0.device)
    _, states = _invert(model, x0, full, ac, num_steps, eta, prediction_type, steps_offset, initial_alpha_cumprod,
                        generators, keep=True)  # fmt: skip
    return torch.stack(states, dim=1)


def grid_noising(
    grid_latents: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    grid: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, ε̃)`` from stored :func:`ddim_inversion_grid` latents ``[N, K, ...]``: the latent at the last grid
    level ``≤ t`` (``x0`` itself when ``t`` is below the first level), and its implied noise at ``t``."""
    ac = alphas_cumprod.to(x0.device, torch.float32)
    levels = torch.tensor(grid, device=t.device)
    k = (levels[None, :] <= t[:, None]).sum(1) - 1  # [N], -1: no inverse step taken
    x = x0.float().clone()
    taken = (k >= 0).nonzero().flatten()
    if len(taken):
        x[taken] = grid_latents[taken, k[taken]].to(x.device, torch.float32)
    eps_tilde = implied_noise(x, x0.float(), t, ac)
    return x.to(x0.dtype), eps_tilde.to(x0.dtype)


def _invert(model, x0, t, ac, num_steps, eta, prediction_type, steps_offset, initial_alpha_cumprod, generators,
            keep: bool = False, exact_t: bool = False):  # fmt: skip
    """The inverse-step loop of :func:`ddim_inversion_noise`; with ``keep`` also the latent after each grid step."""
    T = len(ac)
    initial = float(ac[0]) if initial_alpha_cumprod is None else initial_alpha_cumprod
    grid = inverse_grid(T, num_steps, steps_offset)
    delta = T // num_steps
    if eta > 0 and (generators is None or len(generators) != len(x0)):
        raise ValueError("ddim_inversion_noise: eta > 0 needs one generator per row")
    x = x0.float().clone()
    states = []
    for s in grid:
        rows = (t >= s).nonzero().flatten()
        if len(rows) == 0:
            break
        a_from, a_to = _level(ac, s - delta, initial), ac[s]
        out = model(x[rows], torch.full((len(rows),), s, dtype=torch.long, device=x.device), rows).float()
        x0_hat, eps_hat = predict_x0_and_eps(out, x[rows], a_from, prediction_type)
        moved = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps_hat
        if eta > 0:
            var = (1 - a_from) / (1 - a_to) * (1 - a_to / a_from)
            z = torch.stack([torch.randn(x.shape[1:], generator=generators[int(r)]) for r in rows.tolist()])
            moved = moved + eta * var.clamp(min=0).sqrt() * z.to(x.device)
        x[rows] = moved
        if keep:
            states.append(x.clone())
    if exact_t:
        levels = torch.tensor(grid, device=t.device)
        k = (levels[None, :] <= t[:, None]).sum(1) - 1  # the last grid level reached, -1: none
        rows = (k < 0).logical_or(levels[k.clamp(min=0)] < t).nonzero().flatten()
        if len(rows):
            a_from = torch.stack(
                [_level(ac, int(levels[k[r]]) if k[r] >= 0 else -1, initial) for r in rows.tolist()]
            )
            a_to = ac[t[rows]]
            a_from, a_to = a_from.view(-1, 1, 1, 1).to(x.device), a_to.view(-1, 1, 1, 1)
            out = model(x[rows], t[rows], rows).float()
            x0_hat, eps_hat = predict_x0_and_eps(out, x[rows], a_from, prediction_type)
            moved = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps_hat
            if eta > 0:
                var = (1 - a_from) / (1 - a_to) * (1 - a_to / a_from)
                z = torch.stack(
                    [torch.randn(x.shape[1:], generator=generators[int(r)]) for r in rows.tolist()]
                )
                moved = moved + eta * var.clamp(min=0).sqrt() * z.to(x.device)
            x[rows] = moved
    return x, states
