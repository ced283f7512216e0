"""Diffusion maths: exact equality with diffusers' schedulers, per-sample errors by hand, pair-shared noise/timesteps."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffalign.diffusion import (
    PREDICTION_TYPES,
    add_noise,
    ddim_invert,
    ddim_step_with_logprob,
    ddim_transition,
    implied_noise,
    inversion_timesteps,
    pair_noise,
    per_sample_mse,
    prediction_target,
    repeat_for_pair,
    sample_pair_timesteps,
    scheduler_alphas_cumprod,
    split_pair,
)


def _sd_scheduler() -> DDPMScheduler:
    # Stable Diffusion's training schedule, built locally (no download)
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g).to(dtype)
    noise = torch.randn(4, 4, 8, 8, generator=g).to(dtype)
    t = torch.tensor([0, 1, 500, 999])
    return x0, noise, t


def test_scheduler_alphas_cumprod_is_a_float32_copy():
    sched = _sd_scheduler()
    ac = scheduler_alphas_cumprod(sched)
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert torch.equal(ac, sched.alphas_cumprod)
    ac[0] = 0.0
    assert sched.alphas_cumprod[0] != 0.0  # a copy, the scheduler is untouched
    assert torch.equal(scheduler_alphas_cumprod(DDIMScheduler()), DDIMScheduler().alphas_cumprod)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        scheduler_alphas_cumprod(object())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("make", [_sd_scheduler, DDPMScheduler])  # scaled_linear (SD) and linear (default)
def test_add_noise_and_velocity_equal_diffusers_exactly(dtype, make):
    sched = make()
    ac = scheduler_alphas_cumprod(sched)
    x0, noise, t = _batch(dtype)
    assert torch.equal(add_noise(x0, noise, t, ac), sched.add_noise(x0, noise, t))
    assert torch.equal(prediction_target(x0, noise, t, ac, "v_prediction"), sched.get_velocity(x0, noise, t))


def test_add_noise_by_hand():
    ac = torch.tensor([0.64, 0.36])  # sqrt: 0.8/0.6 and 0.6/0.8
    x0 = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    noise = torch.tensor([[10.0, 20.0], [10.0, 20.0]])
    t = torch.tensor([0, 1])
    expected = [[0.8 * 1 + 0.6 * 10, 0.8 * 2 + 0.6 * 20], [0.6 * 1 + 0.8 * 10, 0.6 * 2 + 0.8 * 20]]
    assert add_noise(x0, noise, t, ac).flatten().tolist() == pytest.approx(sum(expected, []), rel=1e-6)
    v_expected = [[0.8 * 10 - 0.6 * 1, 0.8 * 20 - 0.6 * 2], [0.6 * 10 - 0.8 * 1, 0.6 * 20 - 0.8 * 2]]
    v = prediction_target(x0, noise, t, ac, "v_prediction")
    assert v.flatten().tolist() == pytest.approx(sum(v_expected, []), rel=1e-6)


def test_epsilon_and_sample_targets_and_unknown_type():
    ac = scheduler_alphas_cumprod(_sd_scheduler())
    x0, noise, t = _batch()
    assert prediction_target(x0, noise, t, ac, "epsilon") is noise
    assert prediction_target(x0, noise, t, ac, "sample") is x0
    assert PREDICTION_TYPES == ("epsilon", "v_prediction", "sample")
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        prediction_target(x0, noise, t, ac, "flow")


def test_implied_noise_inverts_add_noise():
    ac = scheduler_alphas_cumprod(_sd_scheduler())
    x0, noise, _ = _batch()
    t = torch.tensor([10, 200, 500, 999])
    recovered = implied_noise(add_noise(x0, noise, t, ac), x0, t, ac)
    assert torch.allclose(recovered, noise, atol=1e-4)


def test_per_sample_mse_is_a_mean_over_chw_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # [2, 1, 2, 2]
    target = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[0.5, -0.5], [1.0, 0.0]]]])
    # sample 0: (1 + 4 + 9 + 16) / 4 = 7.5 ; sample 1: (0.25 + 0.25 + 1 + 0) / 4 = 0.375
    err = per_sample_mse(pred, target)
    assert err.shape == (2,) and err.tolist() == [7.5, 0.375]
    # C*H*W with C = 3: the mean runs over channels too
    p3 = torch.zeros(1, 3, 1, 2)
    t3 = torch.tensor([[[[1.0, 1.0]], [[2.0, 2.0]], [[0.0, 3.0]]]])
    assert per_sample_mse(p3, t3).tolist() == pytest.approx([(1 + 1 + 4 + 4 + 0 + 9) / 6], rel=1e-7)


def test_per_sample_mse_computes_in_float32_with_gradients():
    pred = torch.full((2, 4, 8, 8), 0.1, dtype=torch.float16, requires_grad=True)
    target = torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    err = per_sample_mse(pred, target)
    assert err.dtype == torch.float32
    err.sum().backward()
    assert pred.grad is not None and pred.grad.dtype == torch.float16
    with pytest.raises(ValueError, match="shape"):
        per_sample_mse(torch.zeros(2, 3), torch.zeros(2, 4))


def test_pair_noise_is_shared_within_pairs_only():
    latents = torch.randn(6, 4, 8, 8, dtype=torch.float16)
    noise = pair_noise(latents, generator=torch.Generator().manual_seed(1))
    assert noise.shape == latents.shape and noise.dtype == torch.float16
    assert torch.equal(noise[:3], noise[3:])  # noise[i] == noise[i + B]
    assert not torch.equal(noise[0], noise[1])  # different pairs get different noise
    again = pair_noise(latents, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noise, again)
    with pytest.raises(ValueError, match="even"):
        pair_noise(torch.zeros(3, 4, 8, 8))


def test_pair_timesteps_range_reproducibility_and_layout():
    t = sample_pair_timesteps(4096, 1000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4096,)
    assert int(t.min()) == 0 and int(t.max()) == 999  # uniform on {0..999}: both ends reached with 4096 draws
    assert torch.equal(t, sample_pair_timesteps(4096, 1000, generator=torch.Generator().manual_seed(0)))
    small = sample_pair_timesteps(3, 1000, generator=torch.Generator().manual_seed(0), device="cpu")
    t2 = repeat_for_pair(small)
    assert t2.tolist() == small.tolist() * 2
    with pytest.raises(ValueError, match="batch_size"):
        sample_pair_timesteps(0, 1000)


def test_split_pair_inverts_stacking():
    w, l_ = torch.arange(6).reshape(3, 2), -torch.arange(6).reshape(3, 2)
    w2, l2 = split_pair(torch.cat([w, l_]))
    assert torch.equal(w2, w) and torch.equal(l2, l_)
    with pytest.raises(ValueError, match="even"):
        split_pair(torch.zeros(5))


def test_stacked_pair_noising_gives_equal_noisy_latents_for_equal_images():
    # with shared t and noise, a pair of identical images is noised identically (the DPO pairing invariant)
    ac = scheduler_alphas_cumprod(_sd_scheduler())
    img = torch.randn(2, 4, 8, 8)
    latents = torch.cat([img, img])
    t = repeat_for_pair(sample_pair_timesteps(2, 1000, generator=torch.Generator().manual_seed(3)))
    x_t = add_noise(latents, pair_noise(latents, torch.Generator().manual_seed(4)), t, ac)
    w, l_ = split_pair(x_t)
    assert torch.equal(w, l_)


# ----------------------------------------------------------------------------------------------------------------------
# DDIM step with log-probability, DDIM inversion


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_matches_diffusers_ddim_scheduler(prediction_type):
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, prediction_type=prediction_type,
    )  # fmt: skip
    sched.set_timesteps(10)
    ac = scheduler_alphas_cumprod(sched)
    g = torch.Generator().manual_seed(0)
    x_t, out, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for t in (int(sched.timesteps[0]), int(sched.timesteps[-2])):  # 900 -> 800 and 100 -> 0
        t_prev = t - 100
        expected = sched.step(out, t, x_t, eta=1.0, variance_noise=z).prev_sample
        kwargs = dict(
            eta=1.0, prediction_type=prediction_type, final_alpha_cumprod=float(sched.final_alpha_cumprod)
        )
        # our own sample, drawn with the same noise z (same seed), equals diffusers' step
        ours, _ = ddim_step_with_logprob(
            out, t, t_prev, x_t, ac, generator=torch.Generator().manual_seed(7), **kwargs
        )
        z7 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(
            ours, sched.step(out, t, x_t, eta=1.0, variance_noise=z7).prev_sample, atol=1e-5
        )
        # score diffusers' sample
        prev, logp = ddim_step_with_logprob(out, t, t_prev, x_t, ac, prev_sample=expected, **kwargs)
        assert prev is expected
        # the sample is mean + std * z, so the per-element log-density is -z^2/2 - log std - log(2 pi)/2
        a_t, a_p = float(ac[t]), float(ac[t_prev]) if t_prev >= 0 else float(sched.final_alpha_cumprod)
        std = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
        by_hand = (-(z**2) / 2).reshape(2, -1).mean(1) - math.log(std) - 0.5 * math.log(2 * math.pi)
        assert torch.allclose(logp, by_hand, atol=2e-3)


def test_ddim_step_logprob_by_hand_and_reductions():
    # a_t = 0.36, a_prev = 0.64: variance = (0.36/0.64)(1 - 0.36/0.64) = 0.24609375, sqrt(1 - 0.64 - var) = 0.3375
    ac = torch.tensor([0.64, 0.36])
    x_t = torch.tensor([[1.0, 2.0]])
    eps = torch.tensor([[0.5, -0.5]])
    # x0^ = (x - 0.8 eps)/0.6 = [1, 4]; mean = 0.8 x0^ + 0.3375 eps = [0.96875, 3.03125]
    x_prev = torch.tensor([[1.0, 3.0]])
    var = 0.24609375
    per_elem = [-((1.0 - 0.96875) ** 2) / (2 * var), -((3.0 - 3.03125) ** 2) / (2 * var)]
    const = -0.5 * math.log(var) - 0.5 * math.log(2 * math.pi)
    prev, logp = ddim_step_with_logprob(eps, 1, 0, x_t, ac, eta=1.0, prev_sample=x_prev)
    assert logp.tolist() == pytest.approx([sum(per_elem) / 2 + const], rel=1e-5)
    _, logp_sum = ddim_step_with_logprob(eps, 1, 0, x_t, ac, eta=1.0, prev_sample=x_prev, reduction="sum")
    assert logp_sum.tolist() == pytest.approx([sum(per_elem) + 2 * const], rel=1e-5)
    # eta scales the std: eta = 0.5 -> var / 4, and the mean uses sqrt(1 - 0.64 - var/4)
    _, logp_half = ddim_step_with_logprob(eps, 1, 0, x_t, ac, eta=0.5, prev_sample=x_prev)
    c = (1 - 0.64 - var / 4) ** 0.5
    mean = [0.8 * 1 + c * 0.5, 0.8 * 4 - c * 0.5]
    half = [-((1.0 - mean[0]) ** 2) / (var / 2), -((3.0 - mean[1]) ** 2) / (var / 2)]
    expected = sum(half) / 2 - 0.5 * math.log(var / 4) - 0.5 * math.log(2 * math.pi)
    assert logp_half.tolist() == pytest.approx([expected], rel=1e-5)


def test_ddim_step_sampling_gradients_and_errors():
    ac = scheduler_alphas_cumprod(_sd_scheduler())
    x_t = torch.randn(3, 4, 8, 8, dtype=torch.float16)
    out = torch.randn(3, 4, 8, 8, requires_grad=True)
    t = torch.tensor([500, 600, 700])
    prev, logp = ddim_step_with_logprob(out, t, t - 100, x_t, ac, generator=torch.Generator().manual_seed(0))
    prev2, _ = ddim_step_with_logprob(out, t, t - 100, x_t, ac, generator=torch.Generator().manual_seed(0))
    assert prev.dtype == torch.float16 and torch.equal(prev, prev2) and not prev.requires_grad
    assert logp.shape == (3,) and logp.dtype == torch.float32
    logp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(out, 500, 400, x_t, ac, eta=0.0)
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step_with_logprob(out, 0, -1, x_t, ac, final_alpha_cumprod=1.0)
    with pytest.raises(ValueError, match="mean, sum"):
        ddim_step_with_logprob(out, 500, 400, x_t, ac, reduction="max")


def test_inversion_grid():
    grid = inversion_timesteps(torch.tensor([999, 9, 0]), 10)
    assert grid[:, 0].tolist() == [-1, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert grid[:, 1].tolist() == list(range(-1, 10))
    assert grid[0, 2] == -1 and grid[-1, 2] == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_invert_is_exact_for_a_model_that_knows_the_noise(prediction_type):
    # if the model always predicts the same noise eps, every DDIM step keeps x0^ = x0, so inverting to t gives exactly
    # add_noise(x0, eps, t); implied_noise then recovers eps; the deterministic DDIM walk back returns x0.
    ac = scheduler_alphas_cumprod(_sd_scheduler())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t_end = torch.tensor([999, 400, 37])
    calls = []

    def model_fn(x, t):
        calls.append(t.tolist())
        if prediction_type == "epsilon":
            return eps
        return prediction_target(x0, eps, t, ac, "v_prediction")  # a perfect v-model

    x_t = ddim_invert(model_fn, x0, t_end, ac, num_steps=10, prediction_type=prediction_type)
    assert calls[0] == [0, 0, 0] and calls[1] == [99, 39, 3] and len(calls) == 10
    assert torch.allclose(x_t, add_noise(x0, eps, t_end, ac), atol=1e-4)
    assert torch.allclose(implied_noise(x_t, x0, t_end, ac), eps, atol=1e-3)
    back = ddim_transition(eps, t_end, -1, add_noise(x0, eps, t_end, ac), ac)
    assert torch.allclose(back, x0, atol=1e-4)


def test_ddim_invert_extra_noise_and_errors():
    ac = scheduler_alphas_cumprod(_sd_scheduler())
    x0 = torch.randn(2, 4, 8, 8)
    t_end = torch.tensor([500, 800])

    def model_fn(x, t):
        return torch.zeros_like(x)

    plain = ddim_invert(model_fn, x0, t_end, ac)
    noisy = ddim_invert(
        model_fn, x0, t_end, ac, extra_noise_scale=0.1, generator=torch.Generator().manual_seed(0)
    )
    again = ddim_invert(
        model_fn, x0, t_end, ac, extra_noise_scale=0.1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(noisy, again) and not torch.equal(noisy, plain)
    with pytest.raises(ValueError, match="t_end"):
        ddim_invert(model_fn, x0, torch.tensor([5]), ac)
    with pytest.raises(ValueError, match="sample"):
        ddim_invert(model_fn, x0, t_end, ac, prediction_type="sample")
