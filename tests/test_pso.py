"""PSO: the offline losses (with and without a reference) and the online clamped-ratio loss against hand-computed
values and gradients, the model's own samples (drawn once or per round, keyed per pair, kept in checkpoints), and a
run through the training script on a tiny pipeline and on SDXL conditioning that resumes bit-identically."""

from __future__ import annotations

import math

import pytest
import torch
from cli_helpers import losses, run_script, tiny_args
from safetensors.torch import load_file
from tiny_models import build_tiny_sd, build_tiny_sdxl, write_tiny_pairs

from diffalign.config import TrainConfig, parse_config
from diffalign.errors import ConfigError
from diffalign.objectives.pso import PSOPairsParams, PSOParams, pso_hinge_loss, pso_loss, pso_online_loss
from diffalign.objectives.registry import get_objective


def t(*v):
    return torch.tensor(v, dtype=torch.float32, requires_grad=True)


# ---- offline losses ----------------------------------------------------------------------------------------------


def test_pso_with_reference_by_hand():
    mw, ml, rw, rl = t(0.2), t(0.5), t(0.3), t(0.4)
    loss, m = pso_loss(mw, ml, rw, rl, beta=5.0, gamma=0.1, prior_weight=0.5)
    # logits = (0.3 - 0.2) - 0.1 (0.4 - 0.5) = 0.11; -log σ(0.55) = log(1 + e^-0.55) = 0.455493; prior 0.5 * 0.5
    assert m["reward_margin"].item() == pytest.approx(0.11, abs=1e-7)
    assert loss.item() == pytest.approx(0.455493 + 0.25, abs=2e-6)
    loss.sum().backward()
    s = 1 / (1 + math.exp(0.55))  # σ(-β logits): d(-log σ(z))/dz = -σ(-z)
    assert mw.grad.item() == pytest.approx(5 * s, abs=1e-6)  # d logits / d θ_w = -1
    assert ml.grad.item() == pytest.approx(-5 * 0.1 * s + 0.5, abs=1e-6)  # d logits / d θ_l = +γ; prior 0.5
    assert rw.grad is None and rl.grad is None  # the reference errors are constants
    assert m["implicit_acc"].item() == 1.0 and m["prior"].item() == pytest.approx(0.25)


def test_pso_hinge_by_hand_active_and_saturated():
    mw, ml = t(0.2, 0.01), t(0.5, 0.5)
    loss, m = pso_hinge_loss(mw, ml, beta=5.0, gamma=0.1, prior_weight=0.5)
    # pair 0: logits = -(0.2 - 0.05) = -0.15 -> relu(1 + 0.75) = 1.75, + prior 0.25
    # pair 1: logits = -(0.01 - 0.05) = 0.04 -> relu(1 - 0.2) = 0.8, + 0.25
    assert loss.tolist() == pytest.approx([2.0, 1.05], abs=1e-6)
    assert m["reward_margin"].tolist() == pytest.approx([-0.15, 0.04], abs=1e-7)
    loss.sum().backward()
    assert mw.grad.tolist() == pytest.approx([5.0, 5.0])
    assert ml.grad.tolist() == pytest.approx([-0.5 + 0.5, -0.5 + 0.5])
    # β 50 on pair 1: 1 - 50 * 0.04 = -1 -> the hinge is satisfied, only the prior remains
    mw, ml = t(0.01), t(0.5)
    loss, _ = pso_hinge_loss(mw, ml, beta=50.0, gamma=0.1, prior_weight=0.5)
    loss.sum().backward()
    assert (
        loss.item() == pytest.approx(0.25) and mw.grad.item() == 0.0 and ml.grad.item() == pytest.approx(0.5)
    )


def test_pso_specs_train_at_the_grid_in_x0_space_against_the_models_own_samples():
    for name, needs_ref in (("pso", True), ("pso_hinge", False)):
        spec = get_objective(name)
        assert spec.timesteps == "grid" and spec.error_space == "x0" and spec.loser_source == "model_samples"
        assert spec.needs_reference is needs_ref and spec.uses_losers and spec.shared_noise
    p = PSOParams()
    assert p.timestep_grid == [249, 499, 749, 999] and p.error_weighting == "snr" and p.gamma == 0.1
    online = get_objective("pso_online")
    assert online.loop == "online" and online.needs_reference and online.min_images_per_prompt == 2
    with pytest.raises(ConfigError, match="gamma"):
        PSOParams(gamma=1.5)
    with pytest.raises(ConfigError, match="model_sample_sampler"):
        PSOParams(model_sample_sampler="lms")
    cfg = parse_config(TrainConfig, ["--objective", "pso", "--timestep_grid", "[0,250,500,750]",
                                     "--model_sample_refresh", "100"])  # fmt: skip
    assert cfg.params.timestep_grid == [0, 250, 500, 750] and cfg.model_sample_refresh == 100


