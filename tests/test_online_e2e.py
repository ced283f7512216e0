"""The online loop end to end on the sandbox: outputs in the offline loop's formats, exact resume, the exported LoRA in
stock diffusers, two processes reproducing one, one-line configuration errors, and an effect for each method."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import ENV, REPO
from safetensors.torch import load_file

SCRIPT = REPO / "scripts" / "train_online.py"


def small(out, *extra, epochs: int = 2):
    """A few-second online run: 4 prompts x 2 images per epoch, 4 sampling steps, no evaluation."""
    return [
        "--output_dir", str(out), "--num_epochs", str(epochs), "--prompts_per_epoch", "4", "--images_per_prompt", "2",
        "--train_batch_size", "2", "--sample_steps", "4", "--timestep_fraction", "0.5", "--checkpointing_steps", "0",
        "--validation_steps", "0", "--track_every", "0", "--skip_eval", "true", "--report_to", "none",
        "--learning_rate", "3e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", *extra,
    ]  # fmt: skip


def run(args, launcher=None, timeout=600, check=True):
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def log_rows(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def lora(out):
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("objective", ["prdp", "ddpo"])
def test_online_run_writes_eval_json_export_card_and_the_epoch_time_split(tmp_path, objective):
    out = tmp_path / objective
    args = small(out, "--objective", objective, "--skip_eval", "false", "--eval_num_prompts", "6", "--track_every", "1",
                 "--track_prompts", "4", "--validation_steps", "2")  # fmt: skip
    proc = run(args)
    assert (
        "online preference training" in proc.stdout
        and "held out from training" in (out / "eval.json").read_text()
    )
    result = json.loads((out / "eval.json").read_text())
    wr = result["win_rate"]
    assert "sandbox-grammar test_unique (held out" in result["dataset"]  # the report names the split
    assert result["num_prompts"] == 6 and 0.0 <= wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"] <= 1.0
    assert {"overall", "prompt_following", "fidelity"} <= set(result["aspects"])
    rows = log_rows(out)
    assert rows[0]["epoch"] == 0 and "heldout/overall" in rows[0]  # the held-out curve starts at the base
    epochs = [r for r in rows if r["epoch"] > 0]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert r["perf/sample_seconds"] > 0 and r["perf/train_seconds"] > 0 and "heldout/overall" in r
        assert np.isfinite(r["train/loss"]) and f"{objective}/" in "".join(r)
    weights = lora(out)
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert (out / "README.md").is_file() and (out / "validation" / "step-000002.png").is_file()
    (start,) = json.loads((out / "environment.json").read_text())["starts"]  # the same record as offline runs
    assert start["resumed"] is False and start["torch"]["version"] == torch.__version__


@pytest.mark.parametrize("objective", ["prdp", "ddpo"])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, objective):
    """Epoch checkpoints hold the optimizer, the reward statistics (DDPO) and the epoch; every random draw is keyed
    by (seed, epoch, row), so 2 + 2 epochs end bit-identical to 4 in one go."""
    full, split = tmp_path / "full", tmp_path / "split"
    run(small(full, "--objective", objective, epochs=4))
    run(small(split, "--objective", objective, "--checkpointing_steps", "2", epochs=2))
    proc = run(small(split, "--objective", objective, "--resume_from_checkpoint", "latest", epochs=4))
    assert "resumed from" in proc.stdout and "epoch 2" in proc.stdout
    a, b = lora(full), lora(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train/reward_mean"] for r in log_rows(full)] == [
        r["train/reward_mean"] for r in log_rows(split)
    ][-4:]


def test_exported_lora_loads_in_stock_diffusers_and_changes_samples(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffalign.sandbox import SANDBOX_PIPELINE as PIPELINE_DIR

    out = tmp_path / "run"
    run(small(out, "--learning_rate", "1e-2", epochs=3))
    pipe = StableDiffusionPipeline.from_pretrained(
        str(PIPELINE_DIR), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=8, guidance_scale=5.0, output_type="np")
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(out / "lora"))
    tuned = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(base - tuned).max() > 1e-3


def test_two_processes_reproduce_the_one_process_run(tmp_path):
    """Prompts are sharded and every trajectory's noise is keyed by its global row: two processes sample exactly what
    one does, and with half the prompts per micro-batch each, their averaged gradient is the one-process gradient.
    Stated tolerance: the first epoch's mean reward within 1e-4 (same weights and noise; a UNet call over 4 rows
    instead of 8 sums in another order, ~2e-5 after 4 steps and the VAE), later ones and the weights within a small
    tolerance (that difference, amplified by Adam's near-sign first steps)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(small(one, "--train_batch_size", "4", epochs=3))
    config = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    proc = run(small(two, "--train_batch_size", "2", epochs=3), launcher=launcher)
    assert "2 (2 prompts each per epoch)" in proc.stdout
    r1, r2 = log_rows(one), log_rows(two)
    assert abs(r1[0]["train/reward_mean"] - r2[0]["train/reward_mean"]) < 1e-4
    assert max(abs(a["train/reward_mean"] - b["train/reward_mean"]) for a, b in zip(r1, r2)) < 2e-2
    a, b = lora(one), lora(two)
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    den = sum((a[k] ** 2).sum() for k in a) ** 0.5
    assert num / den < 0.05, float(num / den)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--objective", "prdp", "--images_per_prompt", "1"], "needs at least 2"),
        (["--objective", "dpo"], "train it with scripts/train_diffusion_dpo.py"),
        (["--prompts", "/nonexistent/prompts.txt"], "/nonexistent/prompts.txt"),
        (["--sample_eta", "0"], "sample_eta"),
        (["--prompts_per_epoch", "6", "--train_batch_size", "4"], "train_batch_size=4"),
        (["--reward", "sandbox-vp-onpolicy:1,pickscor:2"], "config field reward: unknown reward 'pickscor'"),
    ],
)
def test_configuration_mistakes_are_one_line(tmp_path, flags, message):
    proc = run(small(tmp_path / "x", *flags), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert lines and message in lines[-1] and lines[-1].startswith("configuration error")


def test_training_on_the_judge_warns_that_it_is_a_ceiling(tmp_path):
    proc = run(small(tmp_path / "x", "--reward", "sandbox-judge", epochs=1))
    assert "ceiling" in proc.stderr


def one_epoch_trainer(tmp_path, objective: str, *extra: str):
    """An OnlineTrainer set up from the objective's sandbox config for one epoch of 8 prompts x 4 images, 25 passes
    at lr 1e-3 with the proximal / PPO clip opened (clip_range 1); its samples, and all rows x every trained step."""
    from diffalign.config import OnlineConfig, parse_config
    from diffalign.training.online import OnlineTrainer

    args = small(tmp_path / "run", "--objective", objective, "--prompts_per_epoch", "8", "--images_per_prompt", "4",
                 "--train_batch_size", "8", "--updates_per_epoch", "25", "--learning_rate", "1e-3",
                 "--clip_range", "1", *extra, epochs=1)  # fmt: skip
    cfg = parse_config(OnlineConfig, ["--config", str(REPO / "configs" / f"sandbox_{objective}.yaml"), *args])
    trainer = OnlineTrainer(cfg)
    trainer.setup()
    samples, _ = trainer.sample_epoch(0)
    rows = torch.arange(len(samples.prompts))
    return trainer, samples, rows, trainer.trainable_steps.unsqueeze(0).expand(len(rows), -1)


def test_ddpo_raises_the_likelihood_of_its_better_samples(tmp_path):
    """DDPO's effect on what it optimises: after passes over one epoch's samples, the trajectories with positive
    advantage have gained log-likelihood relative to θ_old and those with negative advantage lost it (correlation of
    the mean per-step log-ratio with the advantage > 0.5). The PPO clip is opened (clip_range 1) so that many passes
    can move; every step is scored. (A 30-epoch held-out version at lr 2e-3 collapsed the reward: README.)"""
    trainer, samples, rows, steps = one_epoch_trainer(tmp_path, "ddpo")
    cfg = trainer.cfg
    adv = trainer.spec.prepare_rewards(samples.rewards, samples.prompts, cfg.params, {})
    trainer.train_epoch(samples)
    with torch.no_grad():
        x = trainer.trajectory_inputs(samples, rows, steps)
    gain = (x.log_prob - x.log_prob_old).mean(1)
    corr = float(torch.corrcoef(torch.stack([gain, adv.float()]))[0, 1])
    assert corr > 0.5 and gain[adv > 0].mean() > gain[adv < 0].mean(), corr


def test_prdp_regression_fits_the_reward_differences_of_its_samples(tmp_path):
    """PRDP's effect on what it optimises: after passes over one epoch's samples, the policy's trajectory log-ratio
    differences r̂_a − r̂_b of same-prompt pairs follow the targets (r_a − r_b)/β: the loss falls well below its value
    at the base (where every r̂ is 0) and the predicted differences correlate with the targets. The proximal clip is
    opened (clip_range 1) so that many passes can move away from θ_old; every step is scored."""
    from diffalign.objectives.prdp import prdp_loss

    trainer, samples, rows, steps = one_epoch_trainer(tmp_path, "prdp")
    cfg = trainer.cfg

    def fit():
        with torch.no_grad():
            x = trainer.trajectory_inputs(samples, rows, steps)
            loss, m = prdp_loss(x.log_prob, x.log_prob_old, x.log_prob_ref, x.rewards, x.groups,
                                beta=cfg.beta, clip_range=1e9)  # fmt: skip
        return float(loss.mean()), m["pred_diff"], m["target_diff"]

    before, pred0, target = fit()
    assert float(pred0.abs().max()) == 0.0 and before > 0
    trainer.train_epoch(samples)
    after, pred, target_after = fit()
    torch.testing.assert_close(target, target_after)  # the same pairs and targets
    corr = float(torch.corrcoef(torch.stack([pred, target]))[0, 1])
    assert after < 0.5 * before and corr > 0.5, (before, after, corr)


def test_multi_seed_runs_online_configs_with_the_online_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("multi_seed", REPO / "scripts" / "multi_seed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._is_online(str(REPO / "configs" / "sandbox_prdp.yaml"))
    assert mod._is_online(str(REPO / "configs" / "sandbox_ddpo.yaml"))
    assert not mod._is_online(str(REPO / "configs" / "sandbox_dpo.yaml"))


def test_plot_online_curves_draws_both_panels(tmp_path):
    from diffalign.eval.plots import plot_online_curves

    rows = [{"epoch": 0, "heldout/overall": 0.40}] + [
        {
            "epoch": e,
            "train/reward_mean": 0.1 * e,
            **({"heldout/overall": 0.4 + 0.01 * e} if e % 2 == 0 else {}),
        }
        for e in range(1, 7)
    ]
    path = plot_online_curves({"prdp": rows, "ddpo": rows[:3]}, tmp_path / "c.png", smooth=3)
    assert path.is_file() and path.stat().st_size > 5000


@pytest.mark.parametrize("config", ["sandbox_prdp.yaml", "sandbox_ddpo.yaml"])
def test_online_defaults_train_on_a_learned_reward_that_ranks_base_samples(config):
    """The defaults never train on the judge that evaluates them: their reward is a learned catalog model whose
    recorded held-out agreement with the judge on pairs of base-model samples is above chance (Wilson lower bound)."""
    import yaml

    from diffalign.rewards import load_reward
    from diffalign.rewards.catalog import load_manifest

    name = yaml.safe_load((REPO / "configs" / config).read_text())["reward"]
    manifest = load_manifest(name)
    assert manifest["kind"] == "multi_aspect" and "judge" not in name
    metrics = json.loads((REPO / "reward_models" / name / "metrics.json").read_text())
    overall = metrics["held_out"]["model"]["overall"]
    assert overall["n"] >= 200 and overall["ci_low"] > 0.5, overall
    images = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    scores = load_reward(name).score(images, ["a red circle"] * 4)
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())


def test_permuted_reward_control_keeps_each_prompts_rewards_and_breaks_their_link_to_the_images(tmp_path):
    """``reward_control: permute``: the same samples (the control changes no draw), each prompt's rewards the same
    multiset, assigned to its images by a seeded shuffle — so the link from an image to its reward is gone."""
    _, real, _, _ = one_epoch_trainer(tmp_path / "a", "prdp")
    _, ctrl, _, _ = one_epoch_trainer(tmp_path / "b", "prdp", "--reward_control", "permute")
    assert np.array_equal(real.images, ctrl.images) and torch.equal(real.groups, ctrl.groups)
    moved = 0
    for g in torch.unique(real.groups):
        rows = real.groups == g
        assert torch.equal(real.rewards[rows].sort().values, ctrl.rewards[rows].sort().values)
        moved += int(not torch.equal(real.rewards[rows], ctrl.rewards[rows]))
    assert moved >= 5, moved  # of 8 prompts; a shuffle of 4 keeps the order with probability 1/24
    _, again, _, _ = one_epoch_trainer(tmp_path / "c", "prdp", "--reward_control", "permute")
    assert torch.equal(again.rewards, ctrl.rewards)  # a pure function of (seed, epoch, prompt): resume agrees
