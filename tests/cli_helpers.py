"""What the command-line tests share: the training script, its environment, tiny SD1.x/SDXL pipelines with
Pick-a-Pic-schema pairs, the flags of a few-step run on them, and reading a run's loss log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import build_tiny_sd, build_tiny_sdxl, write_tiny_pairs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_diffusion_dpo.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def make_tiny(root: Path) -> dict[str, Path]:
    """``{"sd", "sdxl", "data"}``: tiny pipelines and 16 pairs of 16-pixel images."""
    return {
        "sd": build_tiny_sd(root / "sd"),
        "sdxl": build_tiny_sdxl(root / "sdxl"),
        "data": write_tiny_pairs(root / "data", n=16, size=16),
    }


def tiny_args(model, data, out, *extra, steps: int = 6, checkpointing: int = 3) -> list[str]:
    """Flags of a few-step run (constant learning rate, no validation or evaluation) on a tiny pipeline."""
    return [
        "--pretrained_model", str(model), "--dataset", str(data), "--resolution", "16", "--output_dir", str(out),
        "--train_batch_size", "4", "--max_train_steps", str(steps), "--checkpointing_steps", str(checkpointing),
        "--checkpoints_total_limit", "none", "--validation_steps", "0", "--skip_eval", "true", "--report_to", "none",
        "--logging_steps", "1", "--learning_rate", "1e-2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--use_cache", "false", "--deterministic", "true", *extra,
    ]  # fmt: skip


def run_script(args, launcher=None, timeout=300, check: bool = True, script: Path = SCRIPT):
    """Run the training script; with ``check`` it must exit 0 (else its output is shown)."""
    cmd = [*(launcher or [sys.executable]), str(script), *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
        )
    return proc


def losses(out: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def heldout_before_and_after(config: str, out: Path, steps: int, *extra: str, draws: int = 2):
    """Train ``configs/<config>`` for ``steps`` steps in-process (caches under ``out``) and return the held-out
    implicit accuracy before (validation, one draw) and after (validation + test, ``draws`` draws) training."""
    from diffalign.config import TrainConfig, parse_config
    from diffalign.training.heldout import heldout_implicit_accuracy
    from diffalign.training.offline import OfflinePairsTrainer

    args = ["--config", str(REPO / "configs" / config), "--output_dir", str(out / "run"), "--cache_dir",
            str(out / "cache"), *extra, "--max_train_steps", str(steps), "--checkpointing_steps", "0",
            "--validation_steps", "0", "--skip_eval", "true", "--report_to", "none"]  # fmt: skip
    trainer = OfflinePairsTrainer(parse_config(TrainConfig, args))
    trainer.setup()
    before = heldout_implicit_accuracy(trainer, splits=("validation",), draws=1)
    trainer.train()
    after = heldout_implicit_accuracy(trainer, draws=draws)
    trainer.end()
    return before, after


def ppd_args(config: str, data, out, *extra, steps: int = 4) -> list[str]:
    """A few steps of a PPD config on a small PPD build: checkpoints every 2 steps, batch 8, no caches."""
    return [
        "--config", config, "--dataset", str(data), "--output_dir", str(out),
        "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--checkpoints_total_limit", "none",
        "--validation_steps", "0", "--skip_eval", "true", "--report_to", "none", "--logging_steps", "1",
        "--train_batch_size", "8", "--lr_warmup_steps", "0", "--lr_scheduler", "constant", "--use_cache", "false",
        "--user_projector_hidden", "32", *extra,
    ]  # fmt: skip
