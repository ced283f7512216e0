"""The online sampler: transitions equal diffusers' own scheduler steps for the same noise, log-probs equal a float64
hand computation, stored transitions re-score to the recorded log-probs, and rows do not depend on their batch."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from diffalign.diffusion import sampling as ds
from diffalign.diffusion.noise import scheduler_alphas_cumprod

SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)  # fmt: skip


def toy_model(x, t):
    """A deterministic stand-in for a denoiser that depends on x and t."""
    return 0.3 * x + torch.sin(t.float() / 100.0).reshape(-1, 1, 1, 1) + 0.01 * x**2


def test_ddim_schedule_matches_diffusers_timesteps():
    sched = DDIMScheduler(**SD_CONFIG)
    s = ds.sampling_schedule(sched, 10, "ddim")
    sched.set_timesteps(10)
    assert s.timesteps.tolist() == sched.timesteps.tolist()
    assert s.prev_timesteps.tolist() == [t - 100 for t in sched.timesteps.tolist()]
    assert s.final_alpha_cumprod == pytest.approx(float(sched.alphas_cumprod[0]))  # set_alpha_to_one False
    assert bool(s.trainable(sched.alphas_cumprod).all())  # every step stochastic: final ᾱ < 1


def test_ddim_step_equals_diffusers_for_same_noise():
    torch.manual_seed(0)
    sched = DDIMScheduler(**SD_CONFIG)
    sched.set_timesteps(10)
    s = ds.sampling_schedule(sched, 10, "ddim")
    ac = sched.alphas_cumprod
    noise = torch.randn(3, 11, 4, 8, 8)
    traj = ds.sample_trajectories(toy_model, noise, s, ac, eta=0.7)
    x = noise[:, 0].clone()
    for k, t in enumerate(sched.timesteps):
        out = toy_model(x, t.expand(3))
        x = sched.step(out, t, x, eta=0.7, variance_noise=noise[:, k + 1]).prev_sample
        torch.testing.assert_close(traj.latents[:, k + 1], x, rtol=1e-5, atol=1e-5)


def test_ddpm_ancestral_step_equals_diffusers_for_same_generator():
    sched = DDPMScheduler(**{k: v for k, v in SD_CONFIG.items() if k != "set_alpha_to_one"})
    sched.set_timesteps(8)
    s = ds.sampling_schedule(sched, 8, "ddpm")
    assert s.timesteps.tolist() == sched.timesteps.tolist()
    trainable = s.trainable(sched.alphas_cumprod)
    assert trainable[:-1].all() and not trainable[-1]  # DDPM's last step has no noise: no density
    ac = sched.alphas_cumprod
    torch.manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.empty(2, 9, 4, 8, 8)
    noise[:, 0] = x0
    x = x0.clone()
    for k, t in enumerate(sched.timesteps):
        out = toy_model(x, t.expand(2))
        g = torch.Generator().manual_seed(100 + k)
        noise[:, k + 1] = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + k))
        x = sched.step(out, t, x, generator=g).prev_sample
    traj = ds.sample_trajectories(toy_model, noise, s, ac, eta=1.0)
    torch.testing.assert_close(traj.final, x, rtol=1e-4, atol=1e-5)
    assert float(traj.log_probs[:, -1].abs().max()) == 0.0  # the deterministic step records 0


def test_log_prob_equals_float64_hand_computation():
    torch.manual_seed(2)
    sched = DDIMScheduler(**SD_CONFIG)
    s = ds.sampling_schedule(sched, 5, "ddim")
    ac = sched.alphas_cumprod
    noise = torch.randn(2, 6, 4, 4, 4)
    eta = 0.9
    traj = ds.sample_trajectories(toy_model, noise, s, ac, eta=eta)
    acd = ac.double()
    for k in range(5):
        t, tp = int(s.timesteps[k]), int(s.prev_timesteps[k])
        a_t = acd[t]
        a_p = acd[tp] if tp >= 0 else torch.tensor(s.final_alpha_cumprod, dtype=torch.float64)
        x = traj.latents[:, k].double()
        eps = toy_model(traj.latents[:, k], torch.full((2,), t)).double()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        var = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        mean = a_p.sqrt() * x0 + (1 - a_p - var).sqrt() * eps
        xp = traj.latents[:, k + 1].double()
        lp = -((xp - mean) ** 2) / (2 * var) - 0.5 * torch.log(var) - 0.5 * math.log(2 * math.pi)
        expected = lp.flatten(1).mean(1)  # per-element mean (the documented normalisation)
        torch.testing.assert_close(traj.log_probs[:, k].double(), expected, rtol=1e-5, atol=1e-5)


def test_rescoring_stored_transitions_reproduces_recorded_log_probs_and_carries_gradient():
    torch.manual_seed(3)
    sched = DDIMScheduler(**SD_CONFIG)
    s = ds.sampling_schedule(sched, 6, "ddim")
    ac = sched.alphas_cumprod
    traj = ds.sample_trajectories(toy_model, torch.randn(4, 7, 4, 4, 4), s, ac, eta=1.0)
    idx = torch.tensor([[0, 3], [1, 5], [2, 2], [4, 0]])
    lp = ds.transition_log_probs(toy_model, traj.latents, s, idx, ac, eta=1.0)
    torch.testing.assert_close(lp, traj.log_probs.gather(1, idx), rtol=1e-5, atol=1e-6)
    w = torch.tensor(1.0, requires_grad=True)
    lp2 = ds.transition_log_probs(lambda x, t: w * toy_model(x, t), traj.latents, s, idx, ac, eta=1.0)
    lp2.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad) and w.grad != 0


def test_rows_do_not_depend_on_their_batch():
    sched = DDIMScheduler(**SD_CONFIG)
    s = ds.sampling_schedule(sched, 4, "ddim")
    ac = sched.alphas_cumprod
    seeds = [11, 12, 13]
    together = ds.sample_trajectories(toy_model, ds.row_noise(seeds, 4, (4, 4, 4)), s, ac)
    alone = ds.sample_trajectories(toy_model, ds.row_noise(seeds[1:2], 4, (4, 4, 4)), s, ac)
    torch.testing.assert_close(together.latents[1:2], alone.latents)
    torch.testing.assert_close(together.log_probs[1:2], alone.log_probs)


def test_guided_model_is_classifier_free_guidance_on_a_tiny_unet():
    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip
    c = {"encoder_hidden_states": torch.randn(2, 3, 8)}
    u = {"encoder_hidden_states": torch.zeros(2, 3, 8)}
    fn = ds.guided_model(unet, c, u, 5.0, torch.float32)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        oc = unet(x, t, **c).sample
        ou = unet(x, t, **u).sample
        torch.testing.assert_close(fn(x, t), ou + 5.0 * (oc - ou), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ds.guided_model(unet, c, u, 1.0, torch.float32)(x, t), oc)


def test_eta_zero_is_refused():
    sched = DDIMScheduler(**SD_CONFIG)
    s = ds.sampling_schedule(sched, 2, "ddim")
    with pytest.raises(ValueError, match="eta > 0"):
        ds.sample_trajectories(toy_model, torch.randn(1, 3, 4, 2, 2), s, sched.alphas_cumprod, eta=0.0)


def test_sandbox_schedule_reads_the_shipped_scheduler():
    from diffalign.models import pipeline as mp

    comps = mp.load_components("sandbox")
    s = ds.sampling_schedule(comps.noise_scheduler, 10, "ddim")
    assert len(s) == 10 and int(s.timesteps[0]) == 901 and s.final_alpha_cumprod < 1.0
    assert scheduler_alphas_cumprod(comps.noise_scheduler).shape[0] == 1000


def test_euler_ancestral_equals_diffusers_step_for_same_noise():
    """SDXL-Turbo's sampler (Euler-ancestral, trailing spacing, 4 steps) is DDIM with η = 1 on its timesteps: the same
    latents as diffusers' EulerAncestralDiscreteScheduler (which works on x/√ᾱ) for the same noise draws."""
    from diffusers import EulerAncestralDiscreteScheduler

    cfg = {k: v for k, v in SD_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}
    sched = EulerAncestralDiscreteScheduler(**cfg, timestep_spacing="trailing")
    s = ds.sampling_schedule(sched, 4, "euler_ancestral")
    assert s.timesteps.tolist() == [999, 749, 499, 249]
    assert s.prev_timesteps.tolist() == [749, 499, 249, -1]
    trainable = s.trainable(sched.alphas_cumprod)
    assert trainable.tolist() == [True, True, True, False]  # σ → 0 at the end: no noise, no density
    ac = sched.alphas_cumprod
    n, shape = 3, (4, 8, 8)
    g = torch.Generator().manual_seed(7)
    draws = torch.randn((5, n, *shape), generator=g)  # x_T, then the step noises diffusers draws in order
    noise = draws.transpose(0, 1).contiguous()
    traj = ds.sample_trajectories(toy_model, noise, s, ac, eta=1.0)
    sched.set_timesteps(4)
    x_sigma = draws[0] * sched.init_noise_sigma
    g_diffusers = torch.Generator().manual_seed(7)
    torch.randn((n, *shape), generator=g_diffusers)  # x_T was drawn first
    for k, t in enumerate(sched.timesteps):
        model_in = sched.scale_model_input(x_sigma, t)  # = x in the DDIM (variance-preserving) coordinates
        torch.testing.assert_close(model_in, traj.latents[:, k], rtol=1e-4, atol=1e-4)
        out = toy_model(model_in, t.round().long().expand(n))
        x_sigma = sched.step(out, t, x_sigma, generator=g_diffusers).prev_sample
    # the final sample (σ = 0, ᾱ = 1) in both coordinates
    torch.testing.assert_close(traj.final, x_sigma, rtol=1e-4, atol=1e-4)


