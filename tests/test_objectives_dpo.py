"""Diffusion-DPO / SFT objectives: exact hand-computed values for every variant, β conventions, gradients, metrics.

Expected numbers are computed here with plain Python floats (``math``), never by calling the code under test.

Three hand-picked pairs (β = 4, official convention, Δ = (mθ_w − ref_w) − (mθ_l − ref_l), inside = −0.5·β·Δ),
with values exact in binary so that inside is exactly 1 / −0.75 / 0 in float32 (the hinge kink sits at 1):

    pair 0: mθ_w .25  ref_w .50  mθ_l .625  ref_l .375  Δ = −0.25 − 0.25  = −0.5    inside = +1.0
    pair 1: mθ_w .50  ref_w .25  mθ_l .375  ref_l .50   Δ = 0.25 + 0.125  = +0.375  inside = −0.75
    pair 2: mθ_w .20  ref_w .20  mθ_l .70   ref_l .70   Δ = 0                       inside = 0 (tie)
"""

import math

import pytest
import torch

from diffalign.diffusion import per_sample_mse, split_pair
from diffalign.objectives import (
    BETA_CONVENTIONS,
    DPO_METRICS,
    LOSS_TYPES,
    diffusion_dpo_loss,
    official_beta,
    sft_loss,
)

MW = [0.25, 0.50, 0.20]
RW = [0.50, 0.25, 0.20]
ML = [0.625, 0.375, 0.70]
RL = [0.375, 0.50, 0.70]
BETA = 4.0
INSIDE = [1.0, -0.75, 0.0]


def _errs(requires_grad: bool = False):
    mw = torch.tensor(MW, requires_grad=requires_grad)
    ml = torch.tensor(ML, requires_grad=requires_grad)
    return mw, ml, torch.tensor(RW), torch.tensor(RL)


def _neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_inside_by_hand_matches_table():
    # guards the table above: inside = -0.5 * beta * delta
    for i in range(3):
        delta = (MW[i] - RW[i]) - (ML[i] - RL[i])
        assert -0.5 * BETA * delta == pytest.approx(INSIDE[i], abs=1e-12)


def test_sigmoid_values_and_metrics():
    loss, m = diffusion_dpo_loss(*_errs(), beta=BETA)
    expected = [_neg_log_sigmoid(x) for x in INSIDE]  # 0.31326, 1.14813, log 2
    assert loss.dtype == torch.float32 and loss.shape == (3,)
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[2] == pytest.approx(math.log(2))
    assert set(m) == set(DPO_METRICS)
    assert m["implicit_acc"].tolist() == [1.0, 0.0, 0.5]
    assert m["reward_margin"].tolist() == INSIDE  # exact: binary-exact inputs
    # implicit rewards -0.5*beta*(model - ref) = -2*(model - ref): pair 1: -2*0.25 = -0.5 and -2*(-0.125) = 0.25
    assert m["reward_w"].tolist() == [0.5, -0.5, 0.0]
    assert m["reward_l"].tolist() == [-0.5, 0.25, 0.0]
    assert m["model_err_w"].tolist() == pytest.approx(MW)
    assert m["model_err_l"].tolist() == pytest.approx(ML)
    assert m["ref_err_w"].tolist() == pytest.approx(RW)
    assert m["ref_err_l"].tolist() == pytest.approx(RL)
    assert all(not v.requires_grad for v in m.values())


def test_label_smoothing_values_and_zero_equals_plain_sigmoid():
    eps = 0.1
    loss, _ = diffusion_dpo_loss(*_errs(), beta=BETA, label_smoothing=eps)
    expected = [(1 - eps) * _neg_log_sigmoid(x) + eps * _neg_log_sigmoid(-x) for x in INSIDE]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    plain, _ = diffusion_dpo_loss(*_errs(), beta=BETA)
    zero, _ = diffusion_dpo_loss(*_errs(), beta=BETA, label_smoothing=0.0)
    assert torch.equal(plain, zero)


def test_hinge_values():
    loss, m = diffusion_dpo_loss(*_errs(), beta=BETA, loss_type="hinge")
    assert loss.tolist() == [0.0, 1.75, 1.0]  # relu(1 - inside)
    assert m["implicit_acc"].tolist() == [1.0, 0.0, 0.5]