def test_pso_pairs_keeps_the_datas_rejected_image_and_weighs_it_like_the_preferred_one():
    spec = get_objective("pso_pairs")
    assert spec.timesteps == "grid" and spec.error_space == "x0" and spec.loser_source == "data"
    assert spec.needs_reference and spec.params is PSOPairsParams
    p = PSOPairsParams()
    assert p.gamma == 1.0 and p.prior_weight == 0.0 and p.timestep_grid == [249, 499, 749, 999]
    with pytest.raises(ConfigError, match="model_sample_steps"):
        parse_config(TrainConfig, ["--objective", "pso_pairs", "--model_sample_steps", "2"])


# ---- online loss ------------------------------------------------------------------------------------------------


def test_pso_online_clamps_each_step_and_compares_within_prompts_by_hand():
    lp = torch.tensor([[0.05, -0.3], [0.0, 0.02], [0.01, 0.01], [0.0, 0.0]], requires_grad=True)
    ref = torch.zeros(4, 2)
    rewards = torch.tensor([1.0, 0.5, 0.3, 0.3])  # prompt 1 is a tie: no pair
    groups = torch.tensor([0, 0, 1, 1])
    loss, m = pso_online_loss(lp, ref, rewards, groups, beta=50.0, clip_range=0.1)
    lo, hi = math.log(0.9), math.log(1.1)
    rho_a = [0.05, max(lo, -0.3)]
    rho_b = [0.0, 0.02]
    inside = [50 * (rho_a[0] - rho_b[0]), 50 * (rho_a[1] - rho_b[1])]  # 2.5 and 50 (log 0.9 - 0.02) = -6.268
    expected = sum(math.log1p(math.exp(-z)) for z in inside) / 2
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((0.078889 + 6.269920) / 2, abs=1e-5)
    assert m["pairs"].item() == 1.0
    assert m["clip_frac"].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert hi > 0.05  # step 0 of the winner is inside the range
    loss.sum().backward()
    g = lp.grad
    assert g[0, 1].item() == 0.0  # clamped step: no gradient
    assert g[0, 0].item() < 0 < g[1, 0].item()  # push the winner's log-ratio up, the loser's down
    assert g[2:].abs().sum().item() == 0.0  # the tied prompt contributes nothing
    z = inside[0]
    assert g[0, 0].item() == pytest.approx(-50 * (1 / (1 + math.exp(z))) / 2, rel=1e-5)


def test_pso_online_without_pairs_is_a_connected_zero():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, m = pso_online_loss(
        lp, torch.zeros(2, 3), torch.ones(2), torch.tensor([0, 1]), beta=50.0, clip_range=0.1
    )
    loss.sum().backward()
    assert loss.item() == 0.0 and m["pairs"].item() == 0.0 and lp.grad.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="clip_range"):
        pso_online_loss(lp, torch.zeros(2, 3), torch.ones(2), torch.tensor([0, 0]), beta=50.0, clip_range=1.0)


# ---- the model's own samples ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from diffalign.models import pipeline as mp

    path = build_tiny_sd(tmp_path_factory.mktemp("sd"))
    return mp.load_components(str(path))


def _samples(comps, refresh=0, seed=0):
    from diffalign.models import pipeline as mp
    from diffalign.training.model_samples import ModelSamples

    params = PSOParams(model_sample_refresh=refresh, model_sample_steps=3)
    return ModelSamples(comps, params, seed=seed, resolution=16, weight_dtype=torch.float32, device=torch.device("cpu"),
                        empty_text=mp.encode_prompts(comps, [""]))  # fmt: skip


