"""The replaceable parts of the training step (diffusion/parts.py, models/conditioning.py) and the registry's
contract, against hand computations."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from diffalign.diffusion import parts
from diffalign.diffusion.noise import add_noise, prediction_target
from diffalign.errors import ConfigError
from diffalign.models.conditioning import Conditioning, drop_prompts
from diffalign.objectives.registry import OBJECTIVE_MODULES, ObjectiveSpec, get_objective

AC = torch.linspace(0.999, 0.01, 1000)  # a stand-in alphas_cumprod


def _ctx(prediction_type="epsilon"):
    return parts.NoisingContext(AC, prediction_type)


def test_grid_timesteps_draw_only_grid_values_and_uniform_covers_the_range():
    idx = torch.arange(400)
    t, _, _ = parts.pair_randomness(idx, 0, 0, (1, 2, 2), 1000, "grid", (249, 499, 749, 999))
    assert set(t.tolist()) == {249, 499, 749, 999}
    u, _, _ = parts.pair_randomness(idx, 0, 0, (1, 2, 2), 1000, "uniform")
    assert 0 <= u.min() and u.max() < 1000 and len(set(u.tolist())) > 300
    # the timestep draw comes first, so the noise of a pair is the same whichever sampler drew its timestep
    assert torch.equal(parts.pair_randomness(idx[:3], 0, 0, (1, 2, 2), 1000, "grid", (9,))[1],
                       parts.pair_randomness(idx[:3], 0, 0, (1, 2, 2), 1000)[1])  # fmt: skip
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        parts.pair_randomness(idx[:1], 0, 0, (1,), 1000, "grid", (1000,))


def test_gaussian_noising_is_the_forward_process():
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    xt, used = parts.gaussian_noising(x0, eps, t, _ctx())
    assert torch.equal(xt, add_noise(x0, eps, t, AC)) and used is eps
    a = AC[500]
    assert torch.allclose(xt[1], a.sqrt() * x0[1] + (1 - a).sqrt() * eps[1])


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_x0_recovered_from_an_exact_prediction(ptype):
    x0, eps, t = (
        torch.randn(3, 4, 2, 2, dtype=torch.float64),
        torch.randn(3, 4, 2, 2, dtype=torch.float64),
        torch.tensor([1, 400, 900]),
    )
    ac = AC.double()
    xt = add_noise(x0, eps, t, ac)
    exact = prediction_target(x0, eps, t, ac, ptype)
    assert torch.allclose(parts.x0_from_prediction(exact, xt, t, ac, ptype), x0, atol=1e-9)


def test_snr_weighted_x0_error_equals_the_epsilon_error():
    # eps model: x0_hat - x0 = -sqrt(1-a)/sqrt(a) (eps_hat - eps), so sigma^-2 * |x0_hat - x0|^2 = |eps_hat - eps|^2
    x0, eps, t = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3), torch.tensor([10, 300, 600, 950])
    xt = add_noise(x0, eps, t, AC)
    pred = eps + 0.1 * torch.randn_like(eps)
    ctx = _ctx()
    target_err = parts.target_space_error(pred, x0, eps, xt, t, ctx)
    x0_err = parts.x0_space_error(pred, x0, eps, xt, t, ctx, "snr")
    assert torch.allclose(x0_err, target_err, rtol=1e-3)
    plain = parts.x0_space_error(pred, x0, eps, xt, t, ctx, "none")
    a = AC[t]
    assert torch.allclose(plain, target_err * (1 - a) / a, rtol=1e-3)
    with pytest.raises(ValueError, match="weighting"):
        parts.x0_space_error(pred, x0, eps, xt, t, ctx, "edm2")


def test_conditioning_casts_every_float_input_and_drop_prompts_uses_the_empty_caption():
    c = Conditioning(torch.ones(2, 3, 4), {"text_embeds": torch.ones(2, 5), "time_ids": torch.ones(2, 6)},
                     cross_attention_kwargs={"scale": 0.5}, timestep_cond=torch.ones(2, 7))  # fmt: skip
    kw = c.unet_kwargs(torch.bfloat16)
    assert kw["encoder_hidden_states"].dtype == torch.bfloat16 and kw["timestep_cond"].dtype == torch.bfloat16
    assert {v.dtype for v in kw["added_cond_kwargs"].values()} == {torch.bfloat16}
    assert kw["cross_attention_kwargs"] == {"scale": 0.5}
    text = {"prompt_embeds": torch.ones(3, 2, 2)}
    out = drop_prompts(text, {"prompt_embeds": torch.zeros(1, 2, 2)}, torch.tensor([False, True, False]))
    assert out["prompt_embeds"][:, 0, 0].tolist() == [1.0, 0.0, 1.0]


def test_registry_contract():
    for name in OBJECTIVE_MODULES:
        spec = get_objective(name)
        assert spec.name == name and dataclasses.is_dataclass(spec.params) and spec.description
        for f in dataclasses.fields(spec.params):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    assert get_objective("sft").uses_losers is False and get_objective("sft").needs_reference is False
    with pytest.raises(
        ConfigError,
        match=r"choose one of \['ddpo', 'dpo', 'dreambooth', 'dreambooth_prior', 'inpo', 'ppd', 'prdp', 'pso', 'pso_hinge', 'pso_online', 'pso_pairs', 'rpo', 'sft'\]",
    ):
        get_objective("dpo2")
    with pytest.raises(ValueError, match="noising='inversion'"):
        ObjectiveSpec(name="x", loss=lambda x, p: x, description="", noising="inversion")


def test_no_method_branches_outside_objectives():
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"objective\s*[!=]=|objective\s+in\s*[\(\[{]")
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in [*root.joinpath("diffalign").rglob("*.py"), *root.joinpath("scripts").glob("*.py")]
        if "objectives" not in p.parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"method branches outside diffalign/objectives/: {offenders}"


def test_sdxl_vae_stays_float32_under_fp16():
    from diffalign.training.run import frozen_dtype

    assert frozen_dtype(True, True, torch.float16) == torch.float32  # SDXL's VAE NaNs in fp16
    assert frozen_dtype(True, True, torch.bfloat16) == torch.bfloat16
    assert frozen_dtype(True, False, torch.float16) == torch.float16  # SD1.x's VAE is fine in fp16
    assert frozen_dtype(False, True, torch.float16) == torch.float16  # text encoders follow the compute dtype
    assert frozen_dtype(True, True, torch.float32) == torch.float32