def test_ipo_values_and_equivalent_form():
    loss, _ = diffusion_dpo_loss(*_errs(), beta=BETA, loss_type="ipo")
    # z = -delta/2 = [0.25, -0.1875, 0]; target 1/(2*beta) = 0.125
    assert loss.tolist() == pytest.approx([0.015625, 0.09765625, 0.015625], abs=1e-9)
    # documented equivalent form (inside - 1/2)^2 / beta^2
    assert loss.tolist() == pytest.approx([(x - 0.5) ** 2 / BETA**2 for x in INSIDE], abs=1e-9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_diffusers_alias_is_half_official_beta(loss_type):
    official, m1 = diffusion_dpo_loss(*_errs(), beta=BETA, loss_type=loss_type)
    alias, m2 = diffusion_dpo_loss(*_errs(), beta=BETA / 2, loss_type=loss_type, beta_convention="diffusers")
    assert torch.equal(official, alias)
    assert torch.equal(m1["reward_margin"], m2["reward_margin"])
    assert official_beta(2500.0, "diffusers") == 5000.0
    assert official_beta(5000.0) == 5000.0
    assert BETA_CONVENTIONS == {"official": 1.0, "diffusers": 2.0}


def test_released_checkpoint_scale_beta_5000_and_2500():
    # realistic errors ~0.1; delta = (-0.0002) - (+0.0002) = -0.0004 -> inside = -0.5 * 5000 * -0.0004 = 1
    args = (torch.tensor([0.1000]), torch.tensor([0.1003]), torch.tensor([0.1002]), torch.tensor([0.1001]))
    official, m = diffusion_dpo_loss(*args, beta=5000.0)
    alias, _ = diffusion_dpo_loss(*args, beta=2500.0, beta_convention="diffusers")
    expected = _neg_log_sigmoid(1.0)  # 0.3132617
    assert official.item() == pytest.approx(expected, abs=2e-4)  # float32 rounding of 1e-4-sized differences
    assert m["reward_margin"].item() == pytest.approx(1.0, abs=5e-4)
    assert torch.equal(official, alias)
    # the diffusers script's own formula, written out: -logsigmoid(beta' * (ref_diff - model_diff))
    ref_diff, model_diff = 0.1002 - 0.1001, 0.1000 - 0.1003
    assert official.item() == pytest.approx(_neg_log_sigmoid(2500.0 * (ref_diff - model_diff)), abs=2e-4)


def test_sigmoid_gradients_flow_only_into_model_errors():
    mw, ml, rw, rl = _errs(requires_grad=True)
    rw.requires_grad_(True)
    rl.requires_grad_(True)
    loss, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=BETA)
    loss.sum().backward()
    # dL/d inside = -sigmoid(-inside); d inside/d mθ_w = -beta/2, d inside/d mθ_l = +beta/2
    expected_w = [0.5 * BETA * _sigmoid(-x) for x in INSIDE]
    assert mw.grad.tolist() == pytest.approx(expected_w, rel=1e-6)
    assert ml.grad.tolist() == pytest.approx([-g for g in expected_w], rel=1e-6)
    assert rw.grad is None and rl.grad is None  # reference errors are detached


def test_ipo_and_hinge_gradients():
    mw, ml, rw, rl = _errs(requires_grad=True)
    loss, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=BETA, loss_type="ipo")
    loss.sum().backward()
    # d/dmθ_w (z - 0.125)^2 with dz/dmθ_w = -1/2  ->  -(z - 0.125)
    assert mw.grad.tolist() == pytest.approx([-0.125, 0.3125, 0.125], abs=1e-7)
    mw, ml, rw, rl = _errs(requires_grad=True)
    loss, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=BETA, loss_type="hinge")
    loss.sum().backward()
    # active where inside < 1 (pairs 1, 2): d/dmθ_w (1 - inside) = +beta/2
    assert mw.grad.tolist() == [0.0, 2.0, 2.0]


def test_swapping_winner_and_loser_flips_the_preference():
    mw, ml, rw, rl = _errs()
    loss, m = diffusion_dpo_loss(mw, ml, rw, rl, beta=BETA)
    loss_s, m_s = diffusion_dpo_loss(ml, mw, rl, rw, beta=BETA)
    assert m_s["implicit_acc"].tolist() == [0.0, 1.0, 0.5]
    assert torch.allclose(m_s["reward_margin"], -m["reward_margin"])
    # -log σ(-x) - (-log σ(x)) = x
    assert torch.allclose(loss_s - loss, m["reward_margin"], atol=1e-6)


def test_composes_with_per_sample_mse_on_a_stacked_batch():
    # identical model and reference predictions -> every inside is exactly 0 -> loss log 2, accuracy 0.5
    torch.manual_seed(0)
    target = torch.randn(4, 3, 2, 2)
    pred = torch.randn(4, 3, 2, 2)
    model_w, model_l = split_pair(per_sample_mse(pred, target))
    ref_w, ref_l = split_pair(per_sample_mse(pred.clone(), target))
    loss, m = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l)
    assert loss.tolist() == pytest.approx([math.log(2)] * 2)
    assert m["implicit_acc"].tolist() == [0.5, 0.5]


def test_sft_loss_is_winner_denoising_error():
    mw = torch.tensor(MW, requires_grad=True)
    loss, m = sft_loss(mw)
    assert loss.tolist() == pytest.approx(MW)
    assert list(m) == ["model_err_w"] and m["model_err_w"].tolist() == pytest.approx(MW)
    loss.mean().backward()
    assert mw.grad.tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match=r"\[B\]"):
        sft_loss(torch.zeros(2, 2))


def test_bad_arguments_raise_helpful_errors():
    e = _errs()
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        diffusion_dpo_loss(*e, loss_type="kto")
    with pytest.raises(ValueError, match="official, diffusers"):
        diffusion_dpo_loss(*e, beta_convention="trl")
    with pytest.raises(ValueError, match="beta must be > 0"):
        diffusion_dpo_loss(*e, beta=0.0)
    with pytest.raises(ValueError, match="only defined for loss_type='sigmoid'"):
        diffusion_dpo_loss(*e, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        diffusion_dpo_loss(*e, label_smoothing=0.5)
    with pytest.raises(ValueError, match="same shape"):
        diffusion_dpo_loss(e[0], e[1][:2], e[2], e[3])
    with pytest.raises(ValueError, match="same shape"):
        diffusion_dpo_loss(*(x.reshape(3, 1) for x in e))