def test_guidance_at_most_one_runs_the_conditional_model_alone():
    """Distilled models sample with guidance 0, which diffusers' pipelines read as "no classifier-free guidance"."""
    calls = []

    class Net(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            calls.append(x.shape[0])
            return type("O", (), {"sample": x * encoder_hidden_states.mean()})()

    c = {"encoder_hidden_states": torch.full((2, 3, 4), 2.0)}
    u = {"encoder_hidden_states": torch.zeros(2, 3, 4)}
    x, t = torch.ones(2, 1, 2, 2), torch.tensor([5, 5])
    for guidance in (0.0, 1.0):
        torch.testing.assert_close(ds.guided_model(Net(), c, u, guidance, torch.float32)(x, t), 2 * x)
    assert calls == [2, 2]  # one conditional batch each, never the unconditional rows


def test_lcm_multistep_equals_diffusers_step_for_same_noise_and_rescores():
    """LCM / DMD2 sampling (x̂0, then re-noised with fresh noise) is DDIM with a per-step η: the same latents as
    diffusers' LCMScheduler for the same draws, and re-scoring the stored steps reproduces their log-probs."""
    from diffusers import LCMScheduler

    cfg = {k: v for k, v in SD_CONFIG.items() if k not in ("clip_sample",)}
    sched = LCMScheduler(**cfg)
    s = ds.sampling_schedule(sched, 4, "lcm")
    sched.set_timesteps(4)
    assert s.timesteps.tolist() == sched.timesteps.tolist()
    assert s.trainable(sched.alphas_cumprod).tolist() == [True, True, True, False]
    ac = sched.alphas_cumprod
    n, shape = 2, (4, 8, 8)
    g = torch.Generator().manual_seed(3)
    draws = torch.randn((5, n, *shape), generator=g)
    traj = ds.sample_trajectories(toy_model, draws.transpose(0, 1).contiguous(), s, ac, eta=1.0)
    x = draws[0] * sched.init_noise_sigma
    g_d = torch.Generator().manual_seed(3)
    torch.randn((n, *shape), generator=g_d)
    for k, t in enumerate(sched.timesteps):
        out = toy_model(x, t.expand(n))
        step = sched.step(out, t, x, generator=g_d)
        x = step.prev_sample if k < 3 else step.denoised
        torch.testing.assert_close(traj.latents[:, k + 1], x, rtol=1e-4, atol=1e-5)
    steps = torch.tensor([[0, 1, 2]] * n)
    again = ds.transition_log_probs(toy_model, traj.latents, s, steps, ac, eta=1.0)
    torch.testing.assert_close(again, traj.log_probs[:, :3], rtol=1e-5, atol=1e-5)
