"""InPO's DDIM-inversion noising: the inverse grid and steps equal diffusers' DDIMInverseScheduler, the implied noise
reconstructs x_t, one step matches its closed form, the extra noise is keyed per image, and a run resumes exactly."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import losses, run_script, tiny_args
from diffusers import DDIMInverseScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from tiny_models import build_tiny_sd, write_tiny_pairs

from diffalign.diffusion.inversion import (
    ddim_inversion_grid,
    ddim_inversion_noise,
    grid_noising,
    inverse_grid,
)
from diffalign.diffusion.noise import add_noise
from diffalign.sandbox import SANDBOX_PIPELINE


def _scheduler() -> DDIMInverseScheduler:
    return DDIMInverseScheduler.from_pretrained(SANDBOX_PIPELINE, subfolder="scheduler")


def test_inverse_grid_is_diffusers_grid():
    sched = _scheduler()
    for k in (1, 4, 10, 50):
        sched.set_timesteps(k)
        assert inverse_grid(1000, k, sched.config.steps_offset) == sched.timesteps.tolist()


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("t_end", [999, 450])
def test_inversion_equals_a_hand_run_ddim_inverse_scheduler_loop(t_end):
    unet, sched = _tiny_unet(), _scheduler()
    ehs = torch.randn(1, 3, 8)
    x0 = torch.randn(1, 4, 8, 8)
    sched.set_timesteps(10)
    x = x0.clone()
    with torch.no_grad():
        for s in sched.timesteps:
            if s > t_end:
                break
            x = sched.step(unet(x, s, encoder_hidden_states=ehs).sample, s, x).prev_sample
    ac = sched.alphas_cumprod
    xt, eps = ddim_inversion_noise(
        lambda x, s, rows: unet(x, s, encoder_hidden_states=ehs[rows]).sample, x0, torch.tensor([t_end]), ac,
        num_steps=10, eta=0.0, initial_alpha_cumprod=float(sched.initial_alpha_cumprod),
    )  # fmt: skip
    assert torch.allclose(xt, x, atol=1e-5), (xt - x).abs().max()
    # the implied noise reconstructs x_t at the sampled t
    assert torch.allclose(add_noise(x0, eps, torch.tensor([t_end]), ac), xt, atol=1e-5)


def test_one_inverse_step_has_the_closed_form():
    ac = _scheduler().alphas_cumprod.double()
    a_i, a_1, t = float(ac[0]), float(ac[1]), 700
    W = torch.randn(4, 4, dtype=torch.float64) * 0.3

    def model(x, s, rows):  # a linear "denoiser": eps_hat = W x (per pixel, over channels)
        return torch.einsum("oc,nchw->nohw", W, x.double()).float()

    x0 = torch.randn(2, 4, 3, 3)
    xt, eps = ddim_inversion_noise(model, x0, torch.tensor([t, t]), ac.float(), num_steps=1, eta=0.0)
    x0d = x0.double()
    e = torch.einsum("oc,nchw->nohw", W, x0d)
    x0_hat = (x0d - (1 - a_i) ** 0.5 * e) / a_i**0.5
    x1 = a_1**0.5 * x0_hat + (1 - a_1) ** 0.5 * e
    a_t = float(ac[t])
    assert torch.allclose(xt.double(), x1, atol=1e-5)
    assert torch.allclose(eps.double(), (x1 - a_t**0.5 * x0d) / (1 - a_t) ** 0.5, atol=1e-4)


def test_extra_noise_follows_the_per_image_generators():
    ac = _scheduler().alphas_cumprod
    zero = lambda x, s, rows: torch.zeros_like(x)  # noqa: E731
    x0, t = torch.randn(2, 4, 3, 3), torch.tensor([999, 999])

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return ddim_inversion_noise(zero, x0, t, ac, num_steps=2, eta=0.1, generators=gens)[0]

    assert torch.equal(run([1, 2]), run([1, 2]))
    a, b = run([1, 2]), run([1, 3])
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # each image its own stream
    # by hand for image 0, step 1 (s = 1 from the initial level) then step 2 (s = 501), zero model: eps_hat = 0
    g = torch.Generator().manual_seed(1)
    a_i, a1, a2 = float(ac[0]), float(ac[1]), float(ac[501])
    x = (a1 / a_i) ** 0.5 * x0[0]
    x = x + 0.1 * ((1 - a_i) / (1 - a1) * (1 - a1 / a_i)) ** 0.5 * torch.randn(x.shape, generator=g)
    x = (a2 / a1) ** 0.5 * x
    x = x + 0.1 * ((1 - a1) / (1 - a2) * (1 - a2 / a1)) ** 0.5 * torch.randn(x.shape, generator=g)
    assert torch.allclose(a[0], x, atol=1e-5)
    with pytest.raises(ValueError, match="one generator per row"):
        ddim_inversion_noise(zero, x0, t, ac, num_steps=2, eta=0.1)


def _args(model, data, out, *extra):
    inpo = ("--objective", "inpo", "--beta", "500", "--inversion_steps", "4", "--deterministic", "false")
    return tiny_args(model, data, out, *inpo, *extra, steps=4, checkpointing=2)


def _run(args):
    return run_script(args, timeout=600)


def test_inpo_trains_through_the_cli_and_resumes_bit_identically(tmp_path):
    model, data = build_tiny_sd(tmp_path / "sd"), write_tiny_pairs(tmp_path / "data", n=16, size=16)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    proc = _run(_args(model, data, straight))
    assert "noising ddim_inversion" in proc.stdout
    _run(_args(model, data, cut, "--max_train_steps", "2"))
    _run(_args(model, data, cut, "--resume_from_checkpoint", str(cut / "checkpoint-2")))
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(cut / "lora" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    curve = losses(straight)
    assert abs(curve[0] - 0.6931471805599453) < 1e-6  # untrained LoRA: margin 0 under any noising
    assert len(set(curve)) > 1


# ---- the cached variant: the reference inverts each image once, through the whole grid ----------------------------


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_stored_grid_gives_the_inversion_of_every_timestep():
    unet, sched = _tiny_unet(), _scheduler()
    ehs, x0 = torch.randn(4, 3, 8), torch.randn(4, 4, 8, 8)
    ac, init = sched.alphas_cumprod, float(sched.initial_alpha_cumprod)

    def model(x, s, rows):
        return unet(x, s, encoder_hidden_states=ehs[rows]).sample

    kw = dict(num_steps=10, eta=0.1, initial_alpha_cumprod=init)
    grid_latents = ddim_inversion_grid(model, x0, ac, generators=_gens([5, 6, 7, 8]), **kw)
    assert grid_latents.shape == (4, 10, 4, 8, 8)
    levels = inverse_grid(1000, 10, 1)
    for t in ([0, 1, 450, 999], [100, 101, 902, 37]):
        t = torch.tensor(t)
        want = ddim_inversion_noise(model, x0, t, ac, generators=_gens([5, 6, 7, 8]), **kw)
        got = grid_noising(grid_latents, x0, t, ac, levels)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-4)
    assert torch.equal(grid_noising(grid_latents, x0, torch.zeros(4, dtype=torch.long), ac, levels)[0], x0)


def test_cached_noising_inverts_each_image_once_and_matches_the_direct_inversion():
    from diffalign.diffusion.parts import NoisingContext, ddim_inversion_noising
    from diffalign.objectives.inpo import InPOParams

    unet, sched = _tiny_unet(), _scheduler()
    ehs = torch.randn(4, 3, 8)
    x0 = torch.randn(4, 4, 8, 8)
    ac, init = sched.alphas_cumprod, float(sched.initial_alpha_cumprod)
    calls = []

    def reference_of(batch):  # the step's reference call: its rows index the micro-batch, here images `batch`
        def reference(x, s, rows):
            calls.append(len(rows))
            return unet(x, s, encoder_hidden_states=ehs[batch][rows]).sample

        return reference

    params = InPOParams(inversion_model="reference", inversion_cache=True, inversion_steps=5)
    state: dict = {}
    keys, seeds = [(3, 0), (9, 0), (3, 1), (9, 1)], [11, 12, 13, 14]

    def ctx(rows):
        return NoisingContext(
            ac, "epsilon", params=params, reference_model=reference_of(rows), steps_offset=1, initial_alpha_cumprod=init,
            image_keys=lambda: [keys[r] for r in rows], image_seeds=lambda: [seeds[r] for r in rows], state=state,
        )  # fmt: skip

    t = torch.tensor([300, 999, 0, 650])
    noise = torch.randn_like(x0)  # not used by an inversion noising
    first = ddim_inversion_noising(x0, noise, t, ctx([0, 1, 2, 3]))
    assert calls == [4] * 5 and len(state["inversion_grid"]) == 4  # one pass through the 5-level grid
    want = ddim_inversion_noise(reference_of([0, 1, 2, 3]), x0, t, ac, num_steps=5, eta=0.1, initial_alpha_cumprod=init,
                                generators=_gens(seeds))  # fmt: skip
    assert torch.allclose(first[0], want[0], atol=1e-5) and torch.allclose(first[1], want[1], atol=1e-4)
    calls.clear()
    # a later epoch: other timesteps, the same images (in another batch order): no UNet pass at all
    t2 = torch.tensor([999, 120])
    again = ddim_inversion_noising(x0[[2, 1]], noise[:2], t2, ctx([2, 1]))
    assert calls == []
    want2 = ddim_inversion_noise(reference_of([2, 1]), x0[[2, 1]], t2, ac, num_steps=5, eta=0.1, initial_alpha_cumprod=init,
                                 generators=_gens([13, 12]))  # fmt: skip
    assert torch.allclose(again[0], want2[0], atol=1e-5)


def test_cached_inversion_config_errors():
    from diffalign.config import TrainConfig
    from diffalign.errors import ConfigError
    from diffalign.objectives.inpo import InPOParams

    with pytest.raises(ConfigError, match="inversion_cache=true needs inversion_model: reference"):
        InPOParams(inversion_cache=True)
    cached = InPOParams(inversion_model="reference", inversion_cache=True)
    with pytest.raises(ConfigError, match="needs random_flip: false"):
        TrainConfig(objective="inpo", params=cached, random_flip=True)
    with pytest.raises(ConfigError, match="needs prompt_dropout: 0"):
        TrainConfig(objective="inpo", params=cached, random_flip=False, prompt_dropout=0.1)
    TrainConfig(objective="inpo", params=cached, random_flip=False)


def test_cached_inversion_trains_through_the_cli_and_resumes_bit_identically(tmp_path):
    model, data = build_tiny_sd(tmp_path / "sd"), write_tiny_pairs(tmp_path / "data", n=16, size=16)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    cached = ("--inversion_model", "reference", "--inversion_cache", "true", "--random_flip", "false")
    _run(_args(model, data, straight, *cached))
    _run(_args(model, data, cut, *cached, "--max_train_steps", "2"))
    _run(_args(model, data, cut, *cached, "--resume_from_checkpoint", str(cut / "checkpoint-2")))
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(cut / "lora" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert abs(losses(straight)[0] - 0.6931471805599453) < 1e-6


@pytest.mark.parametrize("t_end", [0, 1, 57, 101, 650, 999])
def test_exact_t_puts_the_latent_at_level_t(t_end):
    """A model that always predicts the same ε makes DDIM inversion exact: every step keeps x̂0 = (x0 − √(1−ᾱ_i)·ε)/√ᾱ_i
    (ᾱ_i: the level the clean latent is taken at) and ε, so with the last step to t itself the latent is
    √ᾱ_t·x̂0 + √(1−ᾱ_t)·ε; the official grid stops at the level below t, which is that only on the grid."""
    ac = _scheduler().alphas_cumprod.float()
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(1, 4, 4, 4).expand(3, -1, -1, -1)

    def model(x, s, rows):
        return eps[: len(rows)]

    a_i = float(ac[0])
    x0_hat = (x0 - (1 - a_i) ** 0.5 * eps) / a_i**0.5
    t = torch.full((3,), t_end)
    expected = add_noise(x0_hat, eps, t, ac)
    xt, _ = ddim_inversion_noise(model, x0, t, ac, num_steps=10, eta=0.0, exact_t=True)
    assert torch.allclose(xt, expected, atol=1e-5)
    grid_xt, _ = ddim_inversion_noise(model, x0, t, ac, num_steps=10, eta=0.0)
    assert torch.allclose(grid_xt, expected, atol=1e-5) is (t_end in (0, 1, 101))  # on the grid (or t 0) only


def test_exact_t_draws_its_extra_noise_from_the_same_generators_and_is_refused_with_the_cache():
    from diffalign.errors import ConfigError
    from diffalign.objectives.inpo import InPOParams

    ac = _scheduler().alphas_cumprod.float()
    x0 = torch.randn(2, 4, 4, 4)

    def model(x, s, rows):
        return 0.1 * x

    def run(seed):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
        return ddim_inversion_noise(model, x0, torch.tensor([450, 450]), ac, num_steps=10, eta=0.1,
                                    generators=gens, exact_t=True)[0]  # fmt: skip

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(5))
    with pytest.raises(ConfigError, match="inversion_exact_t=true needs inversion_cache: false"):
        InPOParams(inversion_model="reference", inversion_cache=True, inversion_exact_t=True)


def test_a_minute_of_inpo_learns_the_held_out_preferences(tmp_path):
    """CI's proof that InPO learns, not only runs: the sandbox recipe with the cheap variant (the frozen reference
    inverts, each image's grid cached), 120 steps on the shipped data, then the implicit accuracy on the held-out
    validation + test pairs with InPO's own noising (their images inverted too, never trained on). Before training
    every margin is exactly 0 (LoRA off = reference); after it, the share of held-out pairs with a positive margin
    must beat chance by three binomial standard deviations."""
    from cli_helpers import heldout_before_and_after

    cheap = ("--inversion_model", "reference", "--inversion_cache", "true")
    before, after = heldout_before_and_after("sandbox_inpo.yaml", tmp_path, 120, *cheap)
    assert before["mean_margin"] == 0.0 and before["accuracy"] == 0.0
    print("held-out implicit accuracy after 120 InPO steps:", after)  # shown with pytest -s
    assert after["n"] > 500
    assert after["accuracy"] > after["chance_bound_3sd"] and after["mean_margin"] > 0, after