def test_model_samples_are_keyed_per_pair_drawn_once_per_round_and_checkpointed(tiny_run):
    from diffalign.models import pipeline as mp

    comps = tiny_run
    text = mp.encode_prompts(comps, ["a red circle", "a blue square", "a green star"])
    shape = (4, 8, 8)
    ms = _samples(comps)
    first = ms.latents(comps.unet, torch.tensor([5, 9, 2]), text, shape)
    assert first.shape == (3, 4, 8, 8) and torch.isfinite(first).all() and ms.drawn == 3
    # drawn alone, pair 9 gets the same sample: its noise is its own, not the batch's
    alone = _samples(comps).latents(
        comps.unet, torch.tensor([9]), {k: v[1:2] for k, v in text.items()}, shape
    )
    torch.testing.assert_close(alone[0], first[1])
    # refresh 0: later steps reuse the sample even after the model changes
    with torch.no_grad():
        for p in comps.unet.parameters():
            p.add_(0.01)
    ms.step = 500
    again = ms.latents(comps.unet, torch.tensor([9, 5]), {k: v[[1, 0]] for k, v in text.items()}, shape)
    assert torch.equal(again, first[[1, 0]]) and ms.drawn == 3
    # refresh 2: a new round draws again, from the changed model
    mr = _samples(comps, refresh=2)
    mr.store = dict(ms.store)
    mr.step = 2
    redrawn = mr.latents(comps.unet, torch.tensor([5]), {k: v[:1] for k, v in text.items()}, shape)
    assert mr.drawn == 1 and not torch.equal(redrawn[0], first[0])
    # checkpoint state round-trips
    state = ms.state_dict()
    assert state["indices"].tolist() == [2, 5, 9] and state["rounds"].tolist() == [0, 0, 0]
    back = _samples(comps)
    back.load_state_dict(state)
    assert (
        torch.equal(back.latents(comps.unet, torch.tensor([5, 9, 2]), text, shape), first) and back.drawn == 0
    )


# ---- through the training script ----------------------------------------------------------------------------------


def _args(model, data, out, objective, *extra):
    pso = ("--objective", objective, "--beta", "500", "--model_sample_steps", "2", "--deterministic", "false",
           "--timestep_grid", "[249,499,749,999]")  # fmt: skip
    return tiny_args(model, data, out, *pso, *extra, steps=4, checkpointing=2)


