"""scripts/gradient_noise.py: the noise-scale estimates against hand-computed values, and the script on the sandbox."""

import importlib.util
import json
import math

import pytest
import torch
from cli_helpers import REPO

spec = importlib.util.spec_from_file_location("gradient_noise", REPO / "scripts" / "gradient_noise.py")
gn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gn)


def test_noise_scale_matches_a_hand_computation():
    # g = (1,0), (0,1), (1,1); |g|^2 = 1, 1, 2; the sum (2,2) has |.|^2 = 8
    # mean g_i.g_j over i != j = (8 - 4) / (3 * 2) = 2/3; variance = 4/3 - 2/3 = 2/3
    # critical batch = B * var / cross = 2 * 1 = 2; cosines 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3
    # leave-one-out: row sums off the diagonal 1, 1, 2 -> (4 - 2 r_k) / (2 * 1) = 1, 1, 0; mean 2/3;
    # jackknife SE = sqrt(2/3 * (1/9 + 1/9 + 4/9)) = 2/3; lower bound = 2 * (2/3) / (2/3 + 2 * 2/3) = 2/3
    est = gn.noise_scale(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), prompts_per_grad=2)
    assert est["expected_grad_sq_norm"] == pytest.approx(2 / 3)
    assert est["micro_batch_variance"] == pytest.approx(2 / 3)
    assert est["critical_batch_prompts"] == pytest.approx(2.0)
    assert est["snr_per_micro_batch"] == pytest.approx(1.0)
    assert est["mean_pairwise_cosine"] == pytest.approx(math.sqrt(2) / 3)
    assert est["expected_grad_sq_norm_se"] == pytest.approx(2 / 3)
    assert est["critical_batch_prompts_lower_bound"] == pytest.approx(2 / 3)


def test_noise_scale_separates_signal_from_noise():
    g = torch.Generator().manual_seed(0)
    signal = torch.zeros(4000)
    signal[0] = 1.0
    noisy = signal + torch.randn(64, 4000, generator=g)  # per-gradient noise variance 4000 against |G|^2 = 1
    est = gn.noise_scale(noisy, prompts_per_grad=1)
    assert est["expected_grad_sq_norm"] == pytest.approx(1.0, abs=1.0)  # unbiased, though noisy
    assert est["critical_batch_prompts"] > 1000 and abs(est["mean_pairwise_cosine"]) < 0.01
    clean = gn.noise_scale(signal.repeat(8, 1), prompts_per_grad=4)
    assert (
        clean["micro_batch_variance"] == pytest.approx(0.0, abs=1e-12)
        and clean["critical_batch_prompts"] == 0
    )
    assert (
        est["critical_batch_prompts_lower_bound"] > 400
    )  # the bound says as much though G is barely resolved
    with pytest.raises(ValueError):
        gn.noise_scale(signal.repeat(2, 1), prompts_per_grad=1)


def test_expected_cosine_ignores_the_shared_noise_of_paired_gradients():
    g = torch.Generator().manual_seed(1)
    a_sig, b_sig = torch.zeros(2000), torch.zeros(2000)
    a_sig[0], b_sig[1] = 1.0, 1.0  # orthogonal expected gradients
    shared = torch.randn(400, 2000, generator=g) * 0.7  # the same samples' noise in both
    cos = gn.expected_cosine(a_sig + shared, b_sig + shared)
    naive = torch.nn.functional.cosine_similarity((a_sig + shared).mean(0), (b_sig + shared).mean(0), dim=0)
    assert abs(cos) < 0.3 and naive > 0.5  # the plain cosine of the means is dominated by the shared noise
    assert gn.expected_cosine(a_sig + shared, a_sig + shared) == pytest.approx(1.0)


@pytest.mark.parametrize("config", ["sandbox_prdp.yaml", "sandbox_ddpo.yaml"])
def test_the_script_runs_an_online_recipe_and_writes_its_table(tmp_path, capsys, config):
    out = tmp_path / "g.json"
    gn.main([
        "--config", str(REPO / "configs" / config), "--epochs", "2", "--prompts_per_epoch", "4", "--images_per_prompt", "2", "--train_batch_size", "2",
        "--sample_steps", "4", "--compare_reward", "sandbox-judge", "--out", str(out),
    ])  # fmt: skip
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert set(res["rewards"]) == {"sandbox-vp-onpolicy", "sandbox-judge"} and res["prompts_per_update"] == 2
    for est in res["rewards"].values():
        assert est["n_gradients"] == 4 and est["micro_batch_grad_sq_norm"] > 0
    assert "critical batch" in printed and "cosine_of_expected_gradients" in res
    assert res["objective"] == config.split("_")[1].split(".")[0]


def test_the_script_measures_the_offline_core_step_in_pairs(tmp_path, capsys):
    out = tmp_path / "dpo.json"
    gn.main([
        "--config", str(REPO / "configs" / "sandbox_dpo.yaml"), "--batches", "3", "--train_batch_size", "2",
        "--max_train_samples", "16", "--cache_dir", str(tmp_path / "cache"), "--out", str(out),
    ])  # fmt: skip
    res = json.loads(out.read_text())
    est = res["rewards"]["preference labels"]
    assert res["objective"] == "dpo" and res["pairs_per_update"] == 2 and est["n_gradients"] == 3
    assert est["prompts_per_gradient"] == 2 and est["micro_batch_grad_sq_norm"] > 0
    assert "critical batch, pairs" in capsys.readouterr().out
