#!/usr/bin/env python
"""Offline preference training: Diffusion-DPO (default), its SFT baseline, or any registered offline objective.

    # the sandbox default: LoRA Diffusion-DPO on the shipped sandbox model and data, then base-vs-aligned evaluation
    accelerate launch scripts/train_diffusion_dpo.py

    # a recipe, with command-line overrides (any config field is a --flag; see --help)
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_diffusion_dpo.py \
        --config configs/sd15_pickapic.yaml --output_dir outputs/dpo-sd15

Runs with plain `python scripts/train_diffusion_dpo.py` too (one process). Writes checkpoints, logs, the exported
weights (LoRA in diffusers format or a full UNet), a model card and `<output_dir>/eval.json`. Configuration mistakes
are reported as one line before anything heavy loads (`--debug` shows the traceback); `--help` answers at once.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffalign.cli import main_for_people, run_training  # noqa: E402  (light: no torch until the config is valid)
from diffalign.config import TrainConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sandbox_dpo.yaml"


def main(argv: list[str] | None = None) -> dict:
    return run_training(TrainConfig, "diffalign.training.offline:OfflinePairsTrainer", DEFAULT_CONFIG, argv)


def cli() -> None:
    """``main`` with errors for people: one line and exit code 2 (config) or 1 (training), unless ``--debug``."""
    main_for_people(main)


if __name__ == "__main__":
    cli()
