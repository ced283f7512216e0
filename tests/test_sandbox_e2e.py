"""End to end on the shipped sandbox: real model, real preference data, real judge.

The first test is CI's proof that training + evaluation work on the sandbox (a short run, about a minute on CPU).
The slow one is the README's default run and asserts the issue's bar (judge win rate >= 60%, CI lower bound > 50%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign.sandbox import SANDBOX_DATA, SANDBOX_PIPELINE

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_diffusion_dpo.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _shipped_assets():
    # shipped with the repository: a checkout without them is broken, and these tests must say so rather than skip
    assert (SANDBOX_PIPELINE / "model_index.json").is_file(), f"{SANDBOX_PIPELINE} missing from the checkout"
    assert (SANDBOX_DATA / "data").is_dir(), f"{SANDBOX_DATA}/data missing from the checkout"


def _run(args: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    return proc


def test_short_sandbox_training_and_evaluation(tmp_path):
    out = tmp_path / "run"
    proc = _run(
        ["--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--max_train_steps", "10",
         "--max_train_samples", "320", "--checkpointing_steps", "5", "--validation_steps", "5",
         "--eval_num_prompts", "12", "--eval_seeds", "0", "--eval_steps", "10"]
    )  # fmt: skip
    assert "sandbox/assets/pipeline (SD1.x, epsilon)" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    wr = result["win_rate"]
    assert wr["n"] == 12 and 0.0 <= wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"] <= 1.0
    for aspect in ("overall", "prompt_following", "harmlessness", "aesthetic", "fidelity"):
        assert aspect in result["aspects"], aspect
    for name in (
        "lora/pytorch_lora_weights.safetensors",
        "README.md",
        "eval_samples.png",
        "validation/step-000010.png",
    ):
        assert (out / name).is_file(), name

    # The exported LoRA loads into a stock pipeline and changes its samples.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SANDBOX_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=10, guidance_scale=5.0, output_type="np")
    prompt = "a large red circle on the left on a white background"
    base = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(out / "lora"))
    aligned = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    assert base.shape == aligned.shape == (1, 32, 32, 3)
    assert abs(base - aligned).max() > 1e-3


@pytest.mark.slow
def test_default_run_meets_the_bar(tmp_path):
    """The README's main command, unchanged but for where it writes (about 10 minutes on a 2-core CPU)."""
    out = tmp_path / "dpo"
    _run(["--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")], timeout=3600)
    wr = json.loads((out / "eval.json").read_text())["win_rate"]
    assert wr["win_rate"] >= 0.60 and wr["ci_low"] > 0.50, wr


@pytest.mark.slow
def test_default_recipe_meets_the_multi_seed_bar(tmp_path):
    """Issue 9's bar for the default: training seeds 0, 1, 2, each evaluated identically; mean win rate >= 0.62 and
    every seed's CI lower bound above 0.50 (about 20 minutes on 2 cores: two seeds at a time, one thread each)."""
    from diffalign.eval.multi_seed import meets_bar

    out = tmp_path / "ms"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "multi_seed.py"), "--seeds", "0", "1", "2", "--parallel", "2",
         "--output_dir", str(out), "--", "--validation_steps", "0"],
        env=ENV, capture_output=True, text=True, timeout=7200, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "multi_seed.json").read_text())
    assert meets_bar(summary, mean_at_least=0.62, every_ci_low_above=0.50), summary


def test_a_minute_of_dpo_learns_the_held_out_preferences(tmp_path):
    """CI's proof of learning, not only running: 120 steps of the default recipe on the shipped data, then the
    implicit accuracy on the held-out validation + test pairs (≈520 decided pairs, never trained on). Before training
    every margin is exactly 0; after it, accuracy must beat chance by three binomial standard deviations."""
    from cli_helpers import heldout_before_and_after

    before, after = heldout_before_and_after("sandbox_dpo.yaml", tmp_path, 120, draws=4)
    assert before["mean_margin"] == 0.0 and before["accuracy"] == 0.0  # untrained LoRA: policy == reference
    assert after["n"] > 500
    # measured: 0.650 with the current code (2026-12-07; 0.575 with the code it was written for) against a bound of 0.566
    assert after["accuracy"] > after["chance_bound_3sd"], after
    assert after["mean_margin"] > 0