@pytest.mark.parametrize("objective", ["pso", "pso_hinge"])
def test_pso_trains_through_the_cli_and_resumes_bit_identically(tmp_path, objective):
    """The samples drawn before the checkpoint are read back, the later ones drawn at the same steps: a killed run
    ends where an uninterrupted one does."""
    model, data = build_tiny_sd(tmp_path / "sd"), write_tiny_pairs(tmp_path / "data", n=16, size=16)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    refresh = ("--model_sample_refresh", "3")  # a new round at step 3, after the resume
    proc = run_script(_args(model, data, straight, objective, *refresh), timeout=600)
    assert (
        "timesteps grid" in proc.stdout and "the model's own samples (euler_ancestral, 2 steps" in proc.stdout
    )
    assert "model samples: 16 pairs hold a sample" in proc.stdout
    run_script(_args(model, data, cut, objective, *refresh, "--max_train_steps", "2"), timeout=600)
    run_script(_args(model, data, cut, objective, *refresh, "--resume_from_checkpoint", str(cut / "checkpoint-2")),
               timeout=600)  # fmt: skip
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(cut / "lora" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    curve = losses(straight)
    assert len(curve) == 4 and all(math.isfinite(x) for x in curve) and len(set(curve)) > 1
    if objective == "pso":  # untrained LoRA: equal errors under model and reference, logits 0
        first = [r for r in _log(straight)][0]
        assert first["pso/reward_margin"] == pytest.approx(0.0, abs=1e-6)


def _log(out):
    import json

    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_pso_on_sdxl_conditioning(tmp_path):
    """SDXL's pooled embeddings and time ids reach the sampler of the model's own samples and the step."""
    model, data = build_tiny_sdxl(tmp_path / "sdxl"), write_tiny_pairs(tmp_path / "data", n=8, size=16)
    out = tmp_path / "out"
    run_script(_args(model, data, out, "pso", "--max_train_steps", "2"), timeout=600)
    assert all(math.isfinite(x) for x in losses(out))


def test_online_pso_runs_on_sdxl_conditioning_with_the_lcm_sampler(tmp_path):
    """The online form on the online loop: SDXL conditioning, LCM's few-step sampler (DMD2's), β and ε as given."""
    import json

    from cli_helpers import REPO

    model = build_tiny_sdxl(tmp_path / "sdxl")
    out = tmp_path / "out"
    args = ["--pretrained_model", str(model), "--resolution", "16", "--objective", "pso_online", "--beta", "50",
            "--clip_range", "0.1", "--output_dir", str(out), "--num_epochs", "2", "--prompts_per_epoch", "4",
            "--images_per_prompt", "2", "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--sample_steps", "4",
            "--sampler", "lcm",
            "--sample_guidance", "0", "--timestep_fraction", "1", "--checkpointing_steps", "0",
            "--validation_steps", "0", "--track_every", "0", "--skip_eval", "true", "--report_to", "none",
            "--learning_rate", "1e-2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]  # fmt: skip
    proc = run_script(args, timeout=600, script=REPO / "scripts" / "train_online.py")
    assert "3 of 3 steps per trajectory" in proc.stdout and "beta 50.0, clip_range 0.1" in proc.stdout
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # untrained LoRA: every ratio is 1


# ---- effects on the distilled sandbox model ---------------------------------------------------------------------


def test_a_minute_of_pso_widens_the_held_out_margin_against_the_models_own_samples(tmp_path):
    """CI's proof that offline PSO learns, not only runs: 100 steps of the sandbox recipe on the distilled model, then
    the held-out (validation + test) preferred images against fresh 4-step samples of the current model, at the grid
    timesteps. Before training every margin is exactly 0 (LoRA off = reference); after it, the share of held-out
    pairs with a positive margin must beat chance by three binomial standard deviations."""
    from cli_helpers import heldout_before_and_after

    before, after = heldout_before_and_after("sandbox_pso.yaml", tmp_path, 100)
    assert before["mean_margin"] == 0.0 and before["accuracy"] == 0.0
    assert after["n"] > 500
    assert after["accuracy"] > after["chance_bound_3sd"] and after["mean_margin"] > 0, after


def test_online_pso_raises_the_winners_log_ratio_over_the_losers(tmp_path):
    """Online PSO's effect on what it optimises: after passes over one epoch's samples of the distilled model (two
    trajectories per prompt, the learned reward), the winner's per-step log-ratio to the base exceeds the loser's
    on most pairs — at the start every ratio is 1 (margin 0)."""
    from cli_helpers import REPO

    from diffalign.config import OnlineConfig
    from diffalign.training.online import OnlineTrainer

    args = ["--config", str(REPO / "configs" / "sandbox_pso_online.yaml"), "--output_dir", str(tmp_path / "run"),
            "--num_epochs", "1", "--prompts_per_epoch", "16", "--train_batch_size", "16", "--updates_per_epoch", "20",
            "--learning_rate", "1e-3", "--checkpointing_steps", "0", "--validation_steps", "0", "--track_every", "0",
            "--skip_eval", "true", "--report_to", "none"]  # fmt: skip
    trainer = OnlineTrainer(parse_config(OnlineConfig, args))
    trainer.setup()
    samples, _ = trainer.sample_epoch(0)
    rows = torch.arange(len(samples.prompts))
    steps = trainer.trainable_steps.unsqueeze(0).expand(len(rows), -1)

    def margins():
        with torch.no_grad():
            x = trainer.trajectory_inputs(samples, rows, steps)
            _, m = pso_online_loss(x.log_prob, x.log_prob_ref, x.rewards, x.groups, beta=50.0, clip_range=0.1)
        return m["margin"], m["pairs"]

    m0, pairs = margins()
    assert float(m0.abs().max()) == 0.0 and pairs.item() >= 12
    trainer.train_epoch(samples)
    m1, _ = margins()
    assert float((m1 > 0).float().mean()) > 0.8 and float(m1.mean()) > 0, m1


def test_pso_pairs_trains_on_the_data_pairs_at_the_grid(tmp_path):
    model, data = build_tiny_sd(tmp_path / "sd"), write_tiny_pairs(tmp_path / "data", n=16, size=16)
    out = tmp_path / "pairs"
    args = (
        "--objective",
        "pso_pairs",
        "--beta",
        "500",
        "--deterministic",
        "false",
        "--timestep_grid",
        "[249,749]",
    )
    proc = run_script(tiny_args(model, data, out, *args, steps=4, checkpointing=0), timeout=600)
    assert "timesteps grid" in proc.stdout and "own samples" not in proc.stdout
    assert (
        "reference errors: 0 of 16 pairs read" in proc.stdout
    )  # data losers: the reference's errors are cacheable
    log = _log(out)
    assert log[0]["train/loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # fresh LoRA: model == reference
    assert log[0]["pso/target_err"] != log[0]["pso/sample_err"]  # slot 1 is the rejected image, not a copy
    assert len({r["train/loss"] for r in log}) > 1
