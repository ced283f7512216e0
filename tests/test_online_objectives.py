"""PRDP and DDPO, the online objectives: their losses, metrics and DDPO's per-prompt stat tracker against values
derived by hand (in the comments), the gradients of clipped terms, the specs and the parameter checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.errors import ConfigError
from diffalign.objectives.ddpo import DDPOParams, ddpo_loss, ddpo_prepare_rewards
from diffalign.objectives.inputs import TrajectoryLogProbs
from diffalign.objectives.prdp import PRDP_METRICS, PRDPParams, prdp_loss
from diffalign.objectives.registry import get_objective


def _t(x, grad=False):
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def _close(tensor, expected, tol=1e-6):
    assert tensor.shape == (len(expected),), (tensor.shape, expected)
    assert tensor.tolist() == pytest.approx(expected, rel=tol, abs=tol)


# ---------------------------------------------------------------------------------------------------------------
# PRDP


def test_prdp_group_of_three_by_hand():
    # log_ratio = log_prob − ref = [[0.5, 2.5], [0, 2], [−1, 0]] → r̂ = mean over steps = [1.5, 1, −0.5].
    # rewards [0.5, 2, 1]: pairs with r_a > r_b, a-major: (1,0), (1,2), (2,0) (trajectory 0 beats nobody).
    # pred = r̂a − r̂b = [−0.5, 1.5, −2]; target = Δr/β (β = 1) = [1.5, 1, 0.5]
    # mse = [(−2)², 0.5², (−2.5)²] = [4, 0.25, 6.25]. old = current and ε = 10: clipping never binds.
    log_prob = _t([[1.0, 3.0], [0.0, 2.0], [-1.0, -1.0]], grad=True)
    ref = _t([[0.5, 0.5], [0.0, 0.0], [0.0, -1.0]])
    loss, m = prdp_loss(
        log_prob, log_prob.detach(), ref, _t([0.5, 2.0, 1.0]), torch.zeros(3, dtype=torch.long),
        beta=1.0, clip_range=10.0,
    )  # fmt: skip
    _close(loss, [4.0, 0.25, 6.25])
    assert set(m) == set(PRDP_METRICS)
    _close(m["pairs"], [3.0])
    _close(m["clip_frac"], [0.0, 0.0, 0.0])
    _close(m["pred_diff"], [-0.5, 1.5, -2.0])
    _close(m["target_diff"], [1.5, 1.0, 0.5])
    _close(m["log_ratio"], [1.5, 1.0, -0.5])
    _close(m["approx_kl_old"], [0.0, 0.0, 0.0])
    assert all(not v.requires_grad and v.dim() == 1 for v in m.values())

    # β = 0.5 doubles the targets: [3, 2, 1] → mse = [(−0.5−3)², (1.5−2)², (−2−1)²] = [12.25, 0.25, 9].
    loss, m = prdp_loss(
        log_prob, log_prob.detach(), ref, _t([0.5, 2.0, 1.0]), torch.zeros(3, dtype=torch.long),
        beta=0.5, clip_range=10.0,
    )  # fmt: skip
    _close(loss, [12.25, 0.25, 9.0])
    _close(m["target_diff"], [3.0, 2.0, 1.0])


def _clip_case(beta):
    # ref = 0, old = 0, ε = 0.1. Trajectory 0: log_ratio [0.5, 0.05], clipped to [0.1, 0.05];
    # trajectory 1: [0, 0] (inside the range). rewards [1, 0]: one pair (0, 1), target 1/β.
    log_prob = _t([[0.5, 0.05], [0.0, 0.0]], grad=True)
    zeros = torch.zeros(2, 2)
    loss, m = prdp_loss(
        log_prob, zeros, zeros, _t([1.0, 0.0]), torch.zeros(2, dtype=torch.long), beta=beta, clip_range=0.1
    )
    loss.mean().backward()
    return loss, m, log_prob.grad


def test_prdp_clipped_term_wins_and_has_zero_gradient_where_clipped():
    # r̂ = [0.275, 0], r̂_c = [0.075, 0]; β = 1, target 1.
    # mse_u = (0.275 − 1)² = 0.525625, mse_c = (0.075 − 1)² = 0.855625 → the clipped one is the max.
    loss, m, grad = _clip_case(beta=1.0)
    _close(loss, [0.855625])
    _close(m["clip_frac"], [1.0])
    _close(m["pred_diff"], [0.275])
    # approx_kl_old = 0.5·mean([0.25, 0.0025]) = 0.063125 for trajectory 0, 0 for trajectory 1.
    _close(m["approx_kl_old"], [0.063125, 0.0])
    # d/d log_prob of (r̂_c0 − r̂_c1 − 1)²: 2·(−0.925)·(1/2) = −0.925 for the unclipped step of trajectory 0,
    # 0 for its clipped step, +0.925 for both steps of trajectory 1.
    assert grad[0, 0].item() == 0.0
    _close(grad.reshape(-1), [0.0, -0.925, 0.925, 0.925])


def test_prdp_unclipped_term_wins_when_it_is_worse():
    # β = 100: target 0.01. mse_u = (0.275 − 0.01)² = 0.070225 > mse_c = (0.075 − 0.01)² = 0.004225.
    # The gradient then flows through the unclipped mean: 2·0.265·(1/2) = 0.265 on both steps of trajectory 0.
    loss, m, grad = _clip_case(beta=100.0)
    _close(loss, [0.070225])
    _close(m["clip_frac"], [0.0])
    _close(grad.reshape(-1), [0.265, 0.265, -0.265, -0.265])


def test_prdp_equal_rewards_dropped_and_groups_never_crossed():
    lp = _t([[1.0], [2.0], [3.0], [4.0]])
    zeros = torch.zeros(4, 1)
    # One group, rewards [1, 1, 0, 0]: pairs (0,2), (0,3), (1,2), (1,3); the ties (0,1) and (2,3) are dropped.
    loss, m = prdp_loss(lp, lp, zeros, _t([1.0, 1.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long),
                        beta=1.0, clip_range=1.0)  # fmt: skip
    _close(m["pairs"], [4.0])
    _close(m["pred_diff"], [1.0 - 3.0, 1.0 - 4.0, 2.0 - 3.0, 2.0 - 4.0])
    # Two groups [0, 0, 1, 1], rewards [1, 0, 5, 3]: only (0,1) and (2,3), though 5 > 1, 3 > 0 across groups.
    # pred = [1−2, 3−4] = [−1, −1]; target = [1, 2]; mse = [4, 9].
    loss, m = prdp_loss(lp, lp, zeros, _t([1.0, 0.0, 5.0, 3.0]), torch.tensor([0, 0, 1, 1]),
                        beta=1.0, clip_range=1.0)  # fmt: skip
    _close(m["pairs"], [2.0])
    _close(loss, [4.0, 9.0])


@pytest.mark.parametrize(
    "rewards, groups",
    [([1.0, 1.0, 1.0], [0, 0, 0]), ([1.0, 2.0, 3.0], [0, 1, 2])],
    ids=["ties", "singletons"],
)
def test_prdp_without_pairs_backpropagates_zero(rewards, groups):
    lp = _t([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], grad=True)
    loss, m = prdp_loss(lp, lp.detach(), torch.zeros(3, 2), _t(rewards), torch.tensor(groups),
                        beta=1.0, clip_range=0.1)  # fmt: skip
    assert loss.shape == (1,) and loss.item() == 0.0
    loss.mean().backward()
    assert lp.grad is not None and torch.equal(lp.grad, torch.zeros(3, 2))
    _close(m["pairs"], [0.0])
    assert all(v.numel() >= 1 and v.float().mean().isfinite() for v in m.values())


def test_prdp_spec_and_adapter():
    spec = get_objective("prdp")
    assert spec.loop == "online" and spec.inputs == "trajectory_logprobs" and spec.needs_reference
    assert spec.min_images_per_prompt == 2 and spec.metric_prefix == "prdp" and spec.prepare_rewards is None
    lp = _t([[1.0], [0.0]])
    # r̂ = [1, 0], rewards [0, 2] → pair (1, 0): pred −1, target 2/β = 4 (β 0.5), mse 25.
    x = TrajectoryLogProbs(
        lp, lp, _t([0.0, 2.0]), torch.zeros(2, dtype=torch.long), log_prob_ref=torch.zeros(2, 1)
    )
    loss, _ = spec.loss(x, PRDPParams(beta=0.5, clip_range=1.0))
    _close(loss, [25.0])


@pytest.mark.parametrize("field, value", [("beta", 0.0), ("beta", -1.0), ("clip_range", 0.0)])
def test_prdp_params_validation(field, value):
    with pytest.raises(ConfigError, match=field):
        PRDPParams(**{field: value})


# ---------------------------------------------------------------------------------------------------------------
# DDPO


def test_ddpo_loss_by_hand():
    # ε = 0.2, old = 0, ratios ρ = [1, 1.5, 0.5] in both trajectories; A = +2 and −1.
    # A = +2: −Aρ = [−2, −3, −1], −A·clip(ρ) = −2·[1, 1.2, 0.8] = [−2, −2.4, −1.6] → max [−2, −2.4, −1]
    # A = −1: −Aρ = [1, 1.5, 0.5], −A·clip(ρ) = [1, 1.2, 0.8] → max [1, 1.5, 0.8]
    steps = [0.0, math.log(1.5), math.log(0.5)]
    lp = _t([steps, steps], grad=True)
    loss, m = ddpo_loss(lp, torch.zeros(2, 3), _t([2.0, -1.0]), clip_range=0.2, adv_clip_max=5.0)
    _close(loss, [-2.0, -2.4, -1.0, 1.0, 1.5, 0.8], tol=1e-6)
    _close(m["clip_frac"], [0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    # 0.5·mean([0, ln1.5², ln0.5²]) = 0.5·(0.16440195 + 0.48045301)/3 = 0.10747583
    _close(m["approx_kl"], [0.10747583, 0.10747583], tol=1e-6)
    _close(m["advantage"], [2.0, -1.0])
    # d/d log_prob of the chosen term −A·ρ is −A·ρ; a clipped choice gives 0; at ρ = 1 both terms agree (−A).
    loss.sum().backward()
    _close(lp.grad.reshape(-1), [-2.0, 0.0, -1.0, 1.0, 1.5, 0.0], tol=1e-6)


def test_ddpo_advantage_clamp_and_adapter_reward_metric():
    spec = get_objective("ddpo")
    assert spec.loop == "online" and spec.inputs == "trajectory_logprobs" and not spec.needs_reference
    assert spec.prepare_rewards is ddpo_prepare_rewards and spec.metric_prefix == "ddpo"
    # ρ = 1: loss = −clamp(A, ±5) → A = 7 → −5, A = −9 → +5.
    x = TrajectoryLogProbs(torch.zeros(2, 1), torch.zeros(2, 1), _t([0.3, 0.7]), torch.tensor([0, 1]),
                           advantages=_t([7.0, -9.0]))  # fmt: skip
    loss, m = spec.loss(x, DDPOParams(adv_clip_max=5.0))
    _close(loss, [-5.0, 5.0])
    _close(m["advantage"], [5.0, -5.0])
    _close(m["reward"], [0.3, 0.7])
    with pytest.raises(ValueError, match="prepare_rewards"):
        spec.loss(TrajectoryLogProbs(torch.zeros(2, 1), torch.zeros(2, 1), _t([0.0, 1.0]), torch.tensor([0, 1])),
                  DDPOParams())  # fmt: skip


def test_ddpo_stat_tracker_by_hand():
    params = DDPOParams(stat_buffer_size=4, stat_min_count=3)
    state: dict = {}
    # Call 1: buffers a = [1, 3], b = [2, 6] hold 2 < 3 values → the call's global stats:
    # mean 3, population var (4 + 0 + 1 + 9)/4 = 3.5, std √3.5 = 1.87082869 → adv = (r − 3)/(1.87082869 + 1e-6).
    adv = ddpo_prepare_rewards(torch.tensor([1.0, 3.0, 2.0, 6.0]), ["a", "a", "b", "b"], params, state)
    assert adv.dtype == torch.float32 and adv.shape == (4,)
    _close(adv, [-1.06904497, 0.0, -0.53452248, 1.60356745], tol=1e-5)
    state = json.loads(json.dumps(state))
    assert state == {"per_prompt": {"a": [1.0, 3.0], "b": [2.0, 6.0]}}

    # Call 2 (append first, then compute): a = [1, 3, 5, 7]: mean 4, var (9+1+1+9)/4 = 5, std 2.23606798 →
    # (5−4)/std = 0.44721360, (7−4)/std = 1.34164079. b = [2, 6, 9]: mean 17/3, var (121+1+100)/27 = 8.2222…,
    # std 2.86744176 → (9 − 17/3)/std = 1.16247639. (Computing before appending would use the call's stats.)
    adv = ddpo_prepare_rewards(np.array([5.0, 7.0, 9.0]), ["a", "a", "b"], params, state)
    _close(adv, [0.44721360, 1.34164079, 1.16247639], tol=1e-5)
    state = json.loads(json.dumps(state))

    # Call 3: a = [1, 3, 5, 7, 9] keeps the last 4 → [3, 5, 7, 9]: mean 6, std √5 → (9 − 6)/√5 = 1.34164079
    # (without truncation: mean 5, std √8 → 1.41421356).
    adv = ddpo_prepare_rewards([9.0], ["a"], params, state)
    _close(adv, [1.34164079], tol=1e-5)
    assert state["per_prompt"]["a"] == [3.0, 5.0, 7.0, 9.0] and state["per_prompt"]["b"] == [2.0, 6.0, 9.0]


def test_ddpo_global_normalisation_without_tracking():
    # (r − 3)/(√3.5 + 1e-8); the state is left alone.
    state: dict = {}
    adv = ddpo_prepare_rewards(
        torch.tensor([1.0, 3.0, 2.0, 6.0]),
        ["a", "a", "b", "b"],
        DDPOParams(per_prompt_stat_tracking=False),
        state,
    )
    _close(adv, [-1.06904497, 0.0, -0.53452248, 1.60356745], tol=1e-6)
    assert state == {}


@pytest.mark.parametrize(
    "field, value",
    [("clip_range", 0.0), ("adv_clip_max", -1.0), ("stat_buffer_size", 0), ("stat_min_count", 0),
     ("stat_min_count", 17)],
)  # fmt: skip
def test_ddpo_params_validation(field, value):
    with pytest.raises(ConfigError, match=field):
        DDPOParams(**{field: value})


def test_online_objectives_do_not_import_torch():
    code = (
        "import sys, diffalign.objectives.prdp, diffalign.objectives.ddpo; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
